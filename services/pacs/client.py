"""A bounded DICOMweb client: QIDO-RS search, WADO-RS series fetch and STOW-RS store.

The protocol work is ``dicomweb-client``'s (multipart encoding and decoding, retries on 429/503,
media types); this module adds what a clinical caller needs around it:

* the size of a series is asked first (QIDO-RS, instance level, Rows × Columns × frames × bytes)
  and a series over the service's limits (:mod:`services.api.limits`) is refused before any pixel is
  downloaded; while fetching, the bytes written are counted again (the answer may not match what the
  search said) and the fetch stops at the first instance past the limit;
* every call has a timeout: ``timeout_s`` for each connect and read, ``total_timeout_s`` for a whole
  fetch (checked between instances, as is a service request's deadline, :mod:`services.core.work_budget`);
* errors are typed: a missing study/series or a malformed UID is the caller's :class:`InputError`
  (exit 2, HTTP 4xx); a server that is down, slow or refuses is :class:`PacsUnavailableError`;
* nothing that names a patient is logged, and wlcad's own lines name no UID either (they say counts
  and sizes). ``dicomweb-client``'s own logger prints request URLs (study UIDs) at INFO
  and request headers (a bearer token) at DEBUG, so it is held at WARNING.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import requests

from services.api import limits
from services.core.errors import InputError
from services.core.uids import check_uid
from services.core.work_budget import checkpoint

log = logging.getLogger("wlcad.pacs")
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)

#: Instance-level attributes the size check asks QIDO-RS for.
_SIZE_FIELDS = ("Rows", "Columns", "NumberOfFrames", "BitsAllocated", "SamplesPerPixel")
#: DICOM JSON tags of those attributes (QIDO-RS answers are keyed by tag).
_TAGS = {
    "Rows": "00280010",
    "Columns": "00280011",
    "NumberOfFrames": "00280008",
    "BitsAllocated": "00280100",
    "SamplesPerPixel": "00280002",
    "SOPInstanceUID": "00080018",
    "SOPClassUID": "00080016",
    "SeriesInstanceUID": "0020000E",
    "Modality": "00080060",
}


class PacsUnavailableError(ConnectionError):
    """The DICOMweb server could not be reached, timed out, or refused for a reason not the caller's."""


def check_url(url: str, field: str = "url") -> str:
    """An ``http(s)://host[:port]/path`` DICOMweb root, without a trailing slash."""
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise InputError("must be an http:// or https:// DICOMweb root (no query)", field=field)
    return url.rstrip("/")


@dataclass(frozen=True)
class SeriesSize:
    """What QIDO-RS says a series holds. ``stated``: every instance gave Rows and Columns (when not,
    only the streamed byte count bounds the fetch)."""

    instances: int
    voxels: int
    pixel_bytes: int
    stated: bool
    modalities: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoredInstance:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class StoreResult:
    """The STOW-RS answer: what the server stored, and what it refused with its failure reason code."""

    stored: tuple[StoredInstance, ...]
    failed: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class FetchedSeries:
    """A series written to ``folder`` as ``00000.dcm``…, ``instances`` files, ``bytes`` on disk."""

    folder: Path
    instances: int
    bytes: int
    files: tuple[Path, ...] = field(default=(), repr=False)


def _value(item: dict, keyword: str, default: object = None) -> object:
    values = (item.get(_TAGS[keyword]) or {}).get("Value") or []
    return values[0] if values else default


def _int(value: object, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _write_instance(dataset: pydicom.Dataset, path: Path, number: int) -> None:
    """One fetched instance as a Part 10 file. Command Set elements (group 0000: DIMSE message
    fields some archives leave in stored files; the oblique brain MR sample has them) are dropped,
    as pydicom refuses to write them into a file and they belong to no stored instance."""
    try:
        with warnings.catch_warnings():  # pydicom warnings may quote values (patient names)
            warnings.simplefilter("ignore")
            for tag in [element.tag for element in dataset if element.tag.group == 0]:
                del dataset[tag]
            pydicom.dcmwrite(path, dataset, enforce_file_format=True)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise InputError(
            f"instance {number} could not be written as DICOM ({type(exc).__name__})", field="series"
        ) from None


class PacsClient:
    """One DICOMweb server. ``timeout_s`` bounds every connect and read; ``total_timeout_s`` a whole
    fetch. ``max_*`` default to the service's limits, so a PACS run accepts what an upload would:
    ``max_bytes`` bounds the pixels QIDO-RS states, ``max_fetch_bytes`` the files written while
    fetching (pixels plus headers: what a zipped series may unpack to)."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        total_timeout_s: float = 600.0,
        headers: dict[str, str] | None = None,
        max_instances: int = limits.MAX_ZIP_MEMBERS,
        max_voxels: int = limits.MAX_VOXELS,
        max_bytes: int = limits.MAX_UPLOAD_BYTES,
        max_fetch_bytes: int = limits.MAX_ZIP_UNCOMPRESSED_BYTES,
    ) -> None:
        from dicomweb_client import DICOMwebClient

        for name, value in (("timeout_s", timeout_s), ("total_timeout_s", total_timeout_s)):
            if not 0 < value <= 24 * 3600:
                raise InputError(f"must be > 0 and at most a day, got {value}", field=name)
        self.url = check_url(url)
        self.timeout_s = float(timeout_s)
        self.total_timeout_s = float(total_timeout_s)
        self.max_instances, self.max_voxels, self.max_bytes = max_instances, max_voxels, max_bytes
        self.max_fetch_bytes = max_fetch_bytes
        self._client = DICOMwebClient(self.url, headers=headers, timeout=self.timeout_s)
        self._client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=200)

    # -- errors ---------------------------------------------------------------------------------------

    def _call(self, what: str, call, *, missing: str = "", missing_field: str = "series"):
        """Run ``call()``; a 404 is ``missing`` (the caller's error), other failures the server's."""
        try:
            return call()
        except (InputError, PacsUnavailableError):
            raise
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code == 404 and missing:
                raise InputError(missing, field=missing_field) from None
            raise PacsUnavailableError(f"the DICOMweb server answered HTTP {code} while {what}") from None
        except requests.Timeout:
            raise PacsUnavailableError(
                f"the DICOMweb server did not answer within {self.timeout_s:g} s while {what}"
            ) from None
        except requests.RequestException as exc:
            raise PacsUnavailableError(
                f"the DICOMweb server is unreachable while {what} ({type(exc).__name__})"
            ) from None
        except ValueError as exc:  # dicomweb-client: an answer of the wrong media type or shape
            raise PacsUnavailableError(
                f"the DICOMweb server's answer is unusable while {what}: {exc}"
            ) from None

    # -- QIDO-RS --------------------------------------------------------------------------------------

    def search_instances(
        self, study: str, series: str | None = None, fields: Sequence[str] = ()
    ) -> list[dict]:
        """QIDO-RS instances of a study (and series): DICOM JSON items, as the server answers."""
        check_uid(study, "study")
        if series is not None:
            check_uid(series, "series")
        answer = self._call(
            "searching instances",
            lambda: self._client.search_for_instances(
                study_instance_uid=study, series_instance_uid=series, fields=list(fields) or None
            ),
        )
        return list(answer or [])

    def instance_uids(self, study: str, series: str) -> set[str]:
        """The SOP Instance UIDs QIDO-RS finds in a series (what a stored result is confirmed by)."""
        return {str(_value(item, "SOPInstanceUID", "")) for item in self.search_instances(study, series)}

    def series_size(self, study: str, series: str) -> SeriesSize:
        """The series' size from QIDO-RS alone (no pixel is fetched).

        Raises:
            InputError: naming ``series``: no instance found.
        """
        items = self.search_instances(study, series, (*_SIZE_FIELDS, "Modality"))
        if not items:
            raise InputError(
                "no such study/series on the DICOMweb server (QIDO-RS found no instance)", field="series"
            )
        voxels = pixel_bytes = 0
        stated = True
        for item in items:
            rows, columns = _int(_value(item, "Rows"), 0), _int(_value(item, "Columns"), 0)
            stated = stated and rows > 0 and columns > 0
            count = rows * columns * max(_int(_value(item, "NumberOfFrames"), 1), 1)
            per_voxel = max(_int(_value(item, "SamplesPerPixel"), 1), 1) * -(
                -max(_int(_value(item, "BitsAllocated"), 16), 1) // 8
            )
            voxels, pixel_bytes = voxels + count, pixel_bytes + count * per_voxel
        modalities = tuple(sorted({str(_value(i, "Modality", "")) for i in items} - {""}))
        return SeriesSize(len(items), voxels, pixel_bytes, stated, modalities)

    def check_size(self, size: SeriesSize) -> None:
        """Refuse a series over the limits (before it is fetched).

        Raises:
            InputError: naming ``series``.
        """
        if size.instances > self.max_instances:
            raise InputError(
                f"holds {size.instances} instances; at most {self.max_instances} are accepted", field="series"
            )
        if size.voxels > self.max_voxels:
            raise InputError(
                f"holds {size.voxels} voxels; at most {self.max_voxels} are accepted", field="series"
            )
        if size.pixel_bytes > self.max_bytes:
            raise InputError(
                f"holds {size.pixel_bytes} bytes of pixels; at most {self.max_bytes} are accepted",
                field="series",
            )

    # -- WADO-RS --------------------------------------------------------------------------------------

    def fetch_series(self, study: str, series: str, folder: Path) -> FetchedSeries:
        """WADO-RS: the series streamed instance by instance into ``folder`` (fixed names, never the
        server's), each written as it arrives; the byte total and ``total_timeout_s`` are checked after
        every instance, and a fetch that ends early leaves the files for the caller's temp folder.

        Call :meth:`series_size` and :meth:`check_size` first: this bounds what arrives, that refuses
        before anything does.

        Raises:
            InputError: naming ``series``: missing, empty, over the byte or instance limit.
            PacsUnavailableError: the server failed or the fetch ran past ``total_timeout_s``.
        """
        check_uid(study, "study")
        check_uid(series, "series")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        written: list[Path] = []
        total = 0

        def fetch() -> None:
            nonlocal total
            for dataset in self._client.iter_series(study, series):
                checkpoint("fetching from DICOMweb")  # a service request's deadline or cancel
                path = folder / f"{len(written):05d}.dcm"
                _write_instance(dataset, path, len(written) + 1)
                written.append(path)
                total += path.stat().st_size
                if len(written) > self.max_instances:
                    raise InputError(f"sent more than {self.max_instances} instances", field="series")
                if total > self.max_fetch_bytes:
                    raise InputError(f"sent more than {self.max_fetch_bytes} bytes", field="series")
                if time.monotonic() - started > self.total_timeout_s:
                    raise PacsUnavailableError(
                        f"the series did not arrive within {self.total_timeout_s:g} s "
                        f"({len(written)} instances so far)"
                    )

        self._call("fetching the series", fetch, missing="no such study/series on the DICOMweb server")
        if not written:
            raise InputError("the DICOMweb server sent no instance of the series", field="series")
        log.info("fetched %d instances, %d bytes, in %.1f s", len(written), total, time.monotonic() - started)
        return FetchedSeries(folder, len(written), total, tuple(written))

    # -- STOW-RS --------------------------------------------------------------------------------------

    def store(self, datasets: Iterable[pydicom.Dataset], study: str) -> StoreResult:
        """STOW-RS ``datasets`` into ``study``; what the server stored and what it refused.

        Raises:
            PacsUnavailableError: the server failed, or stored none of them.
        """
        check_uid(study, "study")
        datasets = list(datasets)
        answer = self._call(
            "storing results", lambda: self._client.store_instances(datasets, study_instance_uid=study)
        )
        stored = tuple(
            StoredInstance(str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
            for item in answer.get("ReferencedSOPSequence", [])
        )
        failed = tuple(
            (str(item.get("ReferencedSOPInstanceUID", "")), int(item.get("FailureReason", 0) or 0))
            for item in answer.get("FailedSOPSequence", [])
        )
        log.info("stored %d of %d objects (%d refused)", len(stored), len(datasets), len(failed))
        if datasets and not stored:
            raise PacsUnavailableError(f"the DICOMweb server stored none of the {len(datasets)} objects")
        return StoreResult(stored, failed)
