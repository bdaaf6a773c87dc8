"""Bind the U-Net method to the configured inference backend (embedded onnxruntime or Triton).

Every inference call waits no longer than the current request's time left
(:func:`services.core.work_budget.remaining_s`; ``timeout_s`` outside a request, e.g. the CLI), so
a backend that is down costs a caller its UNAVAILABLE within its deadline, not a fixed 30 s of
retries after it left. Nothing here touches the backend before the first inference: a service
whose Triton is down starts, and creates this model, without waiting on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.core.work_budget import remaining_s
from services.inference.backend import BlockingBackend
from services.inference.factory import backend_from_setting, default_repository
from services.inference.repository import ModelRepository
from services.label_estimation.unet import INPUT_NAME, MODEL_NAME, OUTPUT_NAME, InferFunction


class UnetModel:
    """A synchronous handle on ``label_unet3d``: ``infer`` for the pipeline, ``version`` for reports.

    ``max_batch`` comes from the repository's config (the one Triton serves, as ``version`` does),
    so building the model needs no round trip to a backend that may be down."""

    def __init__(
        self, setting: str | None = None, repository: Path | str | None = None, timeout_s: float = 30.0
    ) -> None:
        repository = Path(repository) if repository else default_repository()
        models = ModelRepository(repository)
        versions = models.versions(MODEL_NAME)  # InputError naming the model if absent
        self.version = f"{MODEL_NAME}/{versions[-1]}"
        self.max_batch = max(1, models.config(MODEL_NAME).max_batch_size)
        self._backend = BlockingBackend(lambda: backend_from_setting(setting, repository))
        self._timeout_s = timeout_s

    @property
    def infer(self) -> InferFunction:
        def run(batch: np.ndarray) -> np.ndarray:
            # Read here, in the request's thread: the budget is a per-thread context variable and
            # the backend runs on its own loop thread.
            timeout_s = remaining_s(self._timeout_s)
            return self._backend.infer(MODEL_NAME, {INPUT_NAME: batch}, [OUTPUT_NAME], timeout_s=timeout_s)[
                OUTPUT_NAME
            ]

        return run

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> UnetModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
