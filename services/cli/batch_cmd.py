"""``wlcad batch merge DIR``: the summary of a run split into ``--shard K/N`` processes (an Indexed Job)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("batch", help="archive-scale batch: merge the shards of a sharded run")
    actions = parser.add_subparsers(dest="batch_command", metavar="WHAT", required=True)
    merge = actions.add_parser(
        "merge",
        help="check that the shard summaries cover the manifest, write the run's summary",
        description=(
            "After every 'wlcad detect|estimate --manifest M --out DIR --shard K/N' (K = 0 … N-1) ended: "
            "checks that the N shard summaries cover the manifest exactly once and writes the summary an "
            "unsharded run writes (estimate: DIR/summary.csv; detect: DIR/summary/summary.json and, when "
            "the manifest has lesions, DIR/summary/froc.json)."
        ),
    )
    merge.add_argument("dir", type=Path, metavar="DIR", help="the --out folder of the shards")
    merge.add_argument(
        "--manifest",
        type=Path,
        help="the shards' manifest (default: the path they recorded; checked by digest)",
    )
    merge.set_defaults(handler=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from services.batch.merge import merge

    return merge(args.dir, args.manifest).status
