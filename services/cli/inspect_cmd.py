"""``wlcad inspect PATH``: the geometry of any readable image as JSON, in ITK (x, y, z) order."""

from __future__ import annotations

import argparse
import json

from services.core.io import read_image


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect",
        help="print an image's shape, spacing, origin, direction (ITK x,y,z order, LPS mm) as JSON",
    )
    parser.add_argument("path", help="DICOM folder or file, NIfTI, NRRD, MHA/MHD, or CIRCUS CS input")
    parser.add_argument("--series-uid", help="pick one series when a DICOM folder holds several")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    volume = read_image(args.path, series_instance_uid=args.series_uid)
    print(json.dumps(volume.describe()))
    return 0
