"""CIRCUS DB labels and the label sync, against a fake CIRCUS server written from the contract.

The fake (a real HTTP server on a thread; the CLI runs as its own process) does what CIRCUS's
api/cases, api/blob and circus-rs series routes do where the sync depends on it: Bearer auth (401
with ``WWW-Authenticate``), ``GET /api/cases/:id`` without ``latestRevision``, RS metadata and raw
little-endian volume, ``PUT /api/blob/:sha1`` refusing an empty body or a hash mismatch, and
``POST /api/cases/:id/revision`` refusing ``date``/``creator`` and voxel labels whose blob is missing.
It records every request so the tests can check what the client sent.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from services.circus_db.client import CircusDbClient, CircusRefusedError, CircusUnavailableError
from services.circus_db.labels import circus_mm_to_voxel, weak_labels
from services.circus_db.sync import WLCAD_LABEL_PREFIX, circus_volume, sync_case
from services.core.errors import InputError
from services.core.volume import Volume
from services.label_estimation.circus_label import unpack_circus_voxels
from tests.conftest import run_cli

TOKEN = "s3cret-token-for-tests"
CASE_ID = "01gtestcase0000000000000000"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1"
SPACING = (0.8, 0.8, 2.0)
SHAPE_XYZ = (64, 64, 24)
#: Two nodules (voxel index x, y, z; radius mm) in lung-like background, as CIRCUS stores the volume.
NODULES = (((20.0, 24.0, 10.0), 6.0), ((44.0, 40.0, 14.0), 5.0))


def _phantom() -> np.ndarray:
    """int16 HU, (z, y, x): -800 background, +40 spheres (exact in mm on CIRCUS's grid)."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in SHAPE_XYZ[::-1]), indexing="ij")
    out = np.full(SHAPE_XYZ[::-1], -800, dtype=np.int16)
    for (cx, cy, cz), r in NODULES:
        d2 = ((x - cx) * SPACING[0]) ** 2 + ((y - cy) * SPACING[1]) ** 2 + ((z - cz) * SPACING[2]) ** 2
        out[d2 <= r * r] = 40
    return out


def _circus_mm(index: tuple[float, float, float]) -> list[float]:
    """Voxel index → CIRCUS volume mm (voxel i spans [i·s, (i+1)·s))."""
    return [(i + 0.5) * s for i, s in zip(index, SPACING, strict=True)]


def _reader_labels() -> list[dict]:
    (c1, r1), (c2, r2) = NODULES
    centre1, centre2 = np.asarray(_circus_mm(c1)), np.asarray(_circus_mm(c2))
    return [
        {
            "type": "ellipsoid",
            "name": "nodule A",
            "data": {
                "min": (centre1 - r1).tolist(),
                "max": (centre1 + r1).tolist(),
                "color": "#ff0000",
                "alpha": 1,
            },
        },
        {"type": "point", "data": {"location": centre2.tolist()}},
        {
            "type": "ruler",
            "data": {
                "section": {"origin": [0, 0, centre2[2]], "xAxis": [51.2, 0, 0], "yAxis": [0, 51.2, 0]},
                "start": np.subtract(centre2, [r2, 0, 0]).tolist(),
                "end": np.add(centre2, [r2, 0, 0]).tolist(),
            },
        },
        {"type": "polyline", "data": {"points": [[1, 1], [5, 5]], "z": 3}},
    ]


class FakeCircus:
    """State and request log of the fake server."""

    def __init__(self, labels: list[dict], volume: np.ndarray, redirect_to: str | None = None) -> None:
        self.case = {
            "caseId": CASE_ID,
            "projectId": "p1",
            "tags": [],
            "revisions": [
                {
                    "creator": "reader@example.org",
                    "date": "2026-01-01T00:00:00Z",
                    "description": "reader labels",
                    "attributes": {"reviewed": True},
                    "status": "approved",
                    "series": [
                        {
                            "seriesUid": SERIES_UID,
                            "partialVolumeDescriptor": {"start": 1, "end": 24, "delta": 1},
                            "labels": labels,
                        }
                    ],
                }
            ],
        }
        self.volume = volume
        self.blobs: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.redirect_to = redirect_to
        self.extra_volume_bytes = 0


def _handler(state: FakeCircus):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _send(
            self, status: int, body: bytes = b"", content_type: str = "application/json", headers=()
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in headers:
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._send(status, json.dumps({"error": message}).encode())

        def _handle(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            state.requests.append(
                {"method": method, "path": self.path, "headers": dict(self.headers), "body": body}
            )
            if state.redirect_to:
                self._send(302, b"", headers=[("Location", state.redirect_to + self.path)])
                return
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._send(
                    401,
                    b'{"error":"Access denied"}',
                    headers=[("WWW-Authenticate", 'Bearer realm="CircusRS"')],
                )
                return
            path = self.path.partition("?")[0]
            if method == "GET" and path == f"/api/cases/{CASE_ID}":
                self._send(200, json.dumps(state.case).encode())
            elif method == "GET" and path.startswith("/api/cases/"):
                self._error(404, "Not found")
            elif method == "GET" and path == f"/rs/series/{SERIES_UID}/metadata":
                z, y, x = state.volume.shape
                meta = {
                    "voxelCount": [x, y, z],
                    "voxelSize": list(SPACING),
                    "pixelFormat": "int16",
                    "mode": "3d",
                    "dicomWindow": {"level": -600, "width": 1500},
                }
                self._send(200, json.dumps(meta).encode())
            elif method == "GET" and path == f"/rs/series/{SERIES_UID}/volume":
                data = state.volume.astype("<i2").tobytes() + b"\0" * state.extra_volume_bytes
                self._send(200, data, "application/octet-stream")
            elif method == "PUT" and (m := re.fullmatch(r"/api/blob/([0-9a-f]{40})", path)):
                if not body:
                    self._error(400, "Empty content was sent.")
                elif hashlib.sha1(body).hexdigest() != m.group(1):
                    self._error(400, "Hash mismatch.")
                else:
                    state.blobs[m.group(1)] = body
                    self._send(201)
            elif method == "POST" and path == f"/api/cases/{CASE_ID}/revision":
                revision = json.loads(body)
                if "date" in revision or "creator" in revision:
                    self._error(400, "You cannot specify revision date.")
                    return
                if set(revision) != {"description", "attributes", "status", "series"}:
                    self._error(400, "Bad request body.")
                    return
                missing = [
                    label["data"]["voxels"]
                    for s in revision["series"]
                    for label in s["labels"]
                    if label["type"] == "voxel" and label["data"]["voxels"] not in state.blobs
                ]
                if missing:
                    self._error(400, f"Some voxel data are missing ({', '.join(missing)}). Store them first.")
                    return
                state.case["revisions"].append(revision | {"date": "now", "creator": "wlcad@example.org"})
                self._send(201)
            else:
                self._error(404, "no route")

        def do_GET(self) -> None:
            self._handle("GET")

        def do_PUT(self) -> None:
            self._handle("PUT")

        def do_POST(self) -> None:
            self._handle("POST")

    return Handler


@pytest.fixture
def circus():
    """(url, state) of a running fake CIRCUS; stopped after the test."""
    servers = []

    def start(labels: list[dict] | None = None, redirect_to: str | None = None):
        state = FakeCircus(_reader_labels() if labels is None else labels, _phantom(), redirect_to)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", state

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# -- labels -----------------------------------------------------------------------------------------


def test_ellipsoid_box_becomes_centre_axes_and_diameter_in_world_mm():
    volume = Volume(np.zeros((4, 8, 8), np.int16), (2.0, 2.0, 5.0), origin=(10.0, 20.0, 30.0))
    found = weak_labels([{"type": "ellipsoid", "data": {"min": [2, 2, 5], "max": [6, 10, 15]}}], volume)
    (lesion,) = found.lesions
    # centre (4, 6, 10) CIRCUS mm → voxel (1.5, 2.5, 1.5) → world origin + index · spacing
    assert lesion.center_voxel == pytest.approx((1.5, 2.5, 1.5))
    assert lesion.prompt.center_mm == pytest.approx((13.0, 25.0, 37.5))
    assert lesion.prompt.axes_mm == pytest.approx((4.0, 8.0, 10.0))
    assert lesion.prompt.diameter_mm == pytest.approx(10.0)
    assert lesion.kind == "ellipsoid" and lesion.prompt.lesion_id == 1


def test_point_takes_the_ruler_that_measures_it_and_a_lone_ruler_is_its_own_lesion():
    volume = circus_volume(np.zeros((24, 64, 64), np.int16), SPACING)
    labels = [
        {
            "type": "ruler",
            "data": {"section": {}, "start": [30, 30, 20], "end": [38, 30, 20]},
        },  # far from the point
        {"type": "point", "data": {"location": [10, 10, 10]}},
        {"type": "ruler", "data": {"section": {}, "start": [7, 10, 10], "end": [13, 10, 10]}},
        {"type": "point", "data": {"location": [45, 45, 30]}},  # no ruler near: no size
        {"type": "voxel", "data": {"voxels": None}},
    ]
    found = weak_labels(labels, volume)
    kinds = [(w.kind, w.source) for w in found.lesions]
    assert kinds == [("point+ruler", (1, 2)), ("ruler", (0,))]
    paired, lone = found.lesions
    # circus_volume puts CIRCUS mm on the world axes exactly
    assert paired.prompt.center_mm == pytest.approx(
        (10, 10, 10)
    ) and paired.prompt.diameter_mm == pytest.approx(6)
    assert lone.prompt.center_mm == pytest.approx((34, 30, 20)) and lone.prompt.diameter_mm == pytest.approx(
        8
    )
    assert {(s.index, s.type) for s in found.skipped} == {(3, "point"), (4, "voxel")}
    assert circus_mm_to_voxel(volume, [0.4, 0.4, 1.0]).tolist() == pytest.approx([0.0, 0.0, 0.0])


@pytest.mark.parametrize(
    ("label", "field"),
    [
        ({"type": "ellipsoid", "data": {"min": [5, 5, 5], "max": [4, 9, 9]}}, "labels[0].data.max"),
        ({"type": "ellipsoid", "data": {"min": [5, 5], "max": [9, 9, 9]}}, "labels[0].data.min"),
        ({"type": "point", "data": {"location": [1, "x", 2]}}, "labels[0].data.location"),
        ({"type": "ruler", "data": {"start": [1, 1, 1], "end": [1, 1, 1]}}, "labels[0].data.end"),
        ({"type": "ellipsoid", "data": {"min": [900, 5, 5], "max": [910, 9, 9]}}, "labels[0]"),
        ({"data": {}}, "labels[0]"),
    ],
)
def test_malformed_labels_are_refused_naming_the_field(label, field):
    volume = circus_volume(np.zeros((24, 64, 64), np.int16), SPACING)
    with pytest.raises(InputError) as caught:
        weak_labels([label], volume)
    assert caught.value.field == field


# -- client and sync against the fake server --------------------------------------------------------


def test_sync_posts_a_revision_with_voxel_labels_estimated_from_the_weak_labels(circus):
    url, state = circus()
    result = sync_case(CircusDbClient(url, TOKEN), CASE_ID, method="threshold")
    assert result.revision_posted
    # every request carried the token, and only as a Bearer header
    assert state.requests and all(
        r["headers"].get("Authorization") == f"Bearer {TOKEN}" for r in state.requests
    )
    assert all(TOKEN not in r["path"] for r in state.requests)
    # the partial volume descriptor of the series entry went to RS
    rs = [r for r in state.requests if r["path"].startswith("/rs/")]
    assert [r["path"] for r in rs] == [
        f"/rs/series/{SERIES_UID}/metadata?start=1&end=24&delta=1",
        f"/rs/series/{SERIES_UID}/volume?start=1&end=24&delta=1",
    ]
    puts = [r for r in state.requests if r["method"] == "PUT"]
    assert len(puts) == 2
    for put in puts:
        assert put["path"] == f"/api/blob/{hashlib.sha1(put['body']).hexdigest()}"
        assert put["headers"]["Content-Type"] == "application/octet-stream"
    (post,) = [r for r in state.requests if r["method"] == "POST"]
    assert post["headers"]["Content-Type"] == "application/json"
    assert state.requests.index(post) > max(state.requests.index(p) for p in puts)  # blobs first
    revision = json.loads(post["body"])
    assert set(revision) == {"description", "attributes", "status", "series"}
    assert revision["attributes"] == {"reviewed": True} and revision["status"] == "approved"
    (entry,) = revision["series"]
    assert entry["seriesUid"] == SERIES_UID and entry["partialVolumeDescriptor"] == {
        "start": 1,
        "end": 24,
        "delta": 1,
    }
    readers, ours = entry["labels"][:4], entry["labels"][4:]
    assert readers == _reader_labels()  # the reader's labels are kept as they were
    assert len(ours) == 2
    truth = _phantom() > 0
    for label, ((cx, cy, cz), _r) in zip(ours, NODULES, strict=True):
        assert label["type"] == "voxel" and label["name"].startswith(WLCAD_LABEL_PREFIX)
        data = label["data"]
        assert re.fullmatch(r"#[0-9a-f]{6}", data["color"]) and 0 <= data["alpha"] <= 1
        mask = unpack_circus_voxels(state.blobs[data["voxels"]], data["size"])
        (x0, y0, z0), (sx, sy, sz) = data["origin"], data["size"]
        full = np.zeros_like(truth)
        full[z0 : z0 + sz, y0 : y0 + sy, x0 : x0 + sx] = mask
        zz, yy, xx = np.nonzero(full)
        assert [xx.mean(), yy.mean(), zz.mean()] == pytest.approx([cx, cy, cz], abs=0.6)
        near = np.zeros_like(truth)
        near[z0 : z0 + sz, y0 : y0 + sy, x0 : x0 + sx] = True
        lesion = truth & near
        dice = 2 * np.count_nonzero(full & lesion) / (np.count_nonzero(full) + np.count_nonzero(lesion))
        assert dice > 0.9
    kinds = [(lesion.kind, lesion.qc_passed) for s in result.series for lesion in s.lesions]
    assert kinds == [("ellipsoid", True), ("point+ruler", True)]
    assert [(k.index, k.type) for k in result.series[0].skipped] == [(3, "polyline")]


def test_a_second_sync_posts_nothing_and_a_changed_method_replaces_only_wlcad_labels(circus):
    url, state = circus()
    client = CircusDbClient(url, TOKEN)
    sync_case(client, CASE_ID, method="threshold")
    posts = lambda: [r for r in state.requests if r["method"] == "POST"]  # noqa: E731
    assert len(posts()) == 1 and len(state.case["revisions"]) == 2
    again = sync_case(client, CASE_ID, method="threshold")
    assert not again.revision_posted and len(posts()) == 1 and len(state.case["revisions"]) == 2
    sync_case(client, CASE_ID, method="sphere")
    assert len(state.case["revisions"]) == 3
    labels = state.case["revisions"][-1]["series"][0]["labels"]
    assert labels[:4] == _reader_labels()
    assert [label["name"] for label in labels[4:]] == [
        f"{WLCAD_LABEL_PREFIX} sphere lesion 1",
        f"{WLCAD_LABEL_PREFIX} sphere lesion 2",
    ]
    assert sync_case(client, CASE_ID, method="sphere", dry_run=False).series[0].replaced_labels == 2


def test_a_case_without_weak_labels_fetches_no_volume_and_posts_nothing(circus):
    url, state = circus(labels=[{"type": "polyline", "data": {"points": [[1, 1]], "z": 2}}])
    result = sync_case(CircusDbClient(url, TOKEN), CASE_ID)
    assert not result.revision_posted
    assert [r["path"] for r in state.requests] == [f"/api/cases/{CASE_ID}"]


def test_client_bounds_refusals_and_redirects(circus):
    url, state = circus()
    client = CircusDbClient(url, TOKEN)
    with pytest.raises(CircusRefusedError) as refused:
        CircusDbClient(url, "wrong").get_case(CASE_ID)
    assert refused.value.status == 401
    with pytest.raises(CircusRefusedError) as missing:
        client.get_case("nosuchcase")
    assert missing.value.status == 404
    with pytest.raises(InputError) as bad_id:
        client.get_case("../admin")
    assert bad_id.value.field == "case_id"
    meta = client.series_metadata(SERIES_UID)
    state.extra_volume_bytes = 1  # the answer is one byte more than the metadata promises
    with pytest.raises(CircusUnavailableError, match="bytes"):
        client.series_volume(SERIES_UID, meta)
    with pytest.raises(InputError) as too_big:
        CircusDbClient(url, TOKEN, max_volume_bytes=1000).series_metadata(SERIES_UID)
    assert too_big.value.field == "max_volume_bytes"
    with pytest.raises(InputError):
        client.put_blob(b"")
    with pytest.raises(InputError) as bad_revision:
        client.post_revision(
            CASE_ID, {"description": "", "attributes": {}, "status": "", "series": [], "date": "x"}
        )
    assert bad_revision.value.field == "revision"
    # a redirect is refused, so the token never reaches the other server
    other_url, other = circus()
    redirecting_url, _ = circus(redirect_to=other_url)
    with pytest.raises(CircusRefusedError, match="redirect"):
        CircusDbClient(redirecting_url, TOKEN).get_case(CASE_ID)
    assert other.requests == []


def test_cli_sync_reports_and_its_exit_statuses(circus, monkeypatch, tmp_path):
    url, state = circus()
    monkeypatch.setenv("WLCAD_CIRCUS_TOKEN", TOKEN)
    report = tmp_path / "sync.json"
    done = run_cli("-v", "circus-db", "sync", "--url", url, "--case", CASE_ID, "--report", str(report))
    assert done.returncode == 0, done.stderr
    assert json.loads(report.read_text()) == json.loads(done.stdout)
    assert json.loads(done.stdout)["revision_posted"] is True
    for text in (done.stdout, done.stderr, report.read_text()):
        assert TOKEN not in text and SERIES_UID not in text and "reader@example.org" not in text

    monkeypatch.setenv("WLCAD_CIRCUS_TOKEN", "wrong-token")
    refused = run_cli("circus-db", "sync", "--url", url, "--case", CASE_ID)
    assert (
        refused.returncode == 1
        and "HTTP 401" in refused.stderr
        and len(refused.stderr.strip().splitlines()) == 1
    )

    monkeypatch.delenv("WLCAD_CIRCUS_TOKEN")
    no_token = run_cli("circus-db", "sync", "--url", url, "--case", CASE_ID)
    assert no_token.returncode == 2 and "WLCAD_CIRCUS_TOKEN" in no_token.stderr

    monkeypatch.setenv("WLCAD_CIRCUS_TOKEN", TOKEN)
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    down = run_cli(
        "circus-db", "sync", "--url", f"http://127.0.0.1:{port}", "--case", CASE_ID, "--timeout-s", "5"
    )
    assert down.returncode == 69 and len(down.stderr.strip().splitlines()) == 1

    state.case["revisions"][-1]["series"][0]["labels"] = [
        {"type": "ellipsoid", "data": {"min": [9, 9, 9], "max": [1, 1, 1]}}
    ]
    bad = run_cli("circus-db", "sync", "--url", url, "--case", CASE_ID)
    assert bad.returncode == 2 and "series[0].labels[0].data.max" in bad.stderr


def test_cli_labels_reads_an_exported_case_on_an_image_grid(tmp_path):
    from services.core.io.nifti import write_nifti

    image = tmp_path / "ct.nii.gz"
    write_nifti(circus_volume(_phantom(), SPACING), image)
    case = tmp_path / "case.json"
    case.write_text(
        json.dumps({"revisions": [{"series": [{"seriesUid": SERIES_UID, "labels": _reader_labels()}]}]})
    )
    done = run_cli("circus-db", "labels", "--case-json", str(case), "--image", str(image))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert [lesion["kind"] for lesion in out["lesions"]] == ["ellipsoid", "point+ruler"]
    for lesion, ((cx, cy, cz), r) in zip(out["lesions"], NODULES, strict=True):
        assert lesion["center_voxel"] == pytest.approx([cx, cy, cz], abs=1e-3)
        assert lesion["diameter_mm"] == pytest.approx(2 * r, abs=1e-3)
    assert out["skipped"] == [{"index": 3, "type": "polyline", "reason": "a 2D outline, not a weak 3D label"}]
