"""A Triton-layout model repository on disk: ``<root>/<model>/config.pbtxt`` + ``<version>/model.onnx``.

The embedded backend, ``wlcad models check`` and the CPU twin for ``wlcad triton`` all read models
through this one class, so they agree on which models and versions exist.
"""

from __future__ import annotations

from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from services.core.errors import InputError
from services.inference.config import read_config
from services.inference.signature import ModelSignature

ONNX_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"


class ModelRepository:
    """Read-only view of a model repository folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def model_names(self) -> list[str]:
        """Every folder holding a config.pbtxt, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob(f"*/{CONFIG_FILE}"))

    def model_dir(self, name: str) -> Path:
        path = self.root / name
        if not name or "/" in name or name.startswith(".") or not (path / CONFIG_FILE).is_file():
            known = ", ".join(self.model_names()) or "none"
            raise InputError(f"unknown model {name!r} in {self.root} (models: {known})", field="model")
        return path

    def config(self, name: str) -> mc.ModelConfig:
        return read_config(self.model_dir(name) / CONFIG_FILE)

    def signature(self, name: str) -> ModelSignature:
        return ModelSignature.from_config(self.config(name))

    def versions(self, name: str) -> list[int]:
        """Version numbers (numeric folders) that hold a model.onnx, ascending."""
        model_dir = self.model_dir(name)
        return sorted(
            int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / ONNX_FILE).is_file()
        )

    def onnx_path(self, name: str, version: int | None = None) -> Path:
        """model.onnx of ``version``, or of the latest version (Triton's default policy) when None."""
        versions = self.versions(name)
        if not versions:
            raise InputError(f"model {name!r} has no <version>/{ONNX_FILE}", field="model")
        chosen = versions[-1] if version is None else version
        if chosen not in versions:
            raise InputError(
                f"model {name!r} has no version {chosen} (versions: {versions})", field="model_version"
            )
        return self.root / name / str(chosen) / ONNX_FILE
