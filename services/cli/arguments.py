"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence

#: Options whose values are comma-separated coordinates, which may start with a minus sign.
#: Options whose value may start with "-" (a negative coordinate; a negative shard index, which the
#: option's own check then refuses by name instead of argparse calling it a missing value).
COORDINATE_OPTIONS = (
    "--center-mm",
    "--center-voxel",
    "--long-axis-start-mm",
    "--long-axis-end-mm",
    "--shard",
)
_NUMBER_LIST = re.compile(r"^-[0-9.]")


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--center-mm -100.2,-2.1,28.6`` → ``--center-mm=-100.2,-2.1,28.6``.

    argparse takes a value starting with '-' for an option unless it is a plain negative number, so
    a negative coordinate list would be refused; joining it to its option keeps both forms working.
    """
    out: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in COORDINATE_OPTIONS and index + 1 < len(argv) and _NUMBER_LIST.match(argv[index + 1]):
            out.append(f"{token}={argv[index + 1]}")
            index += 2
        else:
            out.append(token)
            index += 1
    return out


def triplet(text: str) -> tuple[float, float, float]:
    """argparse type: ``X,Y,Z`` → three finite floats."""
    parts = [p for p in text.replace(" ", "").split(",") if p != ""]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected three numbers X,Y,Z, got {text!r}") from exc
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected three finite numbers X,Y,Z, got {text!r}")
    return values  # type: ignore[return-value]


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value
