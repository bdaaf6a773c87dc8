"""A small, bounded client of the CIRCUS DB API and CIRCUS RS (the calls the label sync needs).

Contract (utrad-ical/circus, ``packages/circus-api/src/api/{cases,blob}/index.{yaml,ts}`` and
``packages/circus-rs/src/server/app/series/{metadata,volume}.ts``):

* ``GET {api}/cases/:caseId`` → the case: ``{"caseId", "projectId", "revisions": [...], ...}``
  (CIRCUS drops ``latestRevision`` from this answer: the last of ``revisions`` is the latest).
* ``GET {rs}/series/{uid}/metadata`` → ``{"voxelCount": [x,y,z], "voxelSize": [mm x3],
  "pixelFormat": "int16"|..., "mode": "3d"|"2d", ...}``; ``start``/``end``/``delta`` select a partial
  volume.
* ``GET {rs}/series/{uid}/volume`` → the raw voxels, little-endian, x fastest, then y, then z.
* ``PUT {api}/blob/{sha1}`` (``application/octet-stream``): 201; CIRCUS refuses an empty body, a sha1
  that is not the body's, and bodies over 20 MB.
* ``POST {api}/cases/:caseId/revision`` with ``{"description", "attributes", "status", "series"}``
  (every field but ``date``/``creator``, which CIRCUS sets and refuses from a client): 201. Every voxel
  label's blob must have been stored first.

Every request carries ``Authorization: Bearer <token>`` (the token comes from an environment variable,
never a command-line argument, and is never logged), has a timeout, and reads at most a stated number
of bytes (a ``Content-Length`` over the bound is refused before the body is read). Redirects are not
followed: urllib would resend the Bearer token to wherever a redirect points.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.core.errors import InputError
from services.core.uids import check_uid

__all__ = [
    "CircusDbClient",
    "CircusDbError",
    "CircusRefusedError",
    "CircusUnavailableError",
    "SeriesMetadata",
]

log = logging.getLogger(__name__)

DEFAULT_TOKEN_ENV = "WLCAD_CIRCUS_TOKEN"
#: CIRCUS's own limit on a blob (``rawBody(incoming, { limit: '20mb' })`` in api/blob/index.ts).
MAX_BLOB_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_JSON_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_VOLUME_BYTES = 2 * 1024**3
DEFAULT_TIMEOUT_S = 30.0
#: Bytes per voxel of the CIRCUS RS pixel formats wlcad reads (circus-lib/src/PixelFormat.ts).
PIXEL_FORMATS: dict[str, np.dtype] = {
    "uint8": np.dtype("<u1"),
    "int8": np.dtype("<i1"),
    "uint16": np.dtype("<u2"),
    "int16": np.dtype("<i2"),
}
_CASE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
REVISION_FIELDS = ("description", "attributes", "status", "series")


class CircusDbError(Exception):
    """CIRCUS did not do what was asked; ``status`` is the HTTP status when there was an answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class CircusUnavailableError(CircusDbError):
    """No usable answer: unreachable, timed out, a 5xx, or an answer over its byte bound."""


class CircusRefusedError(CircusDbError):
    """A 4xx: the token, the case or the request was refused."""


@dataclass(frozen=True)
class SeriesMetadata:
    """What CIRCUS RS says about a series' volume: its voxel counts, voxel size (mm), pixel format."""

    voxel_count_xyz: tuple[int, int, int]
    voxel_size_mm: tuple[float, float, float]
    pixel_format: str
    mode: str

    @property
    def volume_bytes(self) -> int:
        return int(np.prod(self.voxel_count_xyz)) * PIXEL_FORMATS[self.pixel_format].itemsize


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise CircusRefusedError(
            f"answered a redirect ({code}); not followed (the token would go with it)", code
        )


def check_case_id(case_id: str) -> str:
    if not isinstance(case_id, str) or not _CASE_ID.match(case_id):
        raise InputError("must be 1-64 letters, digits, '_' or '-' (a CIRCUS case id)", field="case_id")
    return case_id


def _short(body: bytes) -> str:
    """A server's error text, shortened and printable: it goes into one line of a log or a message."""
    text = body[:400].decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            text = parsed["error"]
    except ValueError:
        pass
    return "".join(c if c.isprintable() else " " for c in text)[:160]


class CircusDbClient:
    """The calls of the label sync, each bounded. ``base_url``: the CIRCUS server (``http(s)://host:port``);
    the API lives under ``{base_url}/api`` and CIRCUS RS under ``{base_url}/rs`` unless given apart."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        api_url: str | None = None,
        rs_url: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_json_bytes: int = DEFAULT_MAX_JSON_BYTES,
        max_volume_bytes: int = DEFAULT_MAX_VOLUME_BYTES,
    ) -> None:
        self.api_url = _checked_url(api_url or base_url.rstrip("/") + "/api", "url")
        self.rs_url = _checked_url(rs_url or base_url.rstrip("/") + "/rs", "rs_url")
        if not isinstance(token, str) or not token or any(not c.isprintable() or c.isspace() for c in token):
            raise InputError("the CIRCUS token is empty or holds spaces/control characters", field="token")
        self._authorization = f"Bearer {token}"
        if not (math.isfinite(timeout_s) and 0 < timeout_s <= 3600):
            raise InputError(f"must be in (0, 3600] s, got {timeout_s}", field="timeout_s")
        for name, value in (("max_json_bytes", max_json_bytes), ("max_volume_bytes", max_volume_bytes)):
            if not isinstance(value, int) or value < 1:
                raise InputError(f"must be a positive integer, got {value!r}", field=name)
        self.timeout_s = float(timeout_s)
        self.max_json_bytes = max_json_bytes
        self.max_volume_bytes = max_volume_bytes
        self._opener = urllib.request.build_opener(_NoRedirect())

    @classmethod
    def from_env(cls, base_url: str, token_env: str = DEFAULT_TOKEN_ENV, **options: Any) -> CircusDbClient:
        """The client with its token read from the environment variable ``token_env``."""
        token = os.environ.get(token_env, "")
        if not token:
            raise InputError(f"set ${token_env} to the CIRCUS API token", field="token")
        return cls(base_url, token, **options)

    # -- the calls ------------------------------------------------------------------------------

    def get_case(self, case_id: str) -> dict[str, Any]:
        case = self._json("GET", f"{self.api_url}/cases/{check_case_id(case_id)}")
        if not isinstance(case, dict) or not isinstance(case.get("revisions"), list) or not case["revisions"]:
            raise CircusUnavailableError("the case answer has no revisions")
        return case

    def series_metadata(self, series_uid: str, partial: Mapping[str, int] | None = None) -> SeriesMetadata:
        url = f"{self.rs_url}/series/{check_uid(series_uid, 'seriesUid')}/metadata{_partial_query(partial)}"
        meta = self._json("GET", url)
        if not isinstance(meta, dict):
            raise CircusUnavailableError("the metadata answer is not an object")
        count, size, fmt = meta.get("voxelCount"), meta.get("voxelSize"), meta.get("pixelFormat")
        if not (
            isinstance(count, list)
            and len(count) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in count)
        ):
            raise CircusUnavailableError(f"voxelCount is not 3 positive integers: {count!r:.60}")
        if not (
            isinstance(size, list)
            and len(size) == 3
            and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in size)
        ):
            raise CircusUnavailableError(f"voxelSize is not 3 positive numbers: {size!r:.60}")
        if fmt not in PIXEL_FORMATS:
            raise InputError(
                f"pixel format {str(fmt)[:16]!r} is not one wlcad estimates on ({', '.join(PIXEL_FORMATS)})",
                field="pixelFormat",
            )
        metadata = SeriesMetadata(
            tuple(int(v) for v in count), tuple(float(v) for v in size), fmt, str(meta.get("mode", "3d"))
        )
        if metadata.volume_bytes > self.max_volume_bytes:
            raise InputError(
                f"the volume is {metadata.volume_bytes} bytes, over the bound of {self.max_volume_bytes}",
                field="max_volume_bytes",
            )
        return metadata

    def series_volume(
        self, series_uid: str, metadata: SeriesMetadata, partial: Mapping[str, int] | None = None
    ) -> np.ndarray:
        """The voxels as an array (z, y, x) of the metadata's pixel format; exactly that many bytes."""
        url = f"{self.rs_url}/series/{check_uid(series_uid, 'seriesUid')}/volume{_partial_query(partial)}"
        expected = metadata.volume_bytes
        body = self._request("GET", url, limit=expected, accept="application/octet-stream")
        if len(body) != expected:
            raise CircusUnavailableError(f"the volume has {len(body)} bytes, the metadata says {expected}")
        x, y, z = metadata.voxel_count_xyz
        return np.frombuffer(body, dtype=PIXEL_FORMATS[metadata.pixel_format]).reshape(z, y, x)

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` under its sha1 (what a voxel label names); returns the sha1."""
        if not data:
            raise InputError("a blob cannot be empty (CIRCUS refuses it)", field="voxels")
        if len(data) > MAX_BLOB_BYTES:
            raise InputError(
                f"{len(data)} bytes, over CIRCUS's {MAX_BLOB_BYTES}-byte blob limit", field="voxels"
            )
        sha1 = hashlib.sha1(data).hexdigest()
        self._request(
            "PUT", f"{self.api_url}/blob/{sha1}", body=data, content_type="application/octet-stream"
        )
        return sha1

    def post_revision(self, case_id: str, revision: Mapping[str, Any]) -> None:
        """Add ``revision`` to the case; its voxel labels' blobs must be stored already."""
        keys = set(revision)
        if keys != set(REVISION_FIELDS):
            raise InputError(
                f"a revision has exactly {', '.join(REVISION_FIELDS)} (CIRCUS sets date and creator), "
                f"got {', '.join(sorted(keys))}",
                field="revision",
            )
        for entry in revision["series"]:
            check_uid(entry.get("seriesUid"), "seriesUid")
            for label in entry.get("labels", []):
                voxels = label.get("data", {}).get("voxels") if label.get("type") == "voxel" else None
                if voxels is not None and not _SHA1.match(str(voxels)):
                    raise InputError("a voxel label's 'voxels' must be a sha1 (hex)", field="revision")
        body = json.dumps(revision, separators=(",", ":")).encode()
        self._request(
            "POST",
            f"{self.api_url}/cases/{check_case_id(case_id)}/revision",
            body=body,
            content_type="application/json",
        )

    # -- transport ------------------------------------------------------------------------------

    def _json(self, method: str, url: str) -> Any:
        body = self._request(method, url, limit=self.max_json_bytes, accept="application/json")
        try:
            return json.loads(body)
        except ValueError:
            raise CircusUnavailableError("the answer is not JSON") from None

    def _request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        content_type: str | None = None,
        limit: int = 64 * 1024,
        accept: str = "application/json",
    ) -> bytes:
        headers = {"Authorization": self._authorization, "Accept": accept, "Accept-Encoding": "identity"}
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        path = urllib.parse.urlsplit(url).path
        try:
            with self._opener.open(request, timeout=self.timeout_s) as answer:
                length = answer.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > limit:
                    raise CircusUnavailableError(
                        f"{method} {path}: {length} bytes, over the bound of {limit}"
                    )
                data = answer.read(limit + 1)
                if len(data) > limit:
                    raise CircusUnavailableError(f"{method} {path}: more than the bound of {limit} bytes")
                log.info("%s %s: %d, %d bytes", method, _redacted(path), answer.status, len(data))
                return data
        except urllib.error.HTTPError as exc:
            detail = _short(exc.read(4096) if exc.fp is not None else b"")
            kind = CircusRefusedError if 400 <= exc.code < 500 else CircusUnavailableError
            raise kind(f"{method} {_redacted(path)}: HTTP {exc.code}: {detail}", exc.code) from None
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CircusUnavailableError(
                f"{method} {_redacted(path)}: {type(reason).__name__}: {reason}"
            ) from None


def _redacted(path: str) -> str:
    """A request path for a log line with series UIDs left out (they identify a study)."""
    return re.sub(r"/series/[0-9.]+/", "/series/<uid>/", path)


def _checked_url(url: str, field: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise InputError(f"needs an http(s)://host[:port][/path] URL, got {url[:80]!r}", field=field)
    return url.rstrip("/")


def _partial_query(partial: Mapping[str, int] | None) -> str:
    """The partial-volume descriptor (``start``, ``end``, ``delta``) as CIRCUS RS's query."""
    if not partial:
        return ""
    query = {}
    for key in ("start", "end", "delta"):
        if key in partial:
            value = partial[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise InputError(f"{key} must be an integer, got {value!r}", field="partialVolumeDescriptor")
            query[key] = value
    return "?" + urllib.parse.urlencode(query) if query else ""
