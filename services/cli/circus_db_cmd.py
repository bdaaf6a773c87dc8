"""``wlcad circus-db``: CIRCUS DB case labels as weak labels, and the label sync.

* ``sync --url URL --case ID``: pull the case, estimate voxel labels from its ellipsoid / point + ruler
  labels, store the masks as blobs and post a new revision (nothing is posted when the latest revision
  already holds the same labels). The API token comes from ``$WLCAD_CIRCUS_TOKEN`` (``--token-env``).
* ``labels --case-json CASE --image PATH``: the weak labels of an exported case (or a labels list) on
  an image's grid, as JSON, offline.

Exit status: 0 done; 2 bad input (one line naming it); 1 CIRCUS refused a request (4xx); 69 CIRCUS
unreachable, timed out, failed (5xx) or answered beyond a bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.circus_db.client import (
    DEFAULT_MAX_VOLUME_BYTES,
    DEFAULT_TIMEOUT_S,
    DEFAULT_TOKEN_ENV,
)
from services.core.errors import InputError

EXIT_REFUSED = 1
#: sysexits EX_UNAVAILABLE: CIRCUS, not the request, failed.
EXIT_UNAVAILABLE = 69


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("circus-db", help="CIRCUS DB labels: weak labels in, voxel labels back")
    actions = parser.add_subparsers(dest="circus_db_action", metavar="ACTION", required=True)

    sync = actions.add_parser("sync", help="estimate a case's voxel labels and post them as a revision")
    sync.add_argument("--url", required=True, help="the CIRCUS server, http(s)://host[:port] (API at /api)")
    sync.add_argument("--rs-url", help="CIRCUS RS if not at {url}/rs")
    sync.add_argument("--case", required=True, dest="case_id", help="the CIRCUS case id")
    sync.add_argument("--method", default="threshold", help="label-estimation method (default threshold)")
    sync.add_argument(
        "--token-env", default=DEFAULT_TOKEN_ENV, help=f"variable holding the token ({DEFAULT_TOKEN_ENV})"
    )
    sync.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="per request")
    sync.add_argument("--max-volume-bytes", type=int, default=DEFAULT_MAX_VOLUME_BYTES)
    sync.add_argument("--dry-run", action="store_true", help="estimate, post nothing")
    sync.add_argument("--report", type=Path, help="also write the sync report (JSON) here")
    sync.set_defaults(handler=_sync)

    labels = actions.add_parser("labels", help="an exported case's weak labels on an image's grid (JSON)")
    labels.add_argument("--case-json", type=Path, required=True, help="a case JSON, or a JSON list of labels")
    labels.add_argument("--image", type=Path, required=True, help="the series' image (its grid)")
    labels.add_argument("--series-index", type=int, default=0, help="which series of the latest revision")
    labels.set_defaults(handler=_labels)


def _sync(args: argparse.Namespace) -> int:
    from services.circus_db.client import CircusDbClient, CircusRefusedError, CircusUnavailableError
    from services.circus_db.sync import sync_case
    from services.label_estimation.methods import method_named
    from services.label_estimation.pipeline import LabelEstimator

    method = method_named(args.method)
    client = CircusDbClient.from_env(
        args.url,
        args.token_env,
        rs_url=args.rs_url,
        timeout_s=args.timeout_s,
        max_volume_bytes=args.max_volume_bytes,
    )
    model = None
    if method.model:
        from services.label_estimation.model import UnetModel

        model = UnetModel()

    def progress(line: str) -> None:
        if args.verbose:
            print(f"wlcad: {line}", file=sys.stderr)

    try:
        result = sync_case(
            client,
            args.case_id,
            method=method.name,
            estimator=LabelEstimator(model),
            dry_run=args.dry_run,
            progress=progress,
        )
    except CircusRefusedError as exc:
        print(f"wlcad: CIRCUS refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except CircusUnavailableError as exc:
        print(f"wlcad: CIRCUS unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    finally:
        if model is not None:
            model.close()
    body = json.dumps(result.as_dict(), indent=1) + "\n"
    if args.report is not None:
        from services.core.atomic import write_bytes_atomically

        write_bytes_atomically(args.report, body.encode())
    sys.stdout.write(body)
    return 0


def _labels(args: argparse.Namespace) -> int:
    from services.circus_db.labels import weak_labels
    from services.core.io import read_image

    try:
        document = json.loads(args.case_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(
            f"{args.case_json.name} is not readable JSON ({type(exc).__name__})", field="case_json"
        ) from None
    if isinstance(document, dict):
        revisions = document.get("revisions")
        if not isinstance(revisions, list) or not revisions or not isinstance(revisions[-1], dict):
            raise InputError("a case needs a non-empty revisions list", field="case_json")
        series = revisions[-1].get("series")
        if not isinstance(series, list) or not 0 <= args.series_index < len(series):
            raise InputError(f"the latest revision has no series {args.series_index}", field="series_index")
        labels = (
            series[args.series_index].get("labels") if isinstance(series[args.series_index], dict) else None
        )
    else:
        labels = document
    found = weak_labels(labels, read_image(args.image))
    out = {
        "lesions": [
            {
                "lesion_id": w.prompt.lesion_id,
                "kind": w.kind,
                "source_labels": list(w.source),
                "center_mm": [round(v, 3) for v in w.prompt.center_mm],
                "center_voxel": [round(v, 3) for v in w.center_voxel],
                "diameter_mm": round(w.prompt.diameter_mm, 3),
                "axes_mm": None if w.prompt.axes_mm is None else [round(v, 3) for v in w.prompt.axes_mm],
            }
            for w in found.lesions
        ],
        "skipped": [vars(s) for s in found.skipped],
    }
    sys.stdout.write(json.dumps(out, indent=1) + "\n")
    return 0
