"""``wlcad score``: how abnormal one image is (anomaly score, percentile among normals, z) as JSON,
optionally its per-pixel map as NIfTI and an overlay PNG; or, with ``--manifest``, every case of a
manifest and a worklist ranked most-abnormal first (:mod:`services.batch.score`).

Every check that can fail on the input runs before anything is written (task, model, output paths,
the image, the model's presence), and each output is atomic; the JSON is written last, so its
presence means the run completed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from services.core.errors import InputError


def register(commands: argparse._SubParsersAction) -> None:
    from services.anomaly.tasks import TASKS
    from services.batch.score import SERVED_MODELS

    parser = commands.add_parser(
        "score",
        help="anomaly score of an image (or a manifest's cases, as a worklist), calibrated on normals",
        description=(
            "The model anomaly_<task>_<model> must be in the model repository; its card holds the "
            "validation normals the percentile and z come from. --model: two-flow (the posterior of a "
            "flow on an unlabelled mix and a flow on normals), glow (the normal flow's NLL) or gan "
            "(f-AnoGAN's reconstruction residual); default "
            "the first of these the repository holds. Batch: --manifest M --out DIR (resumable: cases "
            "whose JSON exists are skipped; DIR/worklist.csv ranks the cases most-abnormal first)."
        ),
    )
    parser.add_argument("--task", required=True, metavar="TASK", help=f"one of: {', '.join(TASKS)}")
    parser.add_argument("--image", type=Path, help="DICOM folder/file, NIfTI, NRRD or MHA/MHD")
    parser.add_argument("--manifest", type=Path, help="batch: a manifest CSV; <case_id>.json per case")
    parser.add_argument("--out", type=Path, required=True, help="score JSON, or with --manifest a folder")
    parser.add_argument("--model", choices=SERVED_MODELS, help="model family (default: two-flow if shipped)")
    parser.add_argument(
        "--map",
        type=Path,
        metavar="MAP.nii.gz",
        help="also write the anomaly map (a flow's bits/pixel, f-AnoGAN's squared residual) on the image grid",
    )
    parser.add_argument(
        "--overlay", type=Path, metavar="PNG", help="also write the map over the image as PNG"
    )
    parser.add_argument(
        "--inference", metavar="SETTING", help="embedded (default) or triton://host:port ($WLCAD_INFERENCE)"
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        metavar="DIR",
        help="default $WLCAD_MODEL_REPOSITORY or model_repository/",
    )
    parser.add_argument("--series-uid", help="pick one series when the DICOM folder holds several")
    parser.add_argument(
        "--shard",
        metavar="K/N",
        help="batch: only the cases of shard K of N (0 ≤ K < N); rerun unsharded for the worklist",
    )
    parser.set_defaults(handler=run)


def _check_outputs(args: argparse.Namespace) -> None:
    from services.core.io import writable_suffix
    from services.label_estimation.outputs import check_writable

    if args.out.suffix.lower() != ".json":
        raise InputError(f"{args.out.name}: the score file must end in .json", field="out")
    check_writable(args.out, "out")
    if args.map is not None:
        try:
            writable_suffix(args.map)
        except InputError as exc:
            raise InputError(exc.message, field="map") from None
        check_writable(args.map, "map")
    if args.overlay is not None:
        if args.overlay.suffix.lower() != ".png":
            raise InputError(f"{args.overlay.name}: the overlay must end in .png", field="overlay")
        check_writable(args.overlay, "overlay")


def _scorer(args: argparse.Namespace, task):
    from services.batch.score import open_scorer

    return open_scorer(task, args.model, args.model_repository, args.inference)


def run(args: argparse.Namespace) -> int:
    from services.anomaly.figure import write_score_figure
    from services.anomaly.tasks import anomaly_task
    from services.batch.score import score_document
    from services.core.io import read_image, write_image
    from services.label_estimation.outputs import write_json

    task = anomaly_task(args.task)
    if (args.image is None) == (args.manifest is None):
        raise InputError("give exactly one of --image or --manifest", field="image")
    if args.manifest is not None:
        return _run_batch(args, task)
    if args.shard is not None:
        raise InputError("splits a batch: give --manifest", field="shard")
    _check_outputs(args)
    image = read_image(args.image, series_instance_uid=args.series_uid)
    with _scorer(args, task) as scorer:
        result, score_map = scorer.score_with_map(image)
    document = score_document(result, task)
    if args.map is not None or args.overlay is not None:
        on_image = score_map.resample(reference=image, output_dtype=np.float32)
        if args.map is not None:
            write_image(on_image, args.map)
        if args.overlay is not None:
            write_score_figure(image, on_image, document, len(scorer.calibration.normal_scores), args.overlay)
    write_json(args.out, document)
    print(
        f"{task.name}: score {result.score:.4f} {result.units}, above {result.percentile_among_normals:.1f} % "
        f"of normals (z {result.z:+.2f}) ({document['model_version']}) → {args.out}"
    )
    return 0


def _run_batch(args: argparse.Namespace, task) -> int:
    from services.batch.score import run_score_batch
    from services.batch.shards import parse_shard

    shard = parse_shard(args.shard)
    for option in ("map", "overlay"):
        if getattr(args, option) is not None:
            raise InputError("is for one image; a batch writes scores and a worklist", field=option)
    with _scorer(args, task) as scorer:
        return run_score_batch(scorer, args.manifest, args.out, shard)
