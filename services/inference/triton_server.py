"""Run a real Triton Inference Server on CPU for development and tests (``wlcad triton``).

The only Triton that installs here without Docker is the ``tritonserver`` binary inside the
``nvidia-pytriton`` wheel (``scripts/install-triton.sh`` puts it under ``.cache/triton/``). That build
has just the python backend, so it serves a generated *CPU twin* of the repository: same model
names, tensor names, dims, ``max_batch_size`` and ``dynamic_batching``, with ``backend: "python"``,
``KIND_CPU`` instances and one generic ``model.py`` (onnxruntime) beside a link to each ``model.onnx``.
Production runs the real repository unchanged on NGC Triton (onnxruntime backend, GPU).

Facts this module encodes (each one cost a failed start to find):
* the python backend needs ``triton_python_backend_stub`` for *our* Python inside ``backends/python/``;
* the stub must load the venv Python's libpython (its ``LIBDIR`` first on ``LD_LIBRARY_PATH``, else it
  picks Debian's and dies with an RLock error) and the wheel's ``nvidia_pytriton.libs``;
* the stub is built against numpy 1.x and, under numpy 2, reads and writes every tensor as empty; it
  runs an isolated interpreter (``PYTHONPATH`` is ignored) that finds its prefix from the ``python3``
  on ``PATH``; so ``PATH`` starts with a small stub venv holding numpy<2 and wlcad's onnxruntime
  version (made by ``scripts/install-triton.sh``);
* the server binds 0.0.0.0 by default: every address is set to 127.0.0.1 explicitly;
* on SIGTERM it waits up to ``--exit-timeout-secs`` (30 s default) for open HTTP connections: 5 s here.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from services.inference.config import format_config
from services.inference.repository import ONNX_FILE, ModelRepository

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[2]
_TEMPLATE = Path(__file__).with_name("triton_twin") / "model.py"
INSTALL_HINT = "run `bash scripts/install-triton.sh` (or set WLCAD_TRITON_HOME to a nvidia-pytriton install)"


class TritonNotInstalledError(RuntimeError):
    """No tritonserver binary found."""


@dataclass(frozen=True)
class TritonInstall:
    """An unpacked nvidia-pytriton wheel (``--target`` folder)."""

    root: Path

    @property
    def server_dir(self) -> Path:
        return self.root / "pytriton" / "tritonserver"

    @property
    def binary(self) -> Path:
        return self.server_dir / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.server_dir / "backends"

    @property
    def libs(self) -> Path:
        return self.root / "nvidia_pytriton.libs"

    @property
    def stub_env(self) -> Path:
        """The numpy<2 venv the python-backend stub runs in."""
        return self.root / "stub-venv"


def find_install() -> TritonInstall:
    """``$WLCAD_TRITON_HOME``, else the newest ``.cache/triton/<version>`` with a tritonserver binary."""
    configured = os.environ.get("WLCAD_TRITON_HOME")
    candidates = (
        [Path(configured)]
        if configured
        else sorted((_REPO_ROOT / ".cache" / "triton").glob("*"), reverse=True)
    )
    for root in candidates:
        install = TritonInstall(root)
        if install.binary.is_file() and (install.stub_env / "bin" / "python3").exists():
            return install
    raise TritonNotInstalledError(f"no tritonserver found: {INSTALL_HINT}")


def ensure_python_stub(install: TritonInstall) -> None:
    """Copy the python-backend stub built for this Python into ``backends/python/`` (once)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = install.backends / "python" / "triton_python_backend_stub"
    source = install.server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if target.is_file():
        return
    if not source.is_file():
        raise TritonNotInstalledError(
            f"the nvidia-pytriton wheel has no python backend stub for Python {version}"
        )
    shutil.copy2(source, target)
    target.chmod(0o755)


def build_cpu_twin(
    repository: ModelRepository,
    target: Path,
    *,
    dynamic_batching: bool = True,
    instance_count: int = 1,
    intra_op_threads: int = 0,
) -> list[str]:
    """Write the python-backend twin of every model's latest version into ``target``; returns names.

    ``dynamic_batching=False`` drops the config's batching section (for the benchmark's on/off
    comparison); the rest of the config is kept as it is.
    """
    target.mkdir(parents=True, exist_ok=True)
    names = []
    for name in repository.model_names():
        config = repository.config(name)
        twin = mc.ModelConfig()
        twin.CopyFrom(config)
        twin.name = name
        twin.platform = ""
        twin.backend = "python"
        del twin.instance_group[:]
        twin.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instance_count)
        if not dynamic_batching:
            twin.ClearField("dynamic_batching")
        twin.parameters["intra_op_threads"].string_value = str(intra_op_threads)
        twin.ClearField("version_policy")
        onnx_path = repository.onnx_path(name)
        version_dir = target / name / onnx_path.parent.name
        version_dir.mkdir(parents=True, exist_ok=True)
        (target / name / "config.pbtxt").write_text(format_config(twin))
        shutil.copyfile(_TEMPLATE, version_dir / "model.py")
        link = version_dir / ONNX_FILE
        link.unlink(missing_ok=True)
        link.symlink_to(onnx_path.resolve())
        names.append(name)
    return names


def _die_with_parent() -> None:
    """In the child before exec: new session, and SIGTERM when the parent dies (no orphaned servers)."""
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TritonServer:
    """A ``tritonserver`` child process serving the CPU twin of a repository on 127.0.0.1."""

    def __init__(
        self,
        repository: ModelRepository | Path | str,
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        dynamic_batching: bool = True,
        instance_count: int = 1,
        intra_op_threads: int = 0,
        workdir: Path | None = None,
        log_file: Path | None = None,
    ) -> None:
        self.repository = (
            repository if isinstance(repository, ModelRepository) else ModelRepository(repository)
        )
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.install = find_install()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="wlcad-triton-")
        self.workdir = Path(workdir) if workdir else Path(self._tmp.name)
        self.twin = self.workdir / "repository"
        self.models = build_cpu_twin(
            self.repository,
            self.twin,
            dynamic_batching=dynamic_batching,
            instance_count=instance_count,
            intra_op_threads=intra_op_threads,
        )
        self.log_file = log_file or self.workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def command(self) -> list[str]:
        return [
            str(self.install.binary),
            f"--model-repository={self.twin}",
            f"--backend-directory={self.install.backends}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--log-verbose=0",
            "--exit-timeout-secs=5",
        ]

    def environment(self) -> dict[str, str]:
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (libdir, str(self.install.libs), env.get("LD_LIBRARY_PATH", "")) if p
        )
        env["PATH"] = os.pathsep.join([str(self.install.stub_env / "bin"), env.get("PATH", "")])
        env.pop("PYTHONHOME", None)
        env.pop("VIRTUAL_ENV", None)
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        return env

    def start(self, timeout_s: float = 60.0) -> TritonServer:
        """Start the process and wait until every model is ready; raises with the log tail on failure."""
        ensure_python_stub(self.install)
        log_handle = self.log_file.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # own process group, so stop() also ends the python-backend stubs
        )
        log_handle.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.ready():
                log.info("tritonserver ready: grpc %s http %s", self.grpc_url, self.http_url)
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout_s:g} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once (a crash, for tests)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (Triton drains in-flight requests), SIGKILL after ``timeout_s``."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process:
            with contextlib.suppress(ProcessLookupError):  # stubs left behind by a crash share the group
                os.killpg(self.process.pid, signal.SIGKILL)

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.cleanup()
