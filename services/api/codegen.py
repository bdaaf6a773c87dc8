"""Generate the Python code of ``proto/wlcad/v1/*.proto`` with grpcio-tools, never by hand.

Run by ``make install`` (``scripts/generate-protos.sh``) and, when the generated files are missing or
older than a ``.proto``, on first import of :mod:`services.api.pb` — a checkout whose install stamp
predates a proto change must not run against stale messages.

Several processes may import :mod:`services.api.pb` at once (the children of ``wlcad serve all``,
parallel tests) on a checkout without generated code. protoc writes its files in place, so a process
importing while another one generates could load a half-written ``common_pb2.py`` and fail with
"Couldn't build proto file into descriptor pool". Hence generation holds a file lock (one generator at
a time; the others find the code fresh once they get the lock and do nothing), writes into a temporary
folder and moves each file into place with ``os.replace``: a reader sees an old file or a whole new
one, never a partial one.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.resources
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
OUT_DIR = Path(__file__).resolve().parent / "_generated"
_LOCK_NAME = ".codegen.lock"
_TEMP_PREFIX = ".codegen-"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.glob("wlcad/v1/*.proto"))


def is_stale(out_dir: Path = OUT_DIR) -> bool:
    """True when a generated module is missing or older than its .proto."""
    for proto in proto_files():
        stem = proto.relative_to(PROTO_ROOT).with_suffix("")
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            generated = out_dir / f"{stem}{suffix}"
            if not generated.is_file() or generated.stat().st_mtime < proto.stat().st_mtime:
                return True
    return False


def generate(out_dir: Path = OUT_DIR, force: bool = False) -> list[Path]:
    """Write ``*_pb2.py``, ``*_pb2_grpc.py`` and ``*_pb2.pyi`` under ``out_dir`` (default
    ``services/api/_generated/``) unless another process made them fresh meanwhile (``force``:
    regenerate anyway, as ``make install`` does). Returns the generated modules."""
    files = proto_files()
    if not files:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT}")
    with _locked(out_dir):
        if force or is_stale(out_dir):
            with _temporary_folder(out_dir) as staging:
                _run_protoc(files, staging)
                _move_into_place(staging, out_dir)
    return sorted((out_dir / "wlcad").rglob("*_pb2*.py"))


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """An exclusive ``flock`` on a file inside ``out_dir`` (git-ignored with it); released by the
    kernel if the holder dies, so a killed generator never leaves a stale lock behind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / _LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _temporary_folder(out_dir: Path) -> Iterator[Path]:
    """A fresh folder on the same file system as ``out_dir`` (``os.replace`` needs one), removed
    afterwards whatever happened; its dotted name is no importable package."""
    staging = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=out_dir))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run_protoc(files: list[Path], target: Path) -> None:
    from grpc_tools import protoc

    for package in (target / "wlcad", target / "wlcad" / "v1"):
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").touch()
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={target}",
        f"--pyi_out={target}",
        f"--grpc_python_out={target}",
        *(str(f) for f in files),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("grpc_tools.protoc failed on " + ", ".join(f.name for f in files))


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Each staged file replaces its namesake atomically; package ``__init__`` files first."""
    staged = sorted(
        (path for path in staging.rglob("*") if path.is_file()),
        key=lambda path: (path.name != "__init__.py", str(path)),
    )
    for source in staged:
        target = out_dir / source.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)


def main() -> int:
    for path in generate(force=True):
        print(path.relative_to(OUT_DIR.parent.parent.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
