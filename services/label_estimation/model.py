"""Bind the U-Net method to the configured inference backend (embedded onnxruntime or Triton)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from services.inference.backend import BlockingBackend
from services.inference.factory import backend_from_setting, default_repository
from services.inference.repository import ModelRepository
from services.label_estimation.unet import INPUT_NAME, MODEL_NAME, OUTPUT_NAME, InferFunction


class UnetModel:
    """A synchronous handle on ``label_unet3d``: ``infer`` for the pipeline, ``version`` for reports."""

    def __init__(
        self, setting: str | None = None, repository: Path | str | None = None, timeout_s: float = 30.0
    ) -> None:
        repository = Path(repository) if repository else default_repository()
        versions = ModelRepository(repository).versions(MODEL_NAME)  # InputError naming the model if absent
        self.version = f"{MODEL_NAME}/{versions[-1]}"
        self._backend = BlockingBackend(lambda: backend_from_setting(setting, repository))
        self._timeout_s = timeout_s
        self.max_batch = max(1, self._backend.signature(MODEL_NAME).max_batch_size)

    @property
    def infer(self) -> InferFunction:
        def run(batch: np.ndarray) -> np.ndarray:
            return self._backend.infer(
                MODEL_NAME, {INPUT_NAME: batch}, [OUTPUT_NAME], timeout_s=self._timeout_s
            )[OUTPUT_NAME]

        return run

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> UnetModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
