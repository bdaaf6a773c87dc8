"""``wlcad pacs run``: fetch a series from a DICOMweb PACS, run a task, store SEG/SR back, find them.

Exit status: 0 when every stored object was found again by QIDO-RS; 2 for a bad request (naming the
option, nothing fetched); 69 when the PACS is unreachable, slow or refuses; 1 when the results were
sent but QIDO-RS does not list them. Prints counts and the new objects' UIDs (wlcad's own), never a
patient attribute.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services.core.errors import InputError

#: sysexits EX_UNAVAILABLE: the PACS, not the request, failed.
EXIT_PACS_UNAVAILABLE = 69
EXIT_NOT_FOUND = 1


def register(commands: argparse._SubParsersAction) -> None:
    from services.pacs.run import PACS_TASKS

    parser = commands.add_parser(
        "pacs",
        help="DICOMweb round trip: fetch a series, run a task, STOW-RS SEG/SR back, QIDO-RS find them",
        description="See docs/pacs.md.",
    )
    actions = parser.add_subparsers(dest="pacs_command", metavar="ACTION", required=True)
    run_parser = actions.add_parser(
        "run",
        help="one series through one task, results stored in its study",
        description=(
            "Fetches --series of --study by WADO-RS (refused first by QIDO-RS when over the service's "
            "limits), runs --task, stores a DICOM SEG and an SR TID 1500 by STOW-RS into the same study "
            "and confirms them by QIDO-RS. Detection tasks need no prompts; label-estimation needs "
            "--prompts FILE: JSON [{center_mm: [x,y,z] | center_voxel: [i,j,k], diameter_mm, lesion_id?, "
            "lesion_type?}, ...]."
        ),
    )
    run_parser.add_argument("--url", required=True, help="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    run_parser.add_argument("--study", required=True, metavar="UID", help="StudyInstanceUID")
    run_parser.add_argument("--series", required=True, metavar="UID", help="SeriesInstanceUID")
    run_parser.add_argument("--task", required=True, metavar="TASK", help=f"one of: {', '.join(PACS_TASKS)}")
    run_parser.add_argument("--prompts", type=Path, metavar="JSON", help="lesion prompts (label-estimation)")
    run_parser.add_argument("--method", default="unet", help="label-estimation method (default unet)")
    run_parser.add_argument("--threshold", type=float, metavar="T", help="detection: least confidence")
    run_parser.add_argument(
        "--fp-rate", type=float, metavar="R", help="detection: the card's point at R FP/case"
    )
    run_parser.add_argument(
        "--inference", metavar="SETTING", help="embedded (default) or triton://host:port ($WLCAD_INFERENCE)"
    )
    run_parser.add_argument("--model-repository", type=Path, metavar="DIR", help="default model_repository/")
    run_parser.add_argument("--timeout-s", type=float, default=30.0, help="each connect/read (default 30)")
    run_parser.add_argument(
        "--total-timeout-s", type=float, default=600.0, help="the whole series fetch (default 600)"
    )
    run_parser.add_argument(
        "--token-env",
        metavar="NAME",
        help="send 'Authorization: Bearer $NAME' (the token is read from the environment, never an argument)",
    )
    run_parser.add_argument("--report", type=Path, metavar="JSON", help="also write the result as JSON here")
    run_parser.set_defaults(handler=run)


def _headers(token_env: str | None) -> dict[str, str] | None:
    if token_env is None:
        return None
    token = os.environ.get(token_env, "")
    if not token.strip():
        raise InputError(f"${token_env} is empty or not set", field="token_env")
    return {"Authorization": f"Bearer {token.strip()}"}


def run(args: argparse.Namespace) -> int:
    from services.label_estimation.outputs import check_writable, write_json
    from services.pacs.client import PacsUnavailableError
    from services.pacs.prompts import read_prompts
    from services.pacs.run import PacsRunRequest, run_pacs

    if args.report is not None:
        if args.report.suffix.lower() != ".json":
            raise InputError(f"{args.report.name}: the report must end in .json", field="report")
        check_writable(args.report, "report")
    request = PacsRunRequest(
        url=args.url,
        study=args.study,
        series=args.series,
        task=args.task,
        prompts=tuple(read_prompts(args.prompts)) if args.prompts is not None else (),
        method=args.method,
        threshold=args.threshold,
        fp_rate=args.fp_rate,
        model_repository=args.model_repository,
        inference=args.inference,
        timeout_s=args.timeout_s,
        total_timeout_s=args.total_timeout_s,
        headers=_headers(args.token_env),
    )
    try:
        result = run_pacs(request)
    except PacsUnavailableError as exc:
        print(f"wlcad: error: PACS: {exc}", file=sys.stderr)
        return EXIT_PACS_UNAVAILABLE
    if args.report is not None:
        write_json(args.report, result.as_dict())
    print(
        f"{result.task}: {result.instances_fetched} instances fetched, {result.findings} finding(s) "
        f"({result.model_version}); stored {len(result.stored)}, found again by QIDO-RS "
        f"{sum(o.found for o in result.stored)}"
    )
    for item in result.stored:
        print(
            f"  {item.kind}: series {item.series_instance_uid} instance {item.sop_instance_uid}"
            + ("" if item.found else " (NOT FOUND)")
        )
    return 0 if result.all_found else EXIT_NOT_FOUND
