"""Pick the backend from one setting: ``WLCAD_INFERENCE=embedded`` (default) or ``triton://host:port``.

Every service and training's evaluation call :func:`backend_from_setting`, so moving inference from
in-process onnxruntime to a Triton server is a deployment change, not a code change.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from services.core.errors import InputError
from services.inference.backend import BlockingBackend, InferenceBackend

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[2]
SETTING = "WLCAD_INFERENCE"


def default_repository() -> Path:
    """``$WLCAD_MODEL_REPOSITORY`` or ``<repo>/model_repository`` (what ``wlcad info`` shows too)."""
    return Path(os.environ.get("WLCAD_MODEL_REPOSITORY", _REPO_ROOT / "model_repository"))


def resolve_setting(setting: str | None = None) -> str:
    """The backend setting in effect: ``setting``, else ``$WLCAD_INFERENCE``, else "embedded"."""
    return (setting if setting is not None else os.environ.get(SETTING, "")).strip() or "embedded"


def backend_from_setting(
    setting: str | None = None, repository: Path | str | None = None, **options
) -> InferenceBackend:
    """Build the configured backend (call inside the event loop that will use it).

    ``options`` go to the backend's constructor (e.g. ``deadline_s`` for Triton).
    """
    setting = resolve_setting(setting)
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


class BackendProbe:
    """Whether the configured backend can serve ``models`` now: a service's readiness.

    Calling it answers within ``timeout_s`` and never raises (an unreachable or misconfigured
    backend is simply not ready). The embedded backend is in-process and always ready; a Triton
    server is asked through a client of the probe's own, made on the first call and kept, so a
    probe every second costs two health RPCs on an open channel."""

    def __init__(
        self,
        setting: str | None = None,
        repository: Path | str | None = None,
        models: Sequence[str] = (),
        timeout_s: float = 1.0,
    ) -> None:
        self.setting = resolve_setting(setting)
        self.repository = repository
        self.models = tuple(models)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._backend: BlockingBackend | None = None

    def __call__(self) -> bool:
        if self.setting == "embedded":
            return True
        try:
            with self._lock:
                if self._backend is None:
                    self._backend = BlockingBackend(
                        lambda: backend_from_setting(self.setting, self.repository)
                    )
                return self._backend.ready(self.timeout_s, self.models)
        except Exception as exc:  # any failure to ask means "not ready"; the reason is for the log
            log.info("inference backend %s not ready: %s", self.setting, type(exc).__name__)
            return False

    def close(self) -> None:
        with self._lock:
            if self._backend is not None:
                self._backend.close()
                self._backend = None
