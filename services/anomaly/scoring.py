"""Score one image with a task's shipped anomaly model through :class:`InferenceBackend`.

One call for a CLI or servicer: :func:`score_volume` (or :class:`AnomalyScorer` to keep the model
bound across many images) takes a :class:`~services.core.volume.Volume` and returns an
:class:`AnomalyScore`. Everything the scorer needs besides the ONNX file — the score's definition
and the calibration normals — is read from the model card on disk.

Scores (higher = more abnormal):

* ``glow``: the negative log-likelihood of the quantised image under the normal flow, in bits/dim.
* ``two-flow``: the log-posterior log p(x) − log p(x | normal) (+ const) of Shibata et al. 2021,
  from a flow on the unlabelled mix and a flow on normals, in bits/dim: NLL_normal − NLL_mixture.
  What both flows find simple (smooth, low-noise images: Nalisnick et al. 2019) cancels.
* ``gan``: f-AnoGAN's residual (Schlegl et al. 2019) — the mean squared difference between the image
  and its reconstruction G(E(x)) plus κ × that of the critic's features, on the networks' [−1, 1]
  scale; its map is the per-pixel squared residual.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.anomaly.calibration import Calibration
from services.anomaly.preprocess import model_input
from services.anomaly.tasks import AnomalyTask, anomaly_task
from services.core.errors import InputError
from services.core.volume import Volume
from services.core.work_budget import remaining_s
from services.inference.backend import BlockingBackend
from services.inference.card import ModelCard
from services.inference.factory import backend_from_setting, default_repository
from services.inference.repository import ModelRepository

INPUT_NAME = "image"
LOG_PX = "log_px"
LOG_PX_MIXTURE = "log_px_mixture"
LOG_PX_NORMAL = "log_px_normal"
#: Per-pixel maps (nats per pixel): the Glow's −log p(x) spread over its pixels, and the posterior's
#: NLL_normal − NLL_mixture. Each sums to (the score of) the whole image.
NLL_MAP = "nll_map"
SCORE_MAP = "score_map"
#: f-AnoGAN's outputs: the score, and the per-pixel squared residual (its mean is the image term).
GAN_SCORE = "score"
RESIDUAL_MAP = "residual_map"
#: Each served family's score units, and its map's (per pixel or voxel).
UNITS = {"glow": "bits/dim", "two-flow": "bits/dim", "gan": "squared residual"}
MAP_UNITS = {"glow": "bits/pixel", "two-flow": "bits/pixel", "gan": "squared residual/pixel"}
DEFAULT_TIMEOUT_S = 60.0


def bits_per_dim(log_px: np.ndarray, dims: int, levels: int = 256) -> np.ndarray:
    """Discrete NLL in bits/dim of the quantised image from the flow's log-density (nats) on [0, 1]."""
    return (-np.asarray(log_px, np.float64) + dims * math.log(levels)) / (dims * math.log(2.0))


def scores_from_outputs(model: str, outputs: dict[str, np.ndarray], task: AnomalyTask) -> np.ndarray:
    """Per-image score from a model's raw outputs (one definition for serving and evaluation)."""
    dims = int(np.prod(task.spatial))
    if model == "glow":
        return bits_per_dim(outputs[LOG_PX], dims, task.levels).reshape(-1)
    if model == "two-flow":
        nll_normal = bits_per_dim(outputs[LOG_PX_NORMAL], dims, task.levels)
        nll_mixture = bits_per_dim(outputs[LOG_PX_MIXTURE], dims, task.levels)
        return (nll_normal - nll_mixture).reshape(-1)
    if model == "gan":
        return np.asarray(outputs[GAN_SCORE], np.float64).reshape(-1)
    raise InputError(f"no served scorer for model {model!r}", field="model")


def per_pixel_map(model: str, outputs: dict[str, np.ndarray], task: AnomalyTask) -> np.ndarray:
    """(n, *spatial) per-pixel map in :data:`MAP_UNITS`: for the flows, bits whose mean over the
    pixels is the image's score; for f-AnoGAN, the squared residual (its mean is the image term)."""
    if model == "glow":
        return ((np.asarray(outputs[NLL_MAP], np.float64) + math.log(task.levels)) / math.log(2.0))[:, 0]
    if model == "two-flow":
        return (np.asarray(outputs[SCORE_MAP], np.float64) / math.log(2.0))[:, 0]
    if model == "gan":
        return np.asarray(outputs[RESIDUAL_MAP], np.float64)[:, 0]
    raise InputError(f"no served scorer for model {model!r}", field="model")


def model_grid_volume(image: Volume, array: np.ndarray, units: str = MAP_UNITS["glow"]) -> Volume:
    """``array`` (the model's (z, y, x) shape) as a Volume covering ``image``'s world box: the grid
    the preprocessing resized onto (pixel centres scaled about the box, as ``skimage`` resizes)."""
    old = np.asarray(image.shape_xyz, dtype=np.float64)
    new = np.asarray(array.shape[::-1], dtype=np.float64)
    scale = old / new
    origin = image.index_to_world((scale - 1.0) / 2.0)
    spacing = tuple(float(s) for s in np.asarray(image.spacing) * scale)
    return Volume(array.astype(np.float32), spacing, tuple(origin), image.direction, {"units": units})


@dataclass(frozen=True)
class AnomalyScore:
    """One image's result: what ``wlcad score`` writes as JSON."""

    task: str
    model: str
    model_version: int
    score: float
    units: str
    percentile_among_normals: float
    z: float
    components: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class AnomalyScorer:
    """``anomaly_<task>_<model>`` bound to the configured backend (embedded onnxruntime by default)."""

    def __init__(
        self,
        task: str,
        model: str = "glow",
        *,
        repository: Path | str | None = None,
        setting: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.task = anomaly_task(task)
        self.model = model
        self.name = self.task.model_name(model)
        root = Path(repository) if repository is not None else default_repository()
        repo = ModelRepository(root)
        model_dir = repo.model_dir(self.name)
        self.version = repo.versions(self.name)[-1] if repo.versions(self.name) else 0
        if not self.version:
            raise InputError(f"model {self.name!r} has no version folder", field="model")
        card = ModelCard.read(model_dir).versions.get(str(self.version))
        if card is None or "calibration" not in card.extra:
            raise InputError(f"card of {self.name} v{self.version} has no calibration", field="model_card")
        self.calibration = Calibration.from_json(card.extra["calibration"], f"{self.name}.calibration")
        self.timeout_s = timeout_s
        self._backend = BlockingBackend(lambda: backend_from_setting(setting, root))

    def raw_scores(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Scores of preprocessed images (n, 1, *spatial) and the model's outputs."""
        outputs = self._backend.infer(
            self.name, {INPUT_NAME: batch.astype(np.float32)}, timeout_s=remaining_s(self.timeout_s)
        )
        return scores_from_outputs(self.model, outputs, self.task), outputs

    def score(self, volume: Volume) -> AnomalyScore:
        return self.score_with_map(volume)[0]

    def score_with_map(self, volume: Volume) -> tuple[AnomalyScore, Volume]:
        """The score and its per-pixel map (:data:`MAP_UNITS`) on the model grid over the image's world
        box (:func:`model_grid_volume`; for a flow the map's mean is the score). Resample it onto the image with
        ``Volume.resample(reference=image)`` for an overlay."""
        scores, outputs = self.raw_scores(model_input(volume, self.task))
        value = float(scores[0])
        if not math.isfinite(value):  # a model failure, not the caller's input: never hand out NaN
            raise RuntimeError(f"{self.name} produced a non-finite score")
        dims = int(np.prod(self.task.spatial))
        components = {
            f"nll_{name.removeprefix('log_px').strip('_') or 'flow'}_bits_per_dim": float(
                bits_per_dim(array, dims, self.task.levels).reshape(-1)[0]
            )
            for name, array in outputs.items()
            if name.startswith(LOG_PX)
        }
        score_map = per_pixel_map(self.model, outputs, self.task)[0]
        result = AnomalyScore(
            task=self.task.name,
            model=self.model,
            model_version=self.version,
            score=value,
            units=UNITS[self.model],
            percentile_among_normals=self.calibration.percentile(value),
            z=self.calibration.z(value),
            components=components,
        )
        return result, model_grid_volume(volume, score_map.reshape(self.task.shape), MAP_UNITS[self.model])

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> AnomalyScorer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def score_volume(volume: Volume, task: str, model: str = "glow", **options) -> AnomalyScore:
    """Score one image (a CLI's single ``--image``); ``options`` go to :class:`AnomalyScorer`."""
    with AnomalyScorer(task, model, **options) as scorer:
        return scorer.score(volume)
