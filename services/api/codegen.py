"""Generate the Python code of ``proto/wlcad/v1/*.proto`` with grpcio-tools, never by hand.

Run by ``make install`` (``scripts/generate-protos.sh``) and, when the generated files are missing or
older than a ``.proto``, on first import of :mod:`services.api.pb` — a checkout whose install stamp
predates a proto change must not run against stale messages.
"""

from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
OUT_DIR = Path(__file__).resolve().parent / "_generated"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.glob("wlcad/v1/*.proto"))


def is_stale() -> bool:
    """True when a generated module is missing or older than its .proto."""
    for proto in proto_files():
        stem = proto.relative_to(PROTO_ROOT).with_suffix("")
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            generated = OUT_DIR / f"{stem}{suffix}"
            if not generated.is_file() or generated.stat().st_mtime < proto.stat().st_mtime:
                return True
    return False


def generate() -> list[Path]:
    """Write ``*_pb2.py``, ``*_pb2_grpc.py`` and ``*_pb2.pyi`` under ``services/api/_generated/``."""
    from grpc_tools import protoc

    files = proto_files()
    if not files:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "wlcad" / "v1").mkdir(parents=True, exist_ok=True)
    for package in (OUT_DIR / "wlcad", OUT_DIR / "wlcad" / "v1"):
        (package / "__init__.py").touch()
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={OUT_DIR}",
        f"--pyi_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
        *(str(f) for f in files),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("grpc_tools.protoc failed on " + ", ".join(f.name for f in files))
    return sorted(OUT_DIR.rglob("*_pb2*.py"))


def main() -> int:
    for path in generate():
        print(path.relative_to(OUT_DIR.parent.parent.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
