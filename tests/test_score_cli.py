"""``wlcad score`` on the shipped cxr-anomaly models: one image (JSON, map NIfTI on the image grid,
overlay PNG), refusals before anything is written, and the manifest batch (one JSON per case, the
worklist ranked most-abnormal first with failed cases kept, resume, rescoring another model's JSON,
shards whose unsharded rerun writes the single run's worklist byte for byte)."""

from __future__ import annotations

import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.cli.main import main as wlcad
from services.core.io import read_image, write_image
from services.core.manifest import write_manifest
from services.inference.factory import default_repository
from services.inference.repository import ModelRepository
from training.data.dataset import generate_case

CXR = "cxr-anomaly"
TEST_SEED = 1303  # training/anomaly/tasks.py
#: Test-seed cases: 0, 1, 2, 3 normal, 11 effusion, 4 cardiomegaly.
CASES = (0, 11, 1, 2, 3, 4)


def shipped_version(name: str) -> str:
    """``name/<newest version>`` of the shipped model (what the scorer binds)."""
    return f"{name}/{max(ModelRepository(default_repository()).versions(name))}"


@pytest.fixture(scope="module")
def batch_manifest(tmp_path_factory) -> Path:
    """Six test radiographs and one constant image (which cannot be scored)."""
    folder = tmp_path_factory.mktemp("batch")
    rows = []
    for index in CASES:
        case = generate_case(CXR, TEST_SEED, index)
        path = write_image(case.image, folder / f"case{index:02d}.nii.gz")
        rows.append(
            {"case_id": f"case{index:02d}", "image": path.name, "abnormal": str(case.abnormal).lower()}
        )
    constant = generate_case(CXR, TEST_SEED, 0).image
    write_image(constant.with_array(np.full_like(constant.array, 5)), folder / "blank.nii.gz")
    rows.append({"case_id": "blank", "image": "blank.nii.gz", "abnormal": "false"})
    return write_manifest(rows, folder / "manifest.csv")


class _Page(HTMLParser):
    """The case ids of the worklist table's rows, of the failed table's, and the image sources."""

    def __init__(self) -> None:
        super().__init__()
        self.table, self.worklist, self.failed, self.images = "", [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.table = attrs.get("id", "")
        elif tag == "tr" and "data-case" in attrs:
            (self.worklist if self.table == "worklist" else self.failed).append(attrs["data-case"])
        elif tag == "img":
            self.images.append(attrs["src"])


def _page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _worklist(folder: Path) -> list[dict]:
    with open(folder / "worklist.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def test_one_image_writes_json_map_and_overlay(tmp_path, capsys):
    image_path = write_image(generate_case(CXR, TEST_SEED, 11).image, tmp_path / "effusion.nii.gz")
    out, map_path, overlay = tmp_path / "s.json", tmp_path / "map.nii.gz", tmp_path / "o.png"
    argv = ["score", "--task", CXR, "--image", str(image_path), "--out", str(out)]
    assert wlcad([*argv, "--map", str(map_path), "--overlay", str(overlay)]) == 0
    document = json.loads(out.read_text())
    assert {"task", "model", "model_version", "score", "percentile_among_normals", "z"} <= set(document)
    assert (document["task"], document["model"]) == (CXR, "two-flow")  # the default: the posterior
    assert document["model_version"] == shipped_version("anomaly_cxr-anomaly_two-flow")
    assert document["percentile_among_normals"] == 100.0 and document["z"] > 3
    assert "above 100.0 % of normals" in capsys.readouterr().out
    image, score_map = read_image(image_path), read_image(map_path)
    assert score_map.shape_xyz == image.shape_xyz
    assert np.allclose(score_map.spacing, image.spacing) and np.allclose(score_map.origin, image.origin)
    assert np.isfinite(score_map.array).all() and float(score_map.array.max()) > document["score"]
    with Image.open(overlay) as png:
        assert png.format == "PNG" and min(png.size) >= 500
    glow = tmp_path / "glow.json"
    assert wlcad([*argv[:-1], str(glow), "--model", "glow"]) == 0
    assert json.loads(glow.read_text())["model_version"] == shipped_version("anomaly_cxr-anomaly_glow")


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["--out", "s.txt"], "out"),
        (["--map", "m.png"], "map"),
        (["--overlay", "o.jpg"], "overlay"),
        (["--shard", "0/2"], "shard"),
        (["--task", "cxr-mass"], "task"),
        (["--image", "blank.nii.gz"], "image"),
    ],
)
def test_refusals_name_the_field_and_write_nothing(tmp_path, capsys, extra, field):
    radiograph = generate_case(CXR, TEST_SEED, 0).image
    write_image(radiograph, tmp_path / "cxr.nii.gz")
    write_image(radiograph.with_array(np.zeros_like(radiograph.array)), tmp_path / "blank.nii.gz")
    before = set(tmp_path.iterdir())
    options = {"--task": CXR, "--image": "cxr.nii.gz", "--out": "s.json"}
    options.update(dict(zip(extra[::2], extra[1::2], strict=True)))
    argv = ["score"]
    for key, value in options.items():
        argv += [key, value if key in ("--task", "--shard") else str(tmp_path / value)]
    assert wlcad(argv) == 2
    assert capsys.readouterr().err.startswith(f"wlcad: error: {field}:")
    assert set(tmp_path.iterdir()) == before


def test_batch_worklist_resume_and_shards(batch_manifest, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["score", "--task", CXR, "--manifest", str(batch_manifest), "--out", str(out)]
    assert wlcad(argv) == 2  # the blank case failed, and says so
    printed = capsys.readouterr().out
    assert "6 scored, 0 already done, 1 failed" in printed and "failed blank: image:" in printed
    rows = _worklist(out)
    scored = [r for r in rows if r["status"] == "scored"]
    assert [r["rank"] for r in scored] == [str(k) for k in range(1, 7)]
    scores = [float(r["score"]) for r in scored]
    assert scores == sorted(scores, reverse=True)
    # the effusion (11) and the cardiomegaly (4) rank above the four normals (both types' AUC ≈ 1)
    assert {r["case_id"] for r in scored[:2]} == {"case11", "case04"}
    for row in scored:
        assert float(row["score"]) == pytest.approx(
            json.loads((out / f"{row['case_id']}.json").read_text())["score"], abs=1e-6
        )
    assert (
        rows[-1]["case_id"] == "blank" and rows[-1]["status"] == "failed" and "constant" in rows[-1]["error"]
    )
    assert not (out / "blank.json").exists()
    first_worklist = (out / "worklist.csv").read_bytes()
    page = _page(out / "worklist.html")
    assert page.worklist == [r["case_id"] for r in scored] and page.failed == ["blank"]
    assert page.images == [f"thumbnails/{r['case_id']}.jpg" for r in scored]
    for source in page.images:
        with Image.open(out / source) as thumbnail:
            assert thumbnail.format == "JPEG" and thumbnail.width > thumbnail.height > 100  # image | map

    # resume: nothing is scored again; a JSON of another model version is
    other = json.loads((out / "case02.json").read_text())
    (out / "case02.json").write_text(json.dumps({**other, "model_version": "anomaly_cxr-anomaly_glow/1"}))
    (out / "case03.json").unlink()
    assert wlcad(argv) == 2
    assert "2 scored, 4 already done, 1 failed" in capsys.readouterr().out
    assert (out / "worklist.csv").read_bytes() == first_worklist

    # shards: each writes only its cases and its summary; the unsharded rerun writes the same worklist
    sharded = tmp_path / "sharded"
    for k in (0, 1):
        wlcad(
            [
                "score",
                "--task",
                CXR,
                "--manifest",
                str(batch_manifest),
                "--out",
                str(sharded),
                "--shard",
                f"{k}/2",
            ]
        )
        assert not (sharded / "worklist.csv").exists()
    summaries = sorted(p.name for p in (sharded / "summary").iterdir())
    assert summaries == ["summary.shard-0-of-2.json", "summary.shard-1-of-2.json"]
    cases = [json.loads((sharded / "summary" / s).read_text())["cases"] for s in summaries]
    assert sorted(cases[0] + cases[1]) == sorted(["blank", *(f"case{i:02d}" for i in CASES)])
    capsys.readouterr()
    assert wlcad(["score", "--task", CXR, "--manifest", str(batch_manifest), "--out", str(sharded)]) == 2
    assert "0 scored, 6 already done, 1 failed" in capsys.readouterr().out
    assert (sharded / "worklist.csv").read_bytes() == first_worklist
    shutil.rmtree(sharded)


CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")


@pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium-headless-shell (apt) and playwright (pip)"
)
def test_worklist_page_in_a_real_headless_browser(batch_manifest, tmp_path):
    """The page as a browser renders it: every thumbnail loads (scrolled into view: they load
    lazily), rows in rank order, the failed case shown in red, no failed request."""
    playwright = pytest.importorskip("playwright.sync_api")
    out = tmp_path / "run"
    wlcad(["score", "--task", CXR, "--manifest", str(batch_manifest), "--out", str(out)])
    expected = [r["case_id"] for r in _worklist(out) if r["status"] == "scored"]
    failed_requests = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("requestfailed", lambda request: failed_requests.append(request.url))
        page.goto((out / "worklist.html").as_uri())
        images = page.locator("#worklist img")
        for i in range(images.count()):
            images.nth(i).scroll_into_view_if_needed()
        page.wait_for_function("[...document.images].every(i => i.complete)")
        loaded = page.eval_on_selector_all("#worklist img", "a => a.map(i => i.naturalWidth)")
        cases = page.eval_on_selector_all("#worklist tbody tr", "a => a.map(r => r.dataset.case)")
        ranks = page.eval_on_selector_all(
            "#worklist tbody tr td:first-child", "a => a.map(t => t.textContent)"
        )
        colour = page.eval_on_selector("#failed td", "t => getComputedStyle(t).color")
        browser.close()
    assert len(loaded) == len(expected) and all(width > 100 for width in loaded)
    assert cases == expected and ranks == [str(k) for k in range(1, len(expected) + 1)]
    assert colour == "rgb(170, 0, 0)" and failed_requests == []
