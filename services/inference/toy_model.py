"""A tiny real 3D conv net as ONNX, built with ``onnx.helper`` (no torch), for tests and benchmarks.

No trained model ships yet, but the runtime must be exercised end to end on a real ONNX graph with
the shape of the coming label-estimation U-Net: a ``[batch, 1, D, H, W]`` float32 volume in, a
same-sized probability map and a per-case score out. Weights are random but seeded, so the
numbers are reproducible; :func:`toy_weights` lets the benchmark build the same net in torch.
"""

from __future__ import annotations

import numpy as np

INPUT = "image"
OUTPUTS = ("probability", "score")


def toy_weights(channels: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """conv1 (3×3×3, 1→channels), conv2 (3×3×3, channels→channels), head (1×1×1, channels→1)."""
    rng = np.random.default_rng(seed)

    def conv(out_c: int, in_c: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        scale = 1.0 / np.sqrt(in_c * k**3)
        return (
            (rng.standard_normal((out_c, in_c, k, k, k)) * scale).astype(np.float32),
            (rng.standard_normal(out_c) * 0.1).astype(np.float32),
        )

    w1, b1 = conv(channels, 1, 3)
    w2, b2 = conv(channels, channels, 3)
    w3, b3 = conv(1, channels, 1)
    return {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3}


def toy_onnx(size: int | None = 16, channels: int = 4, seed: int = 0) -> bytes:
    """Serialized ONNX: ``image[N,1,s,s,s]`` → ``probability[N,1,s,s,s]``, ``score[N,1]``.

    ``size=None`` makes the spatial dims symbolic (a model that accepts any volume size).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spatial = [size] * 3 if size else ["depth", "height", "width"]
    weights = toy_weights(channels, seed)
    nodes = [
        helper.make_node("Conv", [INPUT, "w1", "b1"], ["c1"], pads=[1] * 6),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 6),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], [OUTPUTS[0]]),
        helper.make_node("ReduceMax", [OUTPUTS[0]], [OUTPUTS[1]], axes=[2, 3, 4], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "wlcad_toy_unet",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 1, *spatial])],
        [
            helper.make_tensor_value_info(OUTPUTS[0], TensorProto.FLOAT, ["batch", 1, *spatial]),
            helper.make_tensor_value_info(OUTPUTS[1], TensorProto.FLOAT, ["batch", 1]),
        ],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="wlcad")
    model.ir_version = 8  # readable by every onnxruntime wlcad supports (>= 1.17)
    onnx.checker.check_model(model)
    return model.SerializeToString()
