"""``wlcad detect``: a task's lesion candidates on one image, as JSON, optionally an overlay PNG and a
DICOM SR (TID 1500, :mod:`services.core.io.dicom_sr`).

Every check that can fail on the input runs before anything is written (task, cut-off, output
paths, the image, the model), and each output is atomic, so a failed run leaves no file and a
finished one leaves whole files. The JSON is written last: its presence means the run completed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from services.cade.cutoff import Cutoff, detect_at
from services.cade.pipeline import DetectionResult
from services.cade.tasks import TASKS, CadeTask, task_named
from services.core.errors import InputError
from services.core.io import read_image
from services.core.volume import Volume

#: The overlay shows at most this many candidates (the strongest): a reader's list, not every peak.
OVERLAY_MAX_CANDIDATES = 8


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "detect",
        help="detect lesions (CADe): ranked candidates with centre, diameter and confidence",
        description=(
            f"Tasks: {'; '.join(f'{t.name}: {t.description}' for t in TASKS.values())}. "
            "The model cade_<task> must be in the model repository. Cut-off: --threshold T, or "
            "--fp-rate R (the model card's operating point at R false positives per case); by default "
            "the card's operating point for the task, else 0.5. Batch: --manifest M --out DIR (resumable: "
            "cases whose JSON exists are skipped; a FROC summary when the manifest has lesions)."
        ),
    )
    parser.add_argument("--task", required=True, metavar="TASK", help=f"one of: {', '.join(TASKS)}")
    parser.add_argument("--image", type=Path, help="DICOM folder/file, NIfTI, NRRD or MHA/MHD")
    parser.add_argument(
        "--manifest", type=Path, help="batch: a manifest CSV; one <case_id>.json per case in --out"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="candidates JSON file, or with --manifest a folder"
    )
    parser.add_argument("--threshold", type=float, metavar="T", help="least confidence reported, in [0, 1]")
    parser.add_argument(
        "--fp-rate", type=float, metavar="R", help="use the model card's operating point at R FP per case"
    )
    parser.add_argument("--overlay", type=Path, metavar="PNG", help="also write an overlay PNG here")
    parser.add_argument(
        "--sr",
        type=Path,
        metavar="DCM",
        help="also write a DICOM SR (TID 1500) of the candidates (DICOM input only)",
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
        help="batch: only the cases of shard K of N (0 ≤ K < N; merge with 'wlcad batch merge DIR')",
    )
    parser.set_defaults(handler=run)


def _cutoff(args: argparse.Namespace) -> Cutoff:
    """--threshold / --fp-rate, checked (errors name ``threshold`` / ``fp_rate``)."""
    return Cutoff(args.threshold, args.fp_rate)


def _check_outputs(args: argparse.Namespace) -> None:
    from services.label_estimation.outputs import check_writable

    if args.out.suffix.lower() != ".json":
        raise InputError(f"{args.out.name}: the candidates file must end in .json", field="out")
    check_writable(args.out, "out")
    if args.overlay is not None:
        if args.overlay.suffix.lower() != ".png":
            raise InputError(f"{args.overlay.name}: the overlay must end in .png", field="overlay")
        check_writable(args.overlay, "overlay")
    if args.sr is not None:
        check_writable(args.sr, "sr")


def run(args: argparse.Namespace) -> int:
    from services.cade.model import CadeModel
    from services.label_estimation.outputs import write_json

    task = task_named(args.task)
    cutoff = _cutoff(args)
    if (args.image is None) == (args.manifest is None):
        raise InputError("give exactly one of --image or --manifest", field="image")
    if args.manifest is not None:
        return _run_batch(args, task, cutoff)
    if args.shard is not None:
        raise InputError("splits a batch: give --manifest", field="shard")
    _check_outputs(args)
    image = read_image(args.image, series_instance_uid=args.series_uid)
    if args.sr is not None:  # refused before the model runs, as --seg is for estimate
        from services.core.io.dicom_sr import check_sr_source

        check_sr_source(image)
    with CadeModel(task, args.inference, args.model_repository) as model:
        threshold = cutoff.resolve(model)
        kept = detect_at(model, image, threshold)
    if args.overlay is not None:
        render_detections(image, kept, task, threshold, args.overlay)
    if args.sr is not None:
        from services.core.io.dicom_sr import write_detection_sr

        write_detection_sr(kept, image, args.image, args.sr, model_name=task.model_name)
    write_json(args.out, kept.as_dict(model=task.model_name))
    print(
        f"{task.name}: {len(kept.candidates)} candidate(s) at confidence ≥ {threshold:.3g} "
        f"({kept.model_version}) → {args.out}"
    )
    return 0


def _run_batch(args: argparse.Namespace, task: CadeTask, cutoff: Cutoff) -> int:
    """One ``<case_id>.json`` per manifest case (of ``--shard``), resumable (:mod:`services.batch.detect`)."""
    from services.batch.detect import run_detect_batch
    from services.batch.shards import parse_shard

    shard = parse_shard(args.shard)
    if args.overlay is not None:
        raise InputError("is for one image; a batch writes no overlays", field="overlay")
    if args.sr is not None:
        raise InputError("is for one image; a batch writes no SR", field="sr")
    return run_detect_batch(
        task, cutoff, args.manifest, args.out, args.inference, args.model_repository, shard
    )


def _ring_mask(image: Volume, result: DetectionResult) -> np.ndarray:
    """Each candidate's equivalent circle on its own axial slice (its contour is the ring drawn)."""
    mask = np.zeros(image.array.shape, dtype=bool)
    spacing = np.asarray(image.spacing, dtype=np.float64)
    for cand in result.candidates[:OVERLAY_MAX_CANDIDATES]:
        i, j, k = cand.center_voxel
        radius_mm = max(cand.diameter_mm / 2.0, 1.5 * float(spacing[:2].max()))
        reach = np.ceil(radius_mm / spacing[:2]).astype(int) + 1
        j0, j1 = max(0, j - reach[1]), min(mask.shape[1], j + reach[1] + 1)
        i0, i1 = max(0, i - reach[0]), min(mask.shape[2], i + reach[0] + 1)
        jj, ii = np.mgrid[j0:j1, i0:i1]
        index = np.stack([ii, jj, np.full_like(ii, k)], axis=-1)
        distance = np.linalg.norm(image.index_to_world(index) - np.asarray(cand.center_mm), axis=-1)
        mask[k, j0:j1, i0:i1] |= distance <= radius_mm
    return mask


def render_detections(
    image: Volume, result: DetectionResult, task: CadeTask, threshold: float, path: Path
) -> Path:
    """The overlay: the strongest candidates, numbered by rank, each a ring on its slice with a zoomed
    crop captioned with its confidence (a radiograph is one slice: the whole image with ranked rings)."""
    from services.core.overlay import ESTIMATE, LUNG, Finding, Outline, render_overlay

    shown = result.candidates[:OVERLAY_MAX_CANDIDATES]
    # A radiograph without a usable pixel spacing is read at an assumed 1 mm: its "mm" are pixels.
    units = "px" if image.metadata.get("pixel_spacing_source") == "assumed-1mm" else "mm"
    ring = Outline(_ring_mask(image, result), ESTIMATE, "candidate (equivalent circle)")
    findings = [
        Finding(
            lesion_id=rank,
            center_mm=cand.center_mm,
            diameter_mm=cand.diameter_mm,
            outlines=(ring,) if rank == 1 else (),  # one mask holds every ring: drawn once
            caption=f"#{rank} confidence {cand.confidence:.2f}, {cand.diameter_mm:.1f} {units}",
            mark_center=False,
        )
        for rank, cand in enumerate(shown, start=1)
    ]
    notes = [
        f"{result.model_version}: {len(result.candidates)} candidate(s) at confidence >= {threshold:.3g}"
        + (f", the {len(shown)} strongest shown" if len(shown) < len(result.candidates) else ""),
        "Numbers rank the candidates by confidence (1 = strongest). Not a diagnosis.",
    ]
    render_overlay(
        image,
        findings,
        path,
        title=f"wlcad detect {task.name}",
        notes=notes,
        window=LUNG if task.name == "chest-ct-nodule" else None,  # HU whatever the file's tags say
        orientation=False if task.dims == 2 else None,  # a radiograph's stored orientation is no fact
    )
    return path
