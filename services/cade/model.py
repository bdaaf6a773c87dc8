"""Bind a CADe task's model ``cade_<task>`` to the configured inference backend (embedded or Triton).

Like :class:`services.label_estimation.model.UnetModel`: everything needed to plan the work (the
tile, batch limit, version, operating points) is read from the repository on disk — the config.pbtxt
Triton serves and the model card — so building a detector needs no round trip to a backend that may
be down, and every inference call waits no longer than the current request's time left
(:func:`services.core.work_budget.remaining_s`; ``timeout_s`` outside a request, e.g. the CLI).

A model with fixed spatial dims sets the tile (it can run nothing else); one with symbolic dims runs
the task's own tile. Its input must be one channel of the task's dimensionality, else the model is
not this task's and the task is :class:`~services.cade.tasks.TaskNotAvailableError`.

Two stages: when the task has a second stage (``DetectorSpec.rerank``) and the repository holds its
classifier ``cade_<task>_fpr``, the classifier scores the candidates and *its* card's operating points
apply (the confidences are its own). Its card names the U-Net version it was trained behind
(``first_stage_model``); a repository serving another U-Net version is refused, never mixed silently.
Without the classifier the task runs its U-Net alone, as before.

Operating points: the model card's version entry may hold ``"operating_points": {"1": 0.62, "2":
0.48, "4": 0.31}`` (FP per case → confidence threshold, what ``wlcad evaluate cade`` measures) or the
list form ``[{"max_fp_per_case": 1.0, "threshold": 0.62}, …]`` of its ``froc.json``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from services.cade.pipeline import Detector, DetectorSpec
from services.cade.reranking import Reranker
from services.cade.tasks import CadeTask, TaskNotAvailableError
from services.cade.tiling import InferFunction
from services.core.errors import InputError
from services.core.work_budget import remaining_s
from services.inference.backend import BlockingBackend
from services.inference.card import CARD_FILE, ModelCard
from services.inference.factory import backend_from_setting, default_repository
from services.inference.repository import ModelRepository
from services.inference.signature import ModelSignature, TensorSpec

__all__ = ["CadeModel", "parse_operating_points"]

#: The output a CADe model's logits are read from when it has several.
OUTPUT_NAME = "logits"
#: The second-stage classifier of ``cade_<task>`` is ``cade_<task>_fpr``.
CLASSIFIER_SUFFIX = "_fpr"


def parse_operating_points(value: Any, where: str) -> dict[float, float]:
    """FP-per-case rate → confidence threshold, from either card form (see the module docstring)."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
        items = [(v.get("max_fp_per_case"), v.get("threshold")) for v in value]
    else:
        raise InputError("must be an object {fp_per_case: threshold} or a list", field=where)
    points: dict[float, float] = {}
    for rate, threshold in items:
        try:
            rate_f, threshold_f = float(rate), float(threshold)
        except (TypeError, ValueError):
            raise InputError(f"{rate!r}: {threshold!r} is not a number pair", field=where) from None
        if not (math.isfinite(rate_f) and rate_f > 0 and math.isfinite(threshold_f)):
            raise InputError(f"{rate!r}: {threshold!r} needs a rate > 0 and a finite threshold", field=where)
        points[rate_f] = threshold_f
    return dict(sorted(points.items()))


def _single_input(signature: ModelSignature, name: str) -> TensorSpec:
    if len(signature.inputs) != 1:
        raise TaskNotAvailableError(
            f"model {name!r} takes {len(signature.inputs)} inputs; a detector takes one"
        )
    return signature.inputs[0]


def _logits_output(signature: ModelSignature, name: str) -> str:
    names = [spec.name for spec in signature.outputs]
    if OUTPUT_NAME in names:
        return OUTPUT_NAME
    if len(names) == 1:
        return names[0]
    raise TaskNotAvailableError(f"model {name!r} has outputs {names} and none is {OUTPUT_NAME!r}")


def _bound_spec(task: CadeTask, signature: ModelSignature, tensor: TensorSpec) -> DetectorSpec:
    """The task's spec with the model's tile (fixed dims) and batch limit."""
    dims = tensor.dims
    if signature.batches:
        max_batch = signature.max_batch_size
    else:  # the batch axis is in dims
        max_batch = task.spec.tiling.max_batch if dims and dims[0] == -1 else (dims[0] if dims else 0)
        dims = dims[1:]
    if len(dims) != task.dims + 1 or dims[0] not in (1, -1) or max_batch < 1:
        raise TaskNotAvailableError(
            f"model {signature.name!r} takes {list(tensor.dims)}, not (batch, 1, {task.dims} spatial axes) "
            f"as the {task.dims}D task {task.name} needs"
        )
    spatial = dims[1:]
    tiling = task.spec.tiling
    if all(d > 0 for d in spatial):
        minimum = tuple(min(m, t) for m, t in zip(tiling.min_shape, spatial, strict=True))
        tiling = dataclasses.replace(tiling, tile=tuple(spatial), min_shape=minimum)
    elif any(d > 0 for d in spatial):
        raise TaskNotAvailableError(f"model {signature.name!r} fixes some spatial dims only: {list(spatial)}")
    tiling = dataclasses.replace(tiling, max_batch=min(tiling.max_batch, max_batch))
    return dataclasses.replace(task.spec, tiling=tiling)


class CadeModel:
    """A synchronous handle on ``cade_<task>``: :meth:`detector` for the pipeline, ``version`` for reports.

    Raises :class:`TaskNotAvailableError` (naming ``model``) when the repository lacks the model, has no
    version of it, or holds a model that cannot serve the task.
    """

    def __init__(
        self,
        task: CadeTask,
        setting: str | None = None,
        repository: Path | str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        repository = Path(repository) if repository else default_repository()
        models = ModelRepository(repository)
        name = task.model_name
        if name not in models.model_names():
            raise TaskNotAvailableError(
                f"task {task.name} needs model {name!r}, which is not in {repository} "
                f"(models: {', '.join(models.model_names()) or 'none'}); train and register it first"
            )
        versions = models.versions(name)
        if not versions:
            raise TaskNotAvailableError(f"model {name!r} in {repository} has no <version>/model.onnx")
        signature = models.signature(name)
        self.task = task
        self.name = name
        self.unet_version = f"{name}/{versions[-1]}"
        self._input = _single_input(signature, name).name
        self._output = _logits_output(signature, name)
        self.spec = _bound_spec(task, signature, _single_input(signature, name))
        self.operating_points = self._read_operating_points(models.model_dir(name), versions[-1])
        self.classifier: _Classifier | None = None
        if task.spec.rerank is not None and name + CLASSIFIER_SUFFIX in models.model_names():
            self.classifier = _Classifier.bind(models, name + CLASSIFIER_SUFFIX, self.unet_version, task)
            self.operating_points = self._read_operating_points(
                models.model_dir(self.classifier.name), self.classifier.number
            )
        self.version = (
            self.unet_version if self.classifier is None else f"{self.unet_version}+{self.classifier.version}"
        )
        self._backend = BlockingBackend(lambda: backend_from_setting(setting, repository))
        self._timeout_s = timeout_s

    @staticmethod
    def _read_operating_points(model_dir: Path, version: int) -> dict[float, float]:
        """The served version's operating points from its card entry; none without a card or entry."""
        if not (model_dir / CARD_FILE).is_file():
            return {}
        entry = ModelCard.read(model_dir).versions.get(str(version))
        if entry is None or "operating_points" not in entry.extra:
            return {}
        where = f"{model_dir / CARD_FILE}:versions.{version}.operating_points"
        return parse_operating_points(entry.extra["operating_points"], where)

    def threshold_for(self, fp_rate: float) -> float:
        """The confidence cut-off of the card's operating point at ``fp_rate`` FP per case."""
        for rate, threshold in self.operating_points.items():
            if math.isclose(rate, fp_rate, rel_tol=1e-9):
                return threshold
        known = ", ".join(f"{r:g}" for r in self.operating_points) or "none"
        raise InputError(
            f"{self.version}'s model card has no operating point at {fp_rate:g} FP/case (it has: {known}); "
            "give --threshold or record them with wlcad evaluate cade",
            field="fp_rate",
        )

    def default_threshold(self) -> float:
        """The card's operating point at the task's default FP rate, else the task's default cut-off."""
        if self.task.default_fp_rate in self.operating_points:
            return self.operating_points[self.task.default_fp_rate]
        return self.task.default_threshold

    def _infer_on(self, name: str, input_name: str, output_name: str) -> InferFunction:
        def run(batch: np.ndarray) -> np.ndarray:
            # Read here, in the request's thread: the budget is a per-thread context variable and
            # the backend runs on its own loop thread.
            timeout_s = remaining_s(self._timeout_s)
            return self._backend.infer(name, {input_name: batch}, [output_name], timeout_s=timeout_s)[
                output_name
            ]

        return run

    @property
    def infer(self) -> InferFunction:
        return self._infer_on(self.name, self._input, self._output)

    def detector(self, floor: float | None = None) -> Detector:
        """The task's detector on this model; ``floor`` lowers (or raises) the least confidence kept
        (the classifier's, for a two-stage detector)."""
        spec = self.spec if floor is None or self.classifier else dataclasses.replace(self.spec, floor=floor)
        reranker = None
        if self.classifier is not None:
            assert spec.rerank is not None
            rerank = dataclasses.replace(
                spec.rerank,
                max_batch=min(spec.rerank.max_batch, self.classifier.max_batch),
                floor=spec.rerank.floor if floor is None else floor,
            )
            spec = dataclasses.replace(spec, rerank=rerank)
            classify = self._infer_on(self.classifier.name, self.classifier.input, self.classifier.output)
            reranker = Reranker(rerank, classify, self.classifier.version)
        return Detector(spec, self.infer, self.unet_version, reranker)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> CadeModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class _Classifier:
    """The second-stage classifier ``cade_<task>_fpr`` as the repository holds it."""

    name: str
    number: int
    input: str
    output: str
    max_batch: int

    @property
    def version(self) -> str:
        return f"{self.name}/{self.number}"

    @staticmethod
    def bind(models: ModelRepository, name: str, unet_version: str, task: CadeTask) -> _Classifier:
        """Check ``name`` fits the task (input (n, 2, s, s, s), s = the task's VOI) and was trained behind
        ``unet_version``; raises :class:`TaskNotAvailableError` otherwise."""
        versions = models.versions(name)
        if not versions:
            raise TaskNotAvailableError(f"model {name!r} has no <version>/model.onnx")
        signature = models.signature(name)
        tensor = _single_input(signature, name)
        assert task.spec.rerank is not None
        voi = task.spec.rerank.voi_voxels
        dims = list(tensor.dims) if signature.batches else list(tensor.dims)[1:]
        if dims != [2, voi, voi, voi]:
            raise TaskNotAvailableError(
                f"model {name!r} takes {list(tensor.dims)}, not (batch, 2, {voi}, {voi}, {voi}) as {task.name}'s "
                "second stage needs"
            )
        model_dir = models.model_dir(name)
        entry = (
            ModelCard.read(model_dir).versions.get(str(versions[-1]))
            if (model_dir / CARD_FILE).is_file()
            else None
        )
        trained_behind = entry.extra.get("first_stage_model") if entry is not None else None
        if trained_behind != unet_version:
            raise TaskNotAvailableError(
                f"model {name}/{versions[-1]} was trained behind {trained_behind or 'an unrecorded U-Net'}, "
                f"but the repository serves {unet_version}; retrain it (python -m training.cade.fpr)"
            )
        max_batch = signature.max_batch_size if signature.batches else task.spec.rerank.max_batch
        return _Classifier(name, versions[-1], tensor.name, _logits_output(signature, name), max_batch)
