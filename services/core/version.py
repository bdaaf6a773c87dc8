"""The software version every output and response carries (a SEG's, a report's, ``Describe``'s)."""

from __future__ import annotations

import importlib.metadata


def software_version() -> str:
    """The installed wlcad version; ``0+source`` when running from a source tree without metadata."""
    try:
        return importlib.metadata.version("wlcad")
    except importlib.metadata.PackageNotFoundError:
        return "0+source"
