"""WADO-RS series fetch: wlcad's boundary splitter against ``dicomweb-client``, on a real Orthanc.

Issue 14 item 3 asks to use ``dicomweb-client`` where it serves and to keep the splitter of
``services/api/multipart.py`` (used by ``services.api.sources.volume_from_dicomweb``) only if it is
measured faster. Both paths here end in the same state, the series as Part 10 files in a folder (what
``read_image`` then reads, the same cost for both, so not timed):

1. splitter: one GET read into memory (``sources._fetch``, bounded), ``split_parts`` into views,
   each view written as-is;
2. dicomweb-client: :meth:`services.pacs.client.PacsClient.fetch_series`, streaming the answer,
   each part parsed by pydicom and written again (``dcmwrite``) — what ``wlcad pacs run`` does;
3. dicomweb-client raw: the same streamed request and multipart decoder, the parts written as-is
   (its private ``_http_get`` / ``_decode_multipart_message``): where the cost of 2 lies, decoding or
   pydicom's parse and re-encode.

A synthetic 512×512×N int16 CT (``--slices``, default 120: 60 MiB) is stored in a private Orthanc
(:mod:`services.servers.orthanc`); each path runs ``--repeats`` times, alternating, and the medians
and their ratio are printed. No asserts: the numbers are for the issue note.

Usage: .venv/bin/python bench/pacs.py [--slices 120] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from services.api.multipart import split_parts
from services.api.sources import _fetch
from services.core.volume import Volume
from services.pacs.client import PacsClient
from services.servers.orthanc import LocalOrthanc, available
from training.data.dicom_export import write_dicom_series


def splitter_fetch(url: str, folder: Path) -> int:
    """What ``volume_from_dicomweb`` does before reading: fetch, split, write the parts as they are."""
    content_type, body = _fetch(url, timeout_s=120.0)
    parts = split_parts(body, content_type)
    for number, part in enumerate(parts):
        (folder / f"{number:05d}.dcm").write_bytes(part)
    return len(parts)


def client_raw_fetch(client: PacsClient, url: str, folder: Path) -> int:
    """dicomweb-client's streamed multipart decoding without pydicom: parts written as they are."""
    inner = client._client
    accept = 'multipart/related; type="application/dicom"'
    response = inner._http_get(url, headers={"Accept": accept}, stream=True)
    count = 0
    for count, part in enumerate(inner._decode_multipart_message(response, stream=True), start=1):
        (folder / f"{count:05d}.dcm").write_bytes(part)
    return count


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not available():
        print("Orthanc with the DICOMweb plugin is not installed: nothing measured")
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-pacs-") as work:
        work = Path(work)
        rng = np.random.default_rng(0)
        volume = Volume(
            rng.normal(-800, 40, (args.slices, 512, 512)).astype(np.int16), (0.7, 0.7, 1.0), (0.0, 0.0, 0.0)
        )
        paths = write_dicom_series(volume, work / "series", uid_seed="bench-pacs")
        header = pydicom.dcmread(paths[0], stop_before_pixels=True)
        study, series = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
        size_mib = sum(p.stat().st_size for p in paths) / 2**20
        orthanc = LocalOrthanc(work / "orthanc").start(timeout_s=60)
        try:
            orthanc.upload(paths)
            url = f"{orthanc.dicomweb_url}/studies/{study}/series/{series}"
            client = PacsClient(orthanc.dicomweb_url, timeout_s=120)
            times: dict[str, list[float]] = {"splitter": [], "dicomweb-client": [], "dicomweb-client raw": []}
            for repeat in range(args.repeats + 1):  # the first round warms Orthanc's cache: dropped
                for name in times:
                    folder = work / f"{name}-{repeat}"
                    folder.mkdir()
                    if name == "splitter":
                        seconds = timed(splitter_fetch, url, folder)
                    elif name == "dicomweb-client":
                        seconds = timed(client.fetch_series, study, series, folder)
                    else:
                        seconds = timed(client_raw_fetch, client, url, folder)
                    if repeat:
                        times[name].append(seconds)
                    assert len(list(folder.iterdir())) == args.slices
        finally:
            orthanc.stop()
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"series: {args.slices} instances of 512×512 int16, {size_mib:.1f} MiB; {args.repeats} repeats")
    for name, values in times.items():
        print(f"  {name:20s} median {medians[name]:.3f} s  (min {min(values):.3f}, max {max(values):.3f})")
    for name in ("dicomweb-client", "dicomweb-client raw"):
        ratio = medians[name] / medians["splitter"]
        print(f"{name} / splitter = {ratio:.2f} (> 1: the splitter is faster)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
