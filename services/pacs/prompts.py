"""Lesion prompts for a PACS label-estimation run, read from a JSON file.

A PACS run has no manifest (the image is a Study/Series UID, not a path), so the prompts come as
``[{"center_mm": [x, y, z] | "center_voxel": [i, j, k], "diameter_mm": D, "lesion_id": N,
"lesion_type": "solid"}, ...]`` (or ``{"lesions": [...]}``). Everything that can be checked without
the image is checked when the file is read, so a bad file is refused before the series is fetched;
voxel centres become world mm once the image (its grid) is known.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from services.api import limits
from services.core.errors import InputError
from services.core.lesion_prompt import LesionPrompt, prompt_from_voxel
from services.core.volume import Volume

_KEYS = {"center_mm", "center_voxel", "diameter_mm", "lesion_id", "lesion_type"}


@dataclass(frozen=True)
class PromptSpec:
    """One lesion as the file gives it; ``center_mm`` xor ``center_voxel``."""

    lesion_id: int
    diameter_mm: float
    center_mm: tuple[float, float, float] | None = None
    center_voxel: tuple[float, float, float] | None = None
    lesion_type: str = ""

    def resolve(self, image: Volume) -> LesionPrompt:
        """The world-mm prompt on ``image``."""
        if self.center_voxel is not None:
            return prompt_from_voxel(image, self.center_voxel, self.diameter_mm, self.lesion_id)
        return LesionPrompt(self.center_mm, self.diameter_mm, self.lesion_id)


def _triplet(value: object, where: str) -> tuple[float, float, float]:
    ok = isinstance(value, list) and len(value) == 3
    ok = ok and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok:
        raise InputError(f"{where} needs 3 finite numbers", field="prompts")
    return tuple(float(v) for v in value)


def _spec(item: object, number: int) -> PromptSpec:
    where = f"lesion {number}"
    if not isinstance(item, dict):
        raise InputError(f"{where} must be an object", field="prompts")
    unknown = sorted(set(item) - _KEYS)
    if unknown:
        raise InputError(f"{where}: unknown keys {unknown} (use {sorted(_KEYS)})", field="prompts")
    if ("center_mm" in item) == ("center_voxel" in item):
        raise InputError(f"{where}: give exactly one of center_mm or center_voxel", field="prompts")
    lesion_id = item.get("lesion_id", number)
    lesion_type = item.get("lesion_type", "")
    if not isinstance(lesion_type, str) or len(lesion_type) > 64:
        raise InputError(f"{where}: lesion_type must be a text of at most 64 characters", field="prompts")
    diameter = item.get("diameter_mm")
    spec = PromptSpec(
        lesion_id=lesion_id,
        diameter_mm=diameter,
        center_mm=_triplet(item["center_mm"], f"{where} center_mm") if "center_mm" in item else None,
        center_voxel=_triplet(item["center_voxel"], f"{where} center_voxel")
        if "center_voxel" in item
        else None,
        lesion_type=lesion_type,
    )
    try:  # the prompt's own checks (diameter, id), on a stand-in centre when the centre is a voxel
        LesionPrompt(spec.center_mm or (0.0, 0.0, 0.0), diameter, lesion_id)
    except InputError as exc:
        raise InputError(f"{where}: {exc.field}: {exc.message}", field="prompts") from None
    return spec


def read_prompts(path: Path) -> list[PromptSpec]:
    """The prompts of a JSON file, every lesion checked (errors name ``prompts`` and the lesion)."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}", field="prompts") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path.name} is not JSON ({type(exc).__name__})", field="prompts") from None
    items = payload.get("lesions") if isinstance(payload, dict) else payload
    if not isinstance(items, list) or not items:
        raise InputError("must hold a non-empty list of lesions (or {'lesions': [...]})", field="prompts")
    if len(items) > limits.MAX_LESIONS:
        raise InputError(f"holds {len(items)} lesions; at most {limits.MAX_LESIONS}", field="prompts")
    specs = [_spec(item, number) for number, item in enumerate(items, start=1)]
    ids = [s.lesion_id for s in specs]
    if len(set(ids)) != len(ids):
        raise InputError(f"lesion ids repeat: {ids}", field="prompts")
    return specs
