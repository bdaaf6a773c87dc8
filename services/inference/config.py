"""Read, write and derive Triton ``config.pbtxt`` files with Triton's own protobuf, never regexes.

The same text must load in NGC Triton (onnxruntime backend, GPU) in production, so it is parsed and
printed with ``tritonclient``'s ``model_config_pb2`` and protobuf's text format: a typo in a field
name fails here exactly as it would fail in the server.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from services.core.errors import InputError

ONNX_PLATFORM = "onnxruntime_onnx"

#: onnxruntime's type strings → Triton config data types.
_ORT_TO_TRITON = {
    "tensor(bool)": mc.TYPE_BOOL,
    "tensor(uint8)": mc.TYPE_UINT8,
    "tensor(uint16)": mc.TYPE_UINT16,
    "tensor(uint32)": mc.TYPE_UINT32,
    "tensor(uint64)": mc.TYPE_UINT64,
    "tensor(int8)": mc.TYPE_INT8,
    "tensor(int16)": mc.TYPE_INT16,
    "tensor(int32)": mc.TYPE_INT32,
    "tensor(int64)": mc.TYPE_INT64,
    "tensor(float16)": mc.TYPE_FP16,
    "tensor(float)": mc.TYPE_FP32,
    "tensor(double)": mc.TYPE_FP64,
}


def parse_config(text: str, source: str = "config.pbtxt") -> mc.ModelConfig:
    """Parse config.pbtxt text; a syntax or field error is an :class:`InputError` naming the file."""
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise InputError(f"not a valid Triton model config: {exc}", field=source) from exc
    return config


def read_config(path: Path) -> mc.ModelConfig:
    """Parse one ``config.pbtxt`` file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", field=str(path)) from exc
    return parse_config(text, str(path))


def format_config(config: mc.ModelConfig) -> str:
    """The config as Triton's text format (what goes into config.pbtxt)."""
    return text_format.MessageToString(config)


def onnx_signature(session: ort.InferenceSession) -> tuple[list[tuple[str, int, list[int]]], ...]:
    """(name, Triton type, dims with -1 for symbolic) for the inputs and outputs of an ONNX session."""

    def describe(args) -> list[tuple[str, int, list[int]]]:
        described = []
        for arg in args:
            if arg.type not in _ORT_TO_TRITON:
                raise InputError(f"unsupported ONNX tensor type {arg.type}", field=arg.name)
            dims = [d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape]
            described.append((arg.name, _ORT_TO_TRITON[arg.type], dims))
        return described

    return describe(session.get_inputs()), describe(session.get_outputs())


def config_from_onnx(
    name: str,
    session: ort.InferenceSession,
    *,
    max_batch_size: int,
    preferred_batch_sizes: tuple[int, ...] = (),
    max_queue_delay_us: int = 0,
    dynamic_batching: bool = True,
    instance_kind: str = "KIND_GPU",
    instance_count: int = 1,
) -> mc.ModelConfig:
    """Derive a complete config.pbtxt from an ONNX model's signature plus the serving settings.

    With ``max_batch_size > 0`` the ONNX model's first dimension must be the (symbolic) batch axis;
    Triton's dims leave it out. ``KIND_GPU`` is the production default (NGC Triton, onnxruntime on GPU).
    """
    inputs, outputs = onnx_signature(session)
    config = mc.ModelConfig(name=name, platform=ONNX_PLATFORM, max_batch_size=max_batch_size)
    for tensors, target in ((inputs, config.input), (outputs, config.output)):
        for tensor_name, data_type, dims in tensors:
            if max_batch_size > 0:
                if not dims or dims[0] != -1:
                    raise InputError(
                        f"max_batch_size={max_batch_size} needs a dynamic first (batch) axis, the ONNX shape is {dims}",
                        field=tensor_name,
                    )
                dims = dims[1:]
            target.add(name=tensor_name, data_type=data_type, dims=dims)
    if dynamic_batching and max_batch_size > 0:
        config.dynamic_batching.preferred_batch_size.extend(preferred_batch_sizes)
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    config.instance_group.add(kind=mc.ModelInstanceGroup.Kind.Value(instance_kind), count=instance_count)
    return config
