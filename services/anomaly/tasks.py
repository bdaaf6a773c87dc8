"""What an anomaly task fixes for training and serving alike: dimensionality, model resolution,
intensity scale and dequantisation levels. One definition, imported by both sides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.cade.preprocess import Intensity
from services.core.errors import InputError

#: Model families a task can be scored with (``wlcad score --model``).
MODELS = ("glow", "two-flow", "gan", "baseline")
ModelKind = Literal["glow", "two-flow", "gan", "baseline"]


@dataclass(frozen=True)
class AnomalyTask:
    """``shape`` is the model's array shape (z, y, x) — a radiograph has z = 1.

    The image is normalised on its own values (``intensity``), then resized to ``shape`` and
    quantised to ``levels`` grey levels; serving dequantises at each level's centre, training with
    uniform noise inside it (the flows model a density, so both need the same bins)."""

    name: str
    dims: Literal[2, 3]
    shape: tuple[int, int, int]
    intensity: Intensity
    levels: int = 256

    @property
    def spatial(self) -> tuple[int, ...]:
        """The network's spatial shape: (y, x) in 2D, (z, y, x) in 3D."""
        return self.shape[1:] if self.dims == 2 else self.shape

    def model_name(self, model: str) -> str:
        if model not in MODELS:
            raise InputError(f"unknown model {model!r}; known: {', '.join(MODELS)}", field="model")
        return f"anomaly_{self.name}_{model}"


TASKS: dict[str, AnomalyTask] = {
    # Radiographs have no absolute scale: their own 0.5–99.5th percentiles map to [0, 1].
    "cxr-anomaly": AnomalyTask("cxr-anomaly", 2, (1, 64, 64), Intensity("percentile", 0.5, 99.5)),
    # CT numbers are calibrated: a fixed 0–100 HU window holds parenchyma (25–40 HU), infarct
    # (5–10 HU below it) and acute blood (50–90 HU); bone and air clip.
    "head-ct-anomaly": AnomalyTask("head-ct-anomaly", 3, (32, 64, 64), Intensity("window", 0.0, 100.0)),
}


def anomaly_task(name: str) -> AnomalyTask:
    if name not in TASKS:
        raise InputError(f"unknown anomaly task {name!r}; known: {', '.join(TASKS)}", field="task")
    return TASKS[name]
