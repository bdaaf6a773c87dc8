#!/usr/bin/env bash
# Installs a real Triton Inference Server (CPU, python backend) for development and tests, from PyPI.
#
# Why this way: the `nvidia-pytriton` wheel ships a complete `tritonserver` binary and is the one
# Triton build reachable here without Docker. Its Python dependencies pin numpy<2, which would break
# wlcad's venv, so the wheel goes in with --no-deps into its own git-ignored folder and wlcad only
# runs the binary (services/inference/triton_server.py).
# Its python-backend stub is compiled against numpy 1.x: under numpy 2 it reads and writes tensors
# as empty. So the stub gets its own small venv (found through PATH: the stub locates its Python by
# the `python3` on PATH) holding numpy<2 and the same onnxruntime version as wlcad's venv, which
# keeps embedded and Triton results identical.
# Idempotent: a complete install for the same versions is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${WLCAD_PYTRITON_VERSION:-0.7.0}"   # ships Triton 2.51
PYTHON="${PYTHON:-.venv/bin/python}"
TARGET=".cache/triton/${VERSION}"
STUB_ENV="${TARGET}/stub-venv"
PY_MINOR="$("${PYTHON}" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
ORT_VERSION="$("${PYTHON}" -c 'import importlib.metadata as m; print(m.version("onnxruntime"))')"
WANT="pytriton=${VERSION} python=${PY_MINOR} onnxruntime=${ORT_VERSION}"
MARKER="${TARGET}/.installed"
if [ -f "${MARKER}" ] && [ "$(cat "${MARKER}")" = "${WANT}" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "install-triton: ${WANT} into ${TARGET}"
rm -rf "${TARGET}"
mkdir -p "${TARGET}"
"${PYTHON}" -m pip install -q --no-deps --target "${TARGET}" "nvidia-pytriton==${VERSION}"
SERVER="${TARGET}/pytriton/tritonserver"
chmod +x "${SERVER}/bin/tritonserver"
install -m 755 "${SERVER}/python_backend_stubs/${PY_MINOR}/triton_python_backend_stub" \
  "${SERVER}/backends/python/triton_python_backend_stub"
"${PYTHON}" -m venv --without-pip "${STUB_ENV}"
"${PYTHON}" -m pip install -q --no-deps --target "${STUB_ENV}/lib/python${PY_MINOR}/site-packages" \
  "numpy<2" "onnxruntime==${ORT_VERSION}"
echo "${WANT}" > "${MARKER}"
