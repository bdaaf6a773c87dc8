"""The AnomalyScoring gRPC service: a thin adapter from ``wlcad.v1`` messages to
:class:`services.anomaly.scoring.AnomalyScorer`.

Slots, uploads, deadlines, error mapping and metrics come from the scaffold
(:mod:`services.servers.scaffold`); which model an empty ``model`` means and the score's fields come
from :mod:`services.batch.score`, as ``wlcad score`` uses them, so the service and the CLI answer the
same numbers.

A (task, model)'s scorer is bound on first use and kept. One the repository lacks leaves the service
running: ``Describe`` lists it as unavailable with the reason and ``Score`` answers FAILED_PRECONDITION
naming it — looked up again on every request, so a model registered later is served without a
restart. Input the model cannot score (non-finite pixels, a volume to the radiograph model, a constant
image, …) is INVALID_ARGUMENT naming ``image`` (:mod:`services.anomaly.preprocess`), never a NaN.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from services.anomaly.scoring import UNITS, AnomalyScorer
from services.anomaly.tasks import TASKS, AnomalyTask, anomaly_task
from services.api.convert import volume_to_proto
from services.api.pb import anomaly_pb2 as pb
from services.api.pb import common_pb2
from services.api.status import PreconditionError
from services.api.upload import upload_shape
from services.batch.score import SERVED_MODELS, model_version_name, model_versions, resolve_model
from services.core.errors import InputError
from services.core.version import software_version
from services.core.volume import Volume
from services.servers.observability import INFERENCE
from services.servers.scaffold import CapabilityServicer, MethodStatus, ServiceSettings

UPLOAD = upload_shape(pb.ScoreUploadMessage.DESCRIPTOR)


@dataclass(frozen=True)
class _Prepared:
    """A Score request checked before its image: the task, its bound scorer, whether to send the map."""

    request: pb.ScoreRequest
    task: AnomalyTask
    scorer: AnomalyScorer
    with_map: bool


class AnomalyScoringServicer(CapabilityServicer):
    """Serves every served model family of every task of :data:`services.anomaly.tasks.TASKS`."""

    component = "anomaly"

    def __init__(self, settings: ServiceSettings | None = None) -> None:
        super().__init__(settings or ServiceSettings())
        self._lock = threading.Lock()
        self._scorers: dict[tuple[str, str], AnomalyScorer] = {}

    # -- the RPCs ---------------------------------------------------------------------------------
    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:  # noqa: N802 - gRPC names
        return self.handle("Score", context, lambda: self._score(self._prepare(request), None))

    def ScoreUpload(self, messages: Iterator[bytes], context: grpc.ServicerContext) -> pb.ScoreResponse:  # noqa: N802 - gRPC names
        return self.handle_upload("ScoreUpload", context, messages, UPLOAD, self._prepare, self._score)

    def methods(self) -> Sequence[MethodStatus]:
        return [self._status(task, model) for task in TASKS.values() for model in SERVED_MODELS]

    def describe(self) -> pb.AnomalyDescription:
        models = [self._model_info(task, model) for task in TASKS.values() for model in SERVED_MODELS]
        return pb.AnomalyDescription(
            methods=[
                common_pb2.MethodInfo(
                    name=f"{m.task}/{m.model}",
                    available=m.available,
                    reason=m.reason,
                    model_version=m.model_version,
                )
                for m in models
            ],
            software_version=software_version(),
            inference_backend=self.settings.inference_setting or "embedded",
            models=models,
        )

    def close(self) -> None:
        with self._lock:
            for scorer in self._scorers.values():
                scorer.close()
            self._scorers.clear()

    # -- implementations --------------------------------------------------------------------------
    def _prepare(self, request: pb.ScoreRequest) -> _Prepared:
        """Task, model and scorer, checked once before the image (an upload is refused before any byte
        of it arrives)."""
        task = anomaly_task(request.task)
        model = resolve_model(task, request.model, self.repository)
        return _Prepared(request, task, self._scorer(task, model), request.with_map)

    def _scorer(self, task: AnomalyTask, model: str) -> AnomalyScorer:
        """The bound scorer; PreconditionError (naming the model) when it cannot be served."""
        key = (task.name, model)
        with self._lock:
            if key not in self._scorers:
                name = task.model_name(model)
                if not model_versions(task, model, self.repository):
                    raise PreconditionError(
                        f"{task.name} with model {model} needs {name} in the model repository, which "
                        "does not hold it yet"
                    )
                try:
                    scorer = AnomalyScorer(
                        task.name, model, repository=self.repository, setting=self.settings.inference_setting
                    )
                except InputError as exc:  # e.g. a card without calibration: the model cannot serve
                    raise PreconditionError(f"{name} cannot be served: {exc}") from None
                self._scorers[key] = scorer
            return self._scorers[key]

    def _status(self, task: AnomalyTask, model: str) -> MethodStatus:
        name = f"{task.name}/{model}"
        try:
            scorer = self._scorer(task, model)
        except PreconditionError as exc:
            return MethodStatus(name, available=False, reason=str(exc))
        return MethodStatus(name, model_version=model_version_name(task, model, scorer.version))

    def _model_info(self, task: AnomalyTask, model: str) -> pb.AnomalyModel:
        status = self._status(task, model)
        info = pb.AnomalyModel(
            task=task.name,
            model=model,
            available=status.available,
            reason=status.reason,
            model_version=status.model_version,
            dims=task.dims,
            model_shape_xyz=list(task.shape[::-1]),
            units=UNITS[model],
            is_default=resolve_model(task, "", self.repository) == model,
        )
        if status.available:
            calibration = self._scorer(task, model).calibration
            info.calibration_normals = len(calibration.normal_scores)
            info.calibration_mean = calibration.mean
            info.calibration_sd = calibration.sd
        return info

    def _score(self, prepared: _Prepared, image: Volume | None) -> pb.ScoreResponse:
        if image is None:
            image = self.image(prepared.request.image)
        scorer = prepared.scorer
        started = time.perf_counter()
        result, score_map = scorer.score_with_map(image)
        version = model_version_name(prepared.task, scorer.model, scorer.version)
        INFERENCE.labels(prepared.task.name, version).observe(time.perf_counter() - started)
        response = pb.ScoreResponse(
            task=result.task,
            model=result.model,
            model_version=version,
            score=result.score,
            units=result.units,
            percentile_among_normals=result.percentile_among_normals,
            z=result.z,
            components=result.components,
            calibration_normals=len(scorer.calibration.normal_scores),
            software_version=software_version(),
            grid=volume_to_proto(image, with_data=False),
        )
        if prepared.with_map:
            response.map.CopyFrom(volume_to_proto(score_map))
        return response
