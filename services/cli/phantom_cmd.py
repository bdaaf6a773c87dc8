"""``wlcad phantom``: synthetic (or hybrid) lesion cases with exact masks and a weak-label manifest."""

from __future__ import annotations

import argparse
import json


def register(commands: argparse._SubParsersAction) -> None:
    from training.data.dataset import FORMATS, TASKS

    parser = commands.add_parser(
        "phantom",
        help="generate lesion phantoms: images, exact masks, manifest.csv (weak labels)",
    )
    parser.add_argument("--task", required=True, help=f"one of: {', '.join(TASKS)}")
    parser.add_argument("--n", type=int, default=8, help="number of cases (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--hybrid", action="store_true", help="insert lesions into the real sample image")
    parser.add_argument(
        "--preview", action="store_true", help="also write preview.png (ground-truth outlines)"
    )
    parser.add_argument(
        "--format", action="append", default=None, help=f"image formats ({', '.join(FORMATS)}); repeatable"
    )
    parser.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="grid size in voxels")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from training.data.dataset import write_dataset

    formats = tuple(dict.fromkeys(["nifti", *(args.format or [])]))
    summary = write_dataset(
        args.task,
        args.n,
        args.seed,
        args.out,
        hybrid_mode=args.hybrid,
        preview=args.preview,
        formats=formats,
        size_xyz=tuple(args.size) if args.size else None,
    )
    print(json.dumps(summary))
    return 0
