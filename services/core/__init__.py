"""Core of wlcad: the geometry-true :class:`Volume`, its readers/writers and shared errors.

Names are imported lazily so that ``services.core.errors`` or ``services.core.volume`` can be used
without pulling in the DICOM/NIfTI/ITK codecs (training workers and light tools need only numpy).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "InputError": "services.core.errors",
    "Volume": "services.core.volume",
    "read_image": "services.core.io",
    "write_image": "services.core.io",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'services.core' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
