"""Core of wlcad: the geometry-true :class:`Volume`, its readers/writers and shared errors."""

from services.core.errors import InputError
from services.core.io import read_image, write_image
from services.core.volume import Volume

__all__ = ["InputError", "Volume", "read_image", "write_image"]
