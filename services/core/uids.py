"""The one check of a DICOM UID a client sends: it ends up in DICOMweb and CIRCUS URLs, so anything
but digits and dots (at most 64 characters, PS3.5 §9.1) is refused before a request is built."""

from __future__ import annotations

import re
from typing import Any

from services.core.errors import InputError

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def check_uid(value: Any, field: str) -> str:
    """``value`` when it is a DICOM UID.

    Raises:
        InputError: naming ``field`` when it is not a string of digits and dots of 1-64 characters.
    """
    if not isinstance(value, str) or not (0 < len(value) <= 64 and _UID.match(value)):
        raise InputError("must be a DICOM UID (digits and dots, at most 64)", field=field)
    return value
