"""Pick the backend from one setting: ``WLCAD_INFERENCE=embedded`` (default) or ``triton://host:port``.

Every service and training's evaluation call :func:`backend_from_setting`, so moving inference from
in-process onnxruntime to a Triton server is a deployment change, not a code change.
"""

from __future__ import annotations

import os
from pathlib import Path

from services.core.errors import InputError
from services.inference.backend import InferenceBackend

_REPO_ROOT = Path(__file__).resolve().parents[2]
SETTING = "WLCAD_INFERENCE"


def default_repository() -> Path:
    """``$WLCAD_MODEL_REPOSITORY`` or ``<repo>/model_repository`` (what ``wlcad info`` shows too)."""
    return Path(os.environ.get("WLCAD_MODEL_REPOSITORY", _REPO_ROOT / "model_repository"))


def backend_from_setting(
    setting: str | None = None, repository: Path | str | None = None, **options
) -> InferenceBackend:
    """Build the configured backend (call inside the event loop that will use it).

    ``options`` go to the backend's constructor (e.g. ``deadline_s`` for Triton).
    """
    setting = (setting if setting is not None else os.environ.get(SETTING, "")).strip() or "embedded"
    if setting == "embedded":
        from services.inference.embedded import EmbeddedBackend

        return EmbeddedBackend(repository or default_repository(), **options)
    if setting.startswith("triton://"):
        address = setting.removeprefix("triton://").rstrip("/")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise InputError(f"expected triton://host:port, got {setting!r}", field=SETTING)
        from services.inference.triton import TritonBackend

        return TritonBackend(address, **options)
    raise InputError(f"expected 'embedded' or 'triton://host:port', got {setting!r}", field=SETTING)
