"""Register a trained ONNX model into a model repository: file, config.pbtxt and card in one step.

Training calls :func:`register_onnx_model` after exporting its network, so every shipped model has
a config derived from the ONNX file itself (names, types, dims cannot drift) and a card whose
sha256 matches the file. ``wlcad models check`` then verifies the same three things.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import onnxruntime as ort

from services.core.errors import InputError
from services.inference.card import CARD_FILE, ModelCard, VersionCard, sha256_file
from services.inference.config import config_from_onnx, format_config, read_config
from services.inference.repository import CONFIG_FILE, ONNX_FILE

_REPO_ROOT = Path(__file__).resolve().parents[2]


def current_git_commit(cwd: Path = _REPO_ROOT) -> str:
    """HEAD of the wlcad checkout (with ``-dirty`` when tracked files changed), for the card."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True
    )
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def register_onnx_model(
    repository: Path | str,
    name: str,
    onnx_model: Path | str | bytes,
    *,
    command: str,
    data_manifest: str,
    seed: int,
    metrics: dict[str, float],
    git_commit: str | None = None,
    version: int | None = None,
    description: str = "",
    max_batch_size: int = 8,
    preferred_batch_sizes: tuple[int, ...] = (),
    max_queue_delay_us: int = 2000,
    dynamic_batching: bool = True,
    instance_kind: str = "KIND_GPU",
    instance_count: int = 1,
    notes: str = "",
    extra: dict | None = None,
) -> Path:
    """Write ``<repository>/<name>/<version>/model.onnx``, its config.pbtxt and card entry.

    ``notes`` and ``extra`` go into the version's card entry (e.g. a detector's operating points).

    ``onnx_model`` is a path or the serialized bytes (what ``torch.onnx.export`` writes to a BytesIO).
    ``version`` defaults to one above the highest existing one. config.pbtxt is regenerated from the
    ONNX file when this is the newest version (the one Triton's default policy serves); an older
    version only gets its file and card entry. Returns the ONNX path.
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise InputError(f"model names use letters, digits, '_' and '-', got {name!r}", field="name")
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    version = version if version is not None else (existing[-1] + 1 if existing else 1)
    if version < 1:
        raise InputError("versions start at 1", field="version")
    target = model_dir / str(version) / ONNX_FILE
    target.parent.mkdir(exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".onnx", delete=False) as handle:
        staged = Path(handle.name)
    try:
        if isinstance(onnx_model, bytes):
            staged.write_bytes(onnx_model)
        else:
            shutil.copyfile(onnx_model, staged)
        session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        config = config_from_onnx(
            name,
            session,
            max_batch_size=max_batch_size,
            preferred_batch_sizes=preferred_batch_sizes,
            max_queue_delay_us=max_queue_delay_us,
            dynamic_batching=dynamic_batching,
            instance_kind=instance_kind,
            instance_count=instance_count,
        )
        os.chmod(staged, 0o644)  # mkstemp makes it 0600; the repository is read by Triton as another user
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)
    if not existing or version >= existing[-1] or not (model_dir / CONFIG_FILE).is_file():
        (model_dir / CONFIG_FILE).write_text(format_config(config))
        read_config(model_dir / CONFIG_FILE)  # what we wrote must parse back
    versions: dict[str, VersionCard] = {}
    if (model_dir / CARD_FILE).is_file():  # a broken card raises: never silently drop its history
        card = ModelCard.read(model_dir)
        versions = dict(card.versions)
        description = description or card.description
    versions[str(version)] = VersionCard(
        command=command,
        data_manifest=data_manifest,
        seed=seed,
        git_commit=git_commit or current_git_commit(),
        metrics=dict(metrics),
        sha256=sha256_file(target),
        notes=notes,
        extra=dict(extra or {}),
    )
    ModelCard(name=name, description=description, versions=versions).write(model_dir)
    return target
