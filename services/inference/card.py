"""Model cards: how each shipped model version was made, and the checksum that ties card to file.

A card is ``<model>/model_card.json`` so ``wlcad models check`` can verify it, not just display it.
It holds one entry per version folder (each version is one training run)::

    {"name": "label_unet3d",
     "description": "...",
     "versions": {"1": {"command": "...", "data_manifest": "...", "seed": 0,
                         "git_commit": "<hex>", "metrics": {"dice": 0.68}, "sha256": "<hex of model.onnx>"}}}
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.core.errors import InputError

CARD_FILE = "model_card.json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{7,40}(-dirty)?$")


@dataclass(frozen=True)
class VersionCard:
    """Provenance of one model version (one ``<model>/<version>/model.onnx``)."""

    command: str
    data_manifest: str
    seed: int
    git_commit: str
    metrics: dict[str, float]
    sha256: str
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, where: str) -> VersionCard:
        if not isinstance(data, dict):
            raise InputError("must be a JSON object", field=where)
        required = {
            "command": str,
            "data_manifest": str,
            "seed": int,
            "git_commit": str,
            "metrics": dict,
            "sha256": str,
        }
        for key, kind in required.items():
            if key not in data:
                raise InputError(f"missing field {key!r}", field=where)
            if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
                raise InputError(f"{key!r} must be a {kind.__name__}", field=f"{where}.{key}")
        if not _HEX64.match(data["sha256"]):
            raise InputError("must be 64 lowercase hex digits", field=f"{where}.sha256")
        if not _COMMIT.match(data["git_commit"]):
            raise InputError("must be a git commit hash (7–40 hex digits)", field=f"{where}.git_commit")
        for metric, value in data["metrics"].items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise InputError("metrics must be numbers", field=f"{where}.metrics.{metric}")
        known = {*required, "notes", "extra"}
        extra = dict(data.get("extra", {}))
        extra.update({k: v for k, v in data.items() if k not in known})
        return cls(
            command=data["command"],
            data_manifest=data["data_manifest"],
            seed=data["seed"],
            git_commit=data["git_commit"],
            metrics={k: float(v) for k, v in data["metrics"].items()},
            sha256=data["sha256"],
            notes=str(data.get("notes", "")),
            extra=extra,
        )


@dataclass(frozen=True)
class ModelCard:
    """All versions' provenance for one model."""

    name: str
    description: str
    versions: dict[str, VersionCard]

    @classmethod
    def read(cls, model_dir: Path) -> ModelCard:
        path = Path(model_dir) / CARD_FILE
        where = str(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise InputError("model card missing", field=where) from exc
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON: {exc}", field=where) from exc
        if not isinstance(data, dict) or not isinstance(data.get("versions"), dict):
            raise InputError("must be an object with a 'versions' object", field=where)
        return cls(
            name=str(data.get("name", "")),
            description=str(data.get("description", "")),
            versions={
                str(v): VersionCard.from_json(entry, f"{where}:versions.{v}")
                for v, entry in data["versions"].items()
            },
        )

    def write(self, model_dir: Path) -> Path:
        path = Path(model_dir) / CARD_FILE
        data = {
            "name": self.name,
            "description": self.description,
            "versions": {
                v: {k: val for k, val in asdict(card).items() if val or k in ("seed", "metrics")}
                for v, card in sorted(self.versions.items(), key=lambda item: int(item[0]))
            },
        }
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks (model files can be hundreds of MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
