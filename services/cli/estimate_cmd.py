"""``wlcad estimate``: lesion masks from centre + size, from a manifest, or from an RT Dose plan."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from services.cli.arguments import positive_number, triplet
from services.core.errors import InputError
from services.core.io import read_image
from services.core.lesion_prompt import LesionPrompt, prompt_from_voxel
from services.label_estimation.pipeline import METHODS, LabelEstimator, LesionEstimate

if TYPE_CHECKING:
    from services.label_estimation.model import UnetModel


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "estimate",
        help="estimate lesion masks from centre + diameter, a weak-label manifest, or an RT Dose",
        description=(
            "One lesion: --image PATH --center-mm X,Y,Z (LPS mm) or --center-voxel I,J,K, --diameter-mm D. "
            "Many: --manifest weak.csv --out DIR. Dose: --dose RTDOSE.dcm --image PATH --isodose 50%% --out DIR."
        ),
    )
    parser.add_argument("--image", type=Path, help="DICOM folder/file, NIfTI, NRRD, MHA/MHD or CIRCUS input")
    parser.add_argument(
        "--center-mm", type=triplet, metavar="X,Y,Z", help="lesion centre, world LPS mm (may be negative)"
    )
    parser.add_argument(
        "--center-voxel", type=triplet, metavar="I,J,K", help="lesion centre as a voxel index (x,y,z order)"
    )
    parser.add_argument(
        "--diameter-mm", type=positive_number, metavar="D", help="maximum lesion diameter in mm"
    )
    parser.add_argument("--lesion-id", type=int, default=1, help="label value of this lesion (default 1)")
    parser.add_argument("--method", choices=METHODS, default="unet")
    parser.add_argument("--manifest", type=Path, help="weak-label manifest CSV (batch mode)")
    parser.add_argument("--dose", type=Path, help="RT Dose DICOM (dose-to-label mode)")
    parser.add_argument(
        "--isodose", default="50%", help="prescription isodose: '50%%' of each target's max, or '12Gy'"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="mask file (.nii.gz/.nrrd/.mha) or, for batch/dose, a folder"
    )
    parser.add_argument("--seg", type=Path, help="also write a DICOM SEG (DICOM input only)")
    parser.add_argument(
        "--sr",
        type=Path,
        help="also write a DICOM SR (TID 1500) of the measurements, referencing the --seg (needs --seg)",
    )
    parser.add_argument(
        "--lesion-type", default="", help="lesion type (e.g. solid, mass): coded in the SEG/SR, kept as text"
    )
    parser.add_argument("--report", type=Path, help="also write the per-lesion JSON report here")
    parser.add_argument("--circus", type=Path, help="also write CIRCUS voxel labels into this folder")
    parser.add_argument("--series-uid", help="pick one series when the DICOM folder holds several")
    parser.add_argument(
        "--shard",
        metavar="K/N",
        help="batch: only the cases of shard K of N (0 ≤ K < N; merge with 'wlcad batch merge DIR')",
    )
    parser.set_defaults(handler=run)


def _estimator(method: str) -> tuple[LabelEstimator, UnetModel | None]:
    if method != "unet":
        return LabelEstimator(), None
    from services.label_estimation.model import UnetModel

    model = UnetModel()
    return LabelEstimator(model), model


def run(args: argparse.Namespace) -> int:
    if args.shard is not None and (args.manifest is None or args.dose is not None):
        raise InputError("splits a batch: give --manifest", field="shard")
    if args.dose is not None:
        return _run_dose(args)
    if args.manifest is not None:
        return _run_batch(args)
    if args.image is None:
        raise InputError("give --image (with a centre and diameter), --manifest or --dose", field="image")
    if (args.center_mm is None) == (args.center_voxel is None):
        raise InputError("give exactly one of --center-mm or --center-voxel", field="center_mm")
    if args.diameter_mm is None:
        raise InputError("is required with --image", field="diameter_mm")
    _check_single_outputs(args)
    image = read_image(args.image, series_instance_uid=args.series_uid)
    if args.seg is not None:
        from services.core.io.dicom_seg import check_seg_source

        check_seg_source(image)
    if args.sr is not None:
        from services.core.io.dicom_sr import check_sr_source

        check_sr_source(image)
    if args.center_voxel is not None:
        prompt = prompt_from_voxel(image, args.center_voxel, args.diameter_mm, args.lesion_id)
    else:
        prompt = LesionPrompt(args.center_mm, args.diameter_mm, args.lesion_id)
    estimator, model = _estimator(args.method)
    try:
        estimates = estimator.estimate(image, [prompt], args.method)
    finally:
        if model is not None:
            model.close()
    _write_single(args, image, estimates)
    return 0


def _check_single_outputs(args: argparse.Namespace) -> None:
    """Refuse unwritable outputs before reading or computing anything (exit 2, nothing written)."""
    from services.core.io import writable_suffix
    from services.label_estimation.outputs import check_writable

    writable_suffix(args.out)
    check_writable(args.out, "out")
    if args.sr is not None and args.seg is None:
        raise InputError("references the lesions' SEG: give --seg too", field="sr")
    if len(args.lesion_type) > 64:
        raise InputError("must be at most 64 characters", field="lesion_type")
    for field in ("seg", "sr", "report"):
        if getattr(args, field) is not None:
            check_writable(getattr(args, field), field)
    if args.circus is not None:
        check_writable(args.circus, "circus", folder=True)


def _write_single(args: argparse.Namespace, image, estimates: list[LesionEstimate]) -> None:
    from services.label_estimation.outputs import (
        write_circus_labels,
        write_dicom_seg,
        write_dicom_sr,
        write_json,
        write_mask,
    )

    types = {e.lesion_id: args.lesion_type for e in estimates} if args.lesion_type else None
    if args.seg is not None:  # first: its last checks (the source files' UIDs) need the files, read here
        write_dicom_seg(image, estimates, args.image, args.seg, types)
    if args.sr is not None:  # references the SEG just written
        write_dicom_sr(image, estimates, args.image, args.seg, args.sr, types)
    write_mask(image, estimates, args.out)
    if args.circus is not None:
        write_circus_labels(estimates, args.circus)
    reports = [e.report() for e in estimates]
    if args.report is not None:
        write_json(args.report, reports[0] if len(reports) == 1 else reports)
    for report in reports:
        m, qc = report["measurements"], report["qc"]
        print(
            f"lesion {report['lesion_id']}: {args.method}: {m['voxels']} voxels"
            + (
                f", {m['volume_mm3']:.1f} mm³, max diameter {m['max_diameter_mm']:.1f} mm"
                if m["voxels"]
                else ""
            )
            + f", QC {'passed' if qc.get('passed') else 'flagged'} → {args.out}"
        )


def _run_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from services.batch.shards import parse_shard
    from services.core.manifest import read_lesions
    from services.label_estimation.batch import run_batch

    shard = parse_shard(args.shard)
    lesions = read_lesions(args.manifest)  # refuses an unsafe case id (naming its line) before any work
    estimator, model = _estimator(args.method)
    try:
        with tqdm(total=len(lesions), unit="lesion", file=sys.stderr, disable=None) as bar:
            summary = run_batch(
                lesions,
                args.out,
                args.method,
                estimator,
                model_version=model.version if model is not None else None,
                progress=bar.update,
                shard=shard,
                manifest=args.manifest,
            )
    finally:
        if model is not None:
            model.close()
    print(f"summary: {summary}")
    return 0


def _run_dose(args: argparse.Namespace) -> int:
    import numpy as np

    from services.core.io import write_image
    from services.label_estimation.dose import Isodose, dose_labels, read_rtdose
    from services.label_estimation.outputs import check_writable, write_json

    if args.image is None:
        raise InputError("dose-to-label needs the planning image too", field="image")
    check_writable(args.out, "out", folder=True)
    isodose = Isodose.parse(args.isodose)
    image = read_image(args.image, series_instance_uid=args.series_uid)
    labels, targets = dose_labels(image, read_rtdose(args.dose), isodose)
    args.out.mkdir(parents=True, exist_ok=True)
    write_image(
        image.with_array(labels.astype(np.uint16 if labels.max() > 255 else np.uint8)),
        args.out / "dose-labels.nii.gz",
    )
    write_json(args.out / "dose-targets.json", {"isodose": args.isodose, "targets": targets})
    print(f"{len(targets)} treated targets at isodose {args.isodose} → {args.out}")
    return 0
