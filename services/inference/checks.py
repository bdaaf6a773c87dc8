"""Consistency checks of one repository model (what ``wlcad models check`` runs).

A model that parses but whose ONNX file disagrees with its config would fail only when Triton loads
it in production, and a card whose checksum does not match means nobody knows what was trained how;
both are caught here, before shipping.
"""

from __future__ import annotations

import onnxruntime as ort

from services.core.errors import InputError
from services.inference.card import ModelCard, sha256_file
from services.inference.config import ONNX_PLATFORM, onnx_signature
from services.inference.repository import ModelRepository


def check_model(repository: ModelRepository, name: str) -> list[str]:
    """Problems found with one model (empty list = good)."""
    problems: list[str] = []
    try:
        config = repository.config(name)
    except InputError as exc:
        return [str(exc)]
    if config.name and config.name != name:
        problems.append(f"config name {config.name!r} differs from its folder {name!r}")
    if config.platform != ONNX_PLATFORM and config.backend != "onnxruntime":
        problems.append(f"platform is {config.platform or config.backend!r}, expected {ONNX_PLATFORM!r}")
    if config.max_batch_size < 0:
        problems.append("max_batch_size must be >= 0")
    versions = repository.versions(name)
    if not versions:
        problems.append("no <version>/model.onnx")
    try:
        card = ModelCard.read(repository.root / name)
    except InputError as exc:
        problems.append(str(exc))
        card = None
    for version in versions:
        path = repository.onnx_path(name, version)
        problems += [f"version {version}: {p}" for p in _compare_signature(config, path)]
        if card is not None:
            entry = card.versions.get(str(version))
            if entry is None:
                problems.append(f"version {version}: no entry in the model card")
            elif entry.sha256 != sha256_file(path):
                problems.append(f"version {version}: sha256 of model.onnx does not match the model card")
    if card is not None:
        for version in sorted(set(card.versions) - {str(v) for v in versions}):
            problems.append(f"model card lists version {version} but {name}/{version}/model.onnx is missing")
    return problems


def _compare_signature(config, path) -> list[str]:
    """Compare the ONNX file's inputs/outputs (names, types, dims) with the config's."""
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated exception types for bad files
        return [f"onnxruntime cannot load {path.name}: {exc}"]
    inputs, outputs = onnx_signature(session)
    problems = []
    for kind, declared, actual in (("input", config.input, inputs), ("output", config.output, outputs)):
        onnx_by_name = {tensor_name: (dtype, dims) for tensor_name, dtype, dims in actual}
        config_names = [t.name for t in declared]
        if sorted(config_names) != sorted(onnx_by_name):
            problems.append(
                f"{kind} names {sorted(config_names)} differ from the ONNX model's {sorted(onnx_by_name)}"
            )
            continue
        for tensor in declared:
            dtype, dims = onnx_by_name[tensor.name]
            if dtype != tensor.data_type:
                problems.append(f"{kind} {tensor.name!r}: config type differs from the ONNX type")
            if config.max_batch_size > 0:
                if not dims or dims[0] != -1:
                    problems.append(
                        f"{kind} {tensor.name!r}: max_batch_size > 0 but the ONNX first axis is {dims[:1]}"
                    )
                    continue
                dims = dims[1:]
            config_dims = list(tensor.dims)
            if len(dims) != len(config_dims) or any(
                onnx_dim not in (-1, config_dim)
                for onnx_dim, config_dim in zip(dims, config_dims, strict=True)
            ):
                problems.append(
                    f"{kind} {tensor.name!r}: config dims {config_dims} differ from the ONNX dims {dims}"
                )
    return problems
