"""Coverage-guided fuzzing (atheris) of the file readers a client's bytes reach: DICOM, NRRD, MHA,
MHD + raw, NIfTI and the CIRCUS CS input folder (``0.mhd`` + ``0.raw`` + ``0.json``).

Expected outcome for any input: a Volume or an ``InputError`` naming the field. Anything else is a
crash; a run longer than ``-timeout`` seconds is a hang. ``make test`` runs a short pass
(tests/test_serving_fuzz.py), ``make fuzz`` the long one (≥ 100,000 executions):

    .venv/bin/python tests/fuzz/fuzz_readers.py -atheris_runs=100000 [-timeout=10]

The readers are called directly (``services.core.io.read_image``), not through the service's guard
that turns any reader failure into an ``InputError`` — the stricter bar for the readers themselves —
after the service's header check (``check_declared_size``), which refuses files whose header asks
for more voxels than the service accepts before any reader allocates them.
Heavy libraries (numpy, scipy, SimpleITK) are imported before instrumentation to keep start-up
short; wlcad's readers, pydicom and nibabel are instrumented.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import atheris
import numpy  # noqa: F401 - imported before instrumentation on purpose
import scipy.ndimage  # noqa: F401
import SimpleITK  # noqa: F401

with atheris.instrument_imports():
    import pydicom  # noqa: F401

    from services.api.sources import check_declared_size
    from services.core.errors import InputError
    from services.core.io import read_image

warnings.simplefilter("ignore")
SUFFIXES = (".dcm", ".nrrd", ".mha", ".nii", ".mhd", "circus")
_WORK = Path(tempfile.mkdtemp(prefix="wlcad-fuzz-"))


def _split(data: bytes, parts: int) -> list[bytes]:
    step = max(1, len(data) // parts)
    return [data[i * step : (i + 1) * step] if i < parts - 1 else data[i * step :] for i in range(parts)]


def one_input(data: bytes) -> None:
    if not data:
        return
    kind, body = SUFFIXES[data[0] % len(SUFFIXES)], data[1:]
    for old in _WORK.iterdir():
        old.unlink()
    try:
        if kind == "circus":
            header, raw, tags = _split(body, 3)
            (_WORK / "0.mhd").write_bytes(header)
            (_WORK / "0.raw").write_bytes(raw)
            (_WORK / "0.json").write_bytes(tags)
            check_declared_size(_WORK / "0.mhd", "image")
            read_image(_WORK)
        elif kind == ".mhd":
            header, raw = _split(body, 2)
            (_WORK / "image.mhd").write_bytes(header)
            (_WORK / "image.raw").write_bytes(raw)
            check_declared_size(_WORK / "image.mhd", "image")
            read_image(_WORK / "image.mhd")
        else:
            (_WORK / f"image{kind}").write_bytes(body)
            check_declared_size(_WORK / f"image{kind}", "image")
            read_image(_WORK / f"image{kind}")
    except InputError:
        pass
    except MemoryError:
        pass  # a header asking for more memory than the machine has; the service maps it to RESOURCE_EXHAUSTED


def seeds() -> list[bytes]:
    """Valid starting points so coverage begins inside the parsers, not at their first check."""
    return [
        bytes([SUFFIXES.index(".nrrd")])
        + b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nspacings: 1 1 1\nencoding: raw\nendian: little\n\n"
        + b"\0" * 16,
        bytes([SUFFIXES.index(".mhd")])
        + b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = image.raw\n"
        + b"\0" * 16,
        bytes([SUFFIXES.index(".dcm")]) + b"\0" * 128 + b"DICM" + b"\2\0\1\0OB\0\0\2\0\0\0\0\1",
    ]


def main() -> None:
    corpus = Path(tempfile.mkdtemp(prefix="wlcad-fuzz-corpus-"))
    for number, seed in enumerate(seeds()):
        (corpus / f"seed-{number}").write_bytes(seed)
    argv = [*sys.argv, str(corpus)]
    if not any(a.startswith("-timeout=") for a in argv):
        argv.insert(1, "-timeout=10")
    if not any(a.startswith("-max_len=") for a in argv):
        argv.insert(1, "-max_len=4096")
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
