"""What a model takes and returns, read from Triton's own ``ModelConfig`` protobuf.

Both backends check every request against this before it runs, so a wrong tensor name, dtype or
shape fails with the same :class:`InputError` (naming the field) whether onnxruntime or Triton would
have rejected it, and before any work is queued.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from services.core.errors import InputError

#: Triton config data types ↔ numpy dtypes (the ones an ONNX model in wlcad can use).
_TRITON_TO_NUMPY: dict[int, np.dtype] = {
    mc.TYPE_BOOL: np.dtype(np.bool_),
    mc.TYPE_UINT8: np.dtype(np.uint8),
    mc.TYPE_UINT16: np.dtype(np.uint16),
    mc.TYPE_UINT32: np.dtype(np.uint32),
    mc.TYPE_UINT64: np.dtype(np.uint64),
    mc.TYPE_INT8: np.dtype(np.int8),
    mc.TYPE_INT16: np.dtype(np.int16),
    mc.TYPE_INT32: np.dtype(np.int32),
    mc.TYPE_INT64: np.dtype(np.int64),
    mc.TYPE_FP16: np.dtype(np.float16),
    mc.TYPE_FP32: np.dtype(np.float32),
    mc.TYPE_FP64: np.dtype(np.float64),
}
_NUMPY_TO_TRITON = {dtype: code for code, dtype in _TRITON_TO_NUMPY.items()}


def numpy_dtype(triton_type: int) -> np.dtype:
    """numpy dtype of a ``model_config.DataType`` value."""
    if triton_type not in _TRITON_TO_NUMPY:
        raise ValueError(f"unsupported tensor data type {mc.DataType.Name(triton_type)}")
    return _TRITON_TO_NUMPY[triton_type]


def triton_type(dtype: np.dtype) -> int:
    """``model_config.DataType`` value of a numpy dtype."""
    dtype = np.dtype(dtype)
    if dtype not in _NUMPY_TO_TRITON:
        raise ValueError(f"unsupported tensor dtype {dtype}")
    return _NUMPY_TO_TRITON[dtype]


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor. ``dims`` excludes the batch dimension when the model batches; -1 = any."""

    name: str
    dtype: np.dtype
    dims: tuple[int, ...]

    def full_shape(self, batch: int | None) -> tuple[int, ...]:
        """Shape including the batch dimension (when ``batch`` is given)."""
        return self.dims if batch is None else (batch, *self.dims)


@dataclass(frozen=True)
class ModelSignature:
    """Inputs, outputs and batching limit of one model, as its config.pbtxt states them."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    max_queue_delay_us: int = 0
    dynamic_batching: bool = False

    @property
    def batches(self) -> bool:
        return self.max_batch_size > 0

    @classmethod
    def from_config(cls, config: mc.ModelConfig) -> ModelSignature:
        def specs(tensors) -> tuple[TensorSpec, ...]:
            return tuple(
                TensorSpec(t.name, numpy_dtype(t.data_type), tuple(int(d) for d in t.dims)) for t in tensors
            )

        has_batching = config.HasField("dynamic_batching")
        return cls(
            name=config.name,
            inputs=specs(config.input),
            outputs=specs(config.output),
            max_batch_size=int(config.max_batch_size),
            max_queue_delay_us=int(config.dynamic_batching.max_queue_delay_microseconds)
            if has_batching
            else 0,
            dynamic_batching=has_batching,
        )

    def output(self, name: str) -> TensorSpec:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise InputError(
            f"model {self.name!r} has no output {name!r}; outputs: {', '.join(s.name for s in self.outputs)}",
            field=f"outputs.{name}",
        )

    def validate(self, inputs: Mapping[str, np.ndarray]) -> int | None:
        """Check names, dtypes and shapes; returns the request's batch size (None for non-batching models)."""
        expected = {spec.name for spec in self.inputs}
        for name in inputs:
            if name not in expected:
                raise InputError(
                    f"model {self.name!r} has no input {name!r}; inputs: {', '.join(sorted(expected))}",
                    field=f"inputs.{name}",
                )
        batch: int | None = None
        for spec in self.inputs:
            if spec.name not in inputs:
                raise InputError(
                    f"model {self.name!r} needs input {spec.name!r}", field=f"inputs.{spec.name}"
                )
            array = inputs[spec.name]
            field = f"inputs.{spec.name}"
            if not isinstance(array, np.ndarray):
                raise InputError(f"expected a numpy array, got {type(array).__name__}", field=field)
            if array.dtype != spec.dtype:
                raise InputError(
                    f"dtype {array.dtype}, model {self.name!r} expects {spec.dtype}", field=field
                )
            shape = array.shape
            if self.batches:
                if len(shape) != len(spec.dims) + 1:
                    raise InputError(
                        f"shape {shape} has rank {len(shape)}, model {self.name!r} expects "
                        f"[batch, {', '.join(map(str, spec.dims))}] (rank {len(spec.dims) + 1})",
                        field=field,
                    )
                if not 1 <= shape[0] <= self.max_batch_size:
                    raise InputError(
                        f"batch size {shape[0]} is outside 1..{self.max_batch_size} (max_batch_size)",
                        field=field,
                    )
                if batch is not None and shape[0] != batch:
                    raise InputError(f"batch size {shape[0]} differs from other inputs' {batch}", field=field)
                batch = shape[0]
                inner = shape[1:]
            else:
                inner = shape
            if len(inner) != len(spec.dims) or any(
                d != -1 and d != s for d, s in zip(spec.dims, inner, strict=True)
            ):
                raise InputError(
                    f"shape {shape} does not match the model's dims {list(spec.dims)}"
                    + (" after the batch dimension" if self.batches else ""),
                    field=field,
                )
        return batch
