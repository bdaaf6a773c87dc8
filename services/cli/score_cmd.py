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
from services.core.volume import Volume


def register(commands: argparse._SubParsersAction) -> None:
    from services.anomaly.tasks import TASKS
    from services.batch.score import SERVED_MODELS

    parser = commands.add_parser(
        "score",
        help="anomaly score of an image (or a manifest's cases, as a worklist), calibrated on normals",
        description=(
            "The model anomaly_<task>_<model> must be in the model repository; its card holds the "
            "validation normals the percentile and z come from. --model: two-flow (the posterior of a "
            "flow on an unlabelled mix and a flow on normals) or glow (the normal flow's NLL); default "
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
        help="also write the anomaly map (bits/pixel) on the image grid",
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
    from services.anomaly.scoring import AnomalyScorer
    from services.batch.score import model_versions, resolve_model
    from services.inference.factory import default_repository

    repository = args.model_repository or default_repository()
    model = resolve_model(task, args.model, repository)
    if not model_versions(task, model, repository):
        raise InputError(
            f"{task.model_name(model)} is not in the model repository {repository}", field="model"
        )
    return AnomalyScorer(task.name, model, repository=repository, setting=args.inference)


def run(args: argparse.Namespace) -> int:
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
            render_score_overlay(
                image, on_image, document, len(scorer.calibration.normal_scores), args.overlay
            )
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


def _display_slice(image: Volume, score_map: Volume) -> int:
    """The axial slice shown: the one whose map is highest on average (a radiograph has one)."""
    return int(np.argmax(score_map.array.reshape(score_map.array.shape[0], -1).mean(axis=1)))


def render_score_overlay(
    image: Volume, score_map: Volume, document: dict, n_normals: int, path: Path
) -> Path:
    """The image in its reading window beside the same image under the anomaly map (bits/pixel,
    colour bar), titled with the score, its percentile among the validation normals and z."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from services.core.atomic import atomic_output
    from services.core.overlay import BRAIN, PERCENTILE, apply_window

    k = _display_slice(image, score_map)
    plane = np.asarray(image.array[k], dtype=np.float64)
    window = BRAIN if document["task"] == "head-ct-anomaly" else PERCENTILE
    grey = apply_window(plane, window)
    heat = np.asarray(score_map.array[k], dtype=np.float64)
    low, high = np.percentile(heat, [2.0, 99.8])
    spacing = np.asarray(image.spacing, dtype=np.float64)
    aspect = float(spacing[1] / spacing[0])
    figure = Figure(figsize=(10.0, 5.6))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    left.imshow(grey, cmap="gray", vmin=0, vmax=255, aspect=aspect)
    left.set_title("image" + ("" if image.array.shape[0] == 1 else f" (slice {k})"), fontsize=9)
    right.imshow(grey, cmap="gray", vmin=0, vmax=255, aspect=aspect)
    shown = right.imshow(
        heat, cmap="inferno", vmin=low, vmax=max(high, low + 1e-9), alpha=0.55, aspect=aspect
    )
    right.set_title("anomaly map (bits/pixel; mean = score)", fontsize=9)
    figure.colorbar(shown, ax=right, fraction=0.046, pad=0.04)
    for axes in (left, right):
        axes.set_axis_off()
    figure.suptitle(
        f"wlcad score {document['task']} · {document['model_version']}\n"
        f"score {document['score']:.4f} {document['units']} · above "
        f"{document['percentile_among_normals']:.1f} % of {n_normals} validation normals · z "
        f"{document['z']:+.2f} · not a diagnosis",
        fontsize=10,
    )
    figure.tight_layout(rect=(0.0, 0.0, 1.0, 0.9))
    with atomic_output(path, suffix=".png") as temporary:
        figure.savefig(temporary, format="png", dpi=110)
    return Path(path)
