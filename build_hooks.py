"""setuptools build steps: put the generated wlcad.v1 gRPC modules into every wheel.

The generated ``*_pb2*.py`` are git-ignored (``services/api/codegen.py`` makes them), so a wheel built
from a clean clone would lack them and its ``services.api.pb`` would need grpc_tools and the ``proto/``
folder at run time. :class:`BuildPy` runs the one generator, ``codegen.generate()``, at build time and
writes straight into the build folder — the source tree is never written (a concurrent test run there
never sees a half-written module, and a stale ``_generated/`` there cannot leak into a wheel). The
``.proto`` files are shipped beside the code for reference; they are *not* put where
``codegen.PROTO_ROOT`` points, so in an installed wheel ``codegen.is_stale()`` finds no proto, is
False, and the shipped modules are used as they are.

Editable installs (``make install``) are left as they were: ``scripts/generate-protos.sh`` and the
lazy regeneration in ``services.api.pb`` keep the source tree's ``_generated/`` current.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from types import ModuleType

from packaging.requirements import Requirement
from packaging.version import Version
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent
CODEGEN = ROOT / "services" / "api" / "codegen.py"
GENERATED_PACKAGE = Path("services", "api", "_generated")


def load_codegen() -> ModuleType:
    """Load ``services/api/codegen.py`` by path: importing ``services`` would need the runtime deps."""
    spec = importlib.util.spec_from_file_location("_wlcad_build_codegen", CODEGEN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generate_into(out_dir: Path) -> list[Path]:
    """Run ``codegen.generate()`` with its output folder pointed at ``out_dir``; copy the protos beside."""
    codegen = load_codegen()
    shutil.rmtree(out_dir, ignore_errors=True)  # a proto removed since the last build leaves no module
    generated = codegen.generate(out_dir=out_dir, force=True)
    shipped = []
    for proto in codegen.proto_files():
        destination = out_dir / proto.relative_to(codegen.PROTO_ROOT)
        shutil.copyfile(proto, destination)
        shipped.append(destination)
    return sorted({*generated, *out_dir.rglob("*.py"), *out_dir.rglob("*.pyi"), *shipped})


_GRPC_VERSION = re.compile(r"^GRPC_GENERATED_VERSION = '([^']+)'", re.MULTILINE)
_PROTOBUF_VERSION = re.compile(r"ValidateProtobufRuntimeVersion\(\s*[\w.]+,\s*(\d+),\s*(\d+),\s*(\d+),")


def needed_runtime(out_dir: Path) -> dict[str, Version]:
    """The least grpcio / protobuf the generated code accepts (it refuses older ones at import)."""
    needed: dict[str, Version] = {}
    for path in out_dir.rglob("*_pb2*.py"):
        text = path.read_text()
        for match in _GRPC_VERSION.finditer(text):
            needed["grpcio"] = max(needed.get("grpcio", Version("0")), Version(match.group(1)))
        for match in _PROTOBUF_VERSION.finditer(text):
            version = Version(".".join(match.groups()))
            needed["protobuf"] = max(needed.get("protobuf", Version("0")), version)
    return needed


def check_runtime_floors(out_dir: Path, install_requires: list[str]) -> None:
    """Refuse to build a wheel whose declared grpcio/protobuf floors are below what its generated code
    needs: grpcio-tools is no runtime dependency any more, so nothing else would pull them up."""
    floors: dict[str, Version] = {}
    for line in install_requires:
        requirement = Requirement(line)
        name = requirement.name.lower()
        for spec in requirement.specifier:
            if spec.operator in (">=", "==", "~="):
                floors[name] = max(floors.get(name, Version("0")), Version(spec.version))
    for name, version in needed_runtime(out_dir).items():
        if floors.get(name, Version("0")) < version:
            raise RuntimeError(
                f"the generated code needs {name}>={version} but pyproject.toml allows older "
                f"({floors.get(name, 'no floor')}): raise the floor or pin grpcio-tools lower"
            )


class BuildPy(build_py):
    """``build_py`` that also generates the wlcad.v1 modules into the build folder (not for editable)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        out_dir = Path(self.build_lib) / GENERATED_PACKAGE
        generate_into(out_dir)
        check_runtime_floors(out_dir, list(self.distribution.install_requires or []))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        out_dir = Path(self.build_lib) / GENERATED_PACKAGE
        extra = [str(p) for p in out_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        return sorted({*outputs, *extra})


class SDist(sdist):
    """``sdist`` that carries what :class:`BuildPy` needs: this module and ``proto/``."""

    def make_distribution(self) -> None:
        # setuptools takes the file list from egg_info's manifest (packages + package data); without a
        # MANIFEST.in neither this module nor proto/ is in it, and a wheel built from the sdist would fail.
        extra = [
            "build_hooks.py",
            *(str(p.relative_to(ROOT)) for p in sorted(ROOT.glob("proto/wlcad/v1/*.proto"))),
        ]
        self.filelist.extend(name for name in extra if name not in self.filelist.files)
        super().make_distribution()
