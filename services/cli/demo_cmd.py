"""``wlcad demo``: the main job's client. Sends real samples and hybrid phantoms (synthetic lesions in
real backgrounds) through the gateway, writes every output into ``./out/`` and prints the Dice of
each method where ground truth exists.

It talks only to the gateway (gRPC, plus one HTTP multipart upload for the DICOM series), so it
exercises exactly what a hospital client would; methods the service does not offer yet (``unet``
before its model is trained) are skipped with the service's own reason.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import grpc
import numpy as np

from services.core.errors import InputError

PHANTOM_TASKS = ("chest-ct-nodule", "brain-mr-metastasis", "cxr-mass")
#: Real samples: (sample name, how it is sent).
REAL_SAMPLES = (
    ("ct-dicom-series", "http-dicom-zip"),
    ("brain-mr-dicom-series", "grpc-dicom-zip"),
    ("chest-xray", "grpc-file"),
    ("brain-t1-nifti", "grpc-file"),
)


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


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _overlay(image, masks: list[np.ndarray], center_index_z: int, path: Path) -> Path:
    """PNG of the slice through the lesion: windowed grey, mask outlines in red."""
    from PIL import Image
    from scipy import ndimage

    z = int(np.clip(center_index_z, 0, image.array.shape[0] - 1))
    plane = image.array[z].astype(np.float32)
    low, high = np.percentile(plane, (1, 99))
    grey = np.clip((plane - low) / max(high - low, 1e-6), 0, 1)
    if str(image.metadata.get("photometric", "")).upper() == "MONOCHROME1":
        grey = 1 - grey
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    for mask in masks:
        edge = mask[z] & ~ndimage.binary_erosion(mask[z])
        rgb[edge] = (255, 40, 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def _write_outputs(image, estimates, folder: Path, dicom_source: Path | None) -> list[str]:
    from services.label_estimation.outputs import write_circus_labels, write_dicom_seg, write_json, write_mask

    written = [str(write_mask(image, estimates, folder / "mask.nii.gz"))]
    written += [str(p) for p in write_circus_labels(estimates, folder / "circus")]
    write_json(folder / "report.json", [e.report() for e in estimates])
    if dicom_source is not None and any(e.mask.voxel_count for e in estimates):
        try:
            written.append(str(write_dicom_seg(image, estimates, dicom_source, folder / "seg.dcm")))
        except InputError as exc:  # e.g. an anonymised source without the UIDs a SEG must reference
            print(f"    no DICOM SEG for {dicom_source.name}: {exc.message}")
    centre_z = round(float(image.world_to_index(estimates[0].prompt.center_mm)[2]))
    _overlay(image, [e.mask.full() for e in estimates], centre_z, folder / "overlay.png")
    return written


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


def run(args: argparse.Namespace) -> int:
    from services.api.client import LabelEstimationClient, estimates_from_response
    from services.core.io import read_image
    from services.core.lesion_prompt import LesionPrompt

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
    dice: dict[tuple[str, str], list[float]] = defaultdict(list)
    qc_passed: dict[str, list[bool]] = defaultdict(list)
    summary: dict = {
        "methods": methods,
        "skipped": {m.name: m.reason for m in description.methods if not m.available},
    }

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
        for method in methods:
            if not _applicable(method, image):
                continue
            response = client.estimate_volume(image, prompts, method)
            estimates = estimates_from_response(image, prompts, response)
            for estimate in estimates:
                dice[(task, method)].append(_dice(estimate.mask.full(), truth == estimate.lesion_id))
                qc_passed[method].append(bool(estimate.qc.get("passed")))
            _write_outputs(image, estimates, out / case_id / method, None)
        rtdose = next((r.get("rtdose") for r in rows if r.get("rtdose")), None)
        if rtdose:
            dose_dice = _dose_case(client, image, truth, folder / rtdose, rows, out / case_id / "dose")
            dice[(task, "dose 50%")].extend(dose_dice)

    for name, transport in REAL_SAMPLES:
        _real_sample(client, args, token, name, transport, methods, out, read_image, estimates_from_response)

    print(
        f"\nDice against the phantoms' ground truth (hybrid: lesions inserted into real backgrounds), {out}/:"
    )
    columns = [*methods, "dose 50%"]
    print(f"  {'task':22s}" + "".join(f"{m:>15s}" for m in columns))
    for task in PHANTOM_TASKS:
        cells = []
        for method in columns:
            values = dice.get((task, method))
            cells.append(f"{np.mean(values):9.3f} (n={len(values)})" if values else f"{'—':>15s}")
        print(f"  {task:22s}" + "".join(f"{c:>15s}" for c in cells))
    summary["dice"] = {f"{t}/{m}": round(float(np.mean(v)), 4) for (t, m), v in dice.items()}
    summary["qc_passed"] = {m: f"{sum(v)}/{len(v)}" for m, v in qc_passed.items()}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"QC passed: {summary['qc_passed']}; real samples have no ground truth (outputs only)")
    print(f"done in {summary['seconds']} s → {out}/summary.json")
    client.close()
    return 0


def _applicable(method: str, image) -> bool:
    """The U-Net is a 3D segmenter: the service refuses it on single-slice images (radiographs)."""
    return not (method == "unet" and image.array.shape[0] == 1)


def _dose_case(client, image, truth, rtdose: Path, rows: list[dict], folder: Path) -> list[float]:
    """Dose-to-label: each treated lesion's Dice against the target that overlaps it most."""
    from services.api.convert import unpack_mask
    from services.core.io import write_image

    response = client.estimate_dose(image, rtdose.read_bytes(), "50%")
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
        scores.append(_dice(labels == best, lesion) if best else 0.0)
    print(f"  {rtdose.name}: {len(response.targets)} dose targets at 50% isodose → {folder}")
    return scores


def _real_sample(
    client, args, token, name, transport, methods, out, read_image, estimates_from_response
) -> None:
    """A real image, prompted at its centre (no lesion there to score: outputs only)."""
    from services.api import http_client
    from services.api.client import prompt_messages, zip_folder
    from services.api.pb import label_estimation_pb2 as pb
    from services.core.lesion_prompt import LesionPrompt
    from services.core.sample_data import sample_path

    path = sample_path(name)
    image = read_image(path)
    centre = image.index_to_world((np.asarray(image.shape_xyz) - 1) / 2)
    extent = np.asarray(image.shape_xyz) * np.asarray(image.spacing)
    diameter = float(min(20.0, 0.5 * extent[extent > float(np.asarray(image.spacing).max())].min()))
    prompts = [LesionPrompt(tuple(float(v) for v in centre), diameter, 1)]
    for method in methods:
        if not _applicable(method, image):
            print(f"  {name}: {method} skipped (a 3D segmenter; this image has one slice)")
            continue
        if transport == "http-dicom-zip":
            request = pb.EstimateRequest(lesions=prompt_messages(prompts), method=method)
            response = http_client.upload(args.http, f"{path.name}.zip", zip_folder(path), request, token)
        else:
            response = client.estimate_file(path, prompts, method)
        estimates = estimates_from_response(image, prompts, response)
        dicom_source = path if transport.endswith("dicom-zip") else None
        _write_outputs(image, estimates, out / name / method, dicom_source)
        voxels = estimates[0].mask.voxel_count
        print(
            f"  {name} ({transport}) {method}: {voxels} voxels, QC {'passed' if estimates[0].qc.get('passed') else 'flagged'}"
        )
