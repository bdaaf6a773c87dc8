"""Inference runtime: one :class:`InferenceBackend` interface over a Triton-layout model repository.

``embedded`` runs onnxruntime in-process; ``triton://host:port`` talks to a Triton server over gRPC.
``WLCAD_INFERENCE`` picks one (see :func:`backend_from_setting`), so services and training's
evaluation never care which is behind the interface. See docs/inference.md.
"""

from services.inference.backend import BlockingBackend, InferenceBackend
from services.inference.errors import InferenceError, InferenceUnavailableError
from services.inference.factory import backend_from_setting, default_repository
from services.inference.signature import ModelSignature, TensorSpec

__all__ = [
    "BlockingBackend",
    "InferenceBackend",
    "InferenceError",
    "InferenceUnavailableError",
    "ModelSignature",
    "TensorSpec",
    "backend_from_setting",
    "default_repository",
]
