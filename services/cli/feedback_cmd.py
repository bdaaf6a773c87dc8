"""``wlcad feedback``: reader verdicts on detection candidates grow a training manifest.

* ``ingest FEEDBACK --candidates C --manifest M [--out M2]``: TP verdicts become sphere-label rows,
  FP verdicts hard-negative rows (docs/feedback.md); prints what it did as JSON. Idempotent.
* ``simulate --candidates C --manifest TRUTH``: a phantom reader's verdicts (TP within a true
  lesion's radius, else FP) as the plain ``{rank: verdict}`` JSON, for experiments on phantoms.

``C`` is a ``wlcad detect`` JSON or a CIRCUS ``results.json``; its case is ``--case`` or the file's
stem (``wlcad detect --manifest`` writes ``<case_id>.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from services.core.errors import InputError

#: A feedback or candidates file larger than this is not one reader's verdicts on one case.
MAX_JSON_BYTES = 32 * 1024 * 1024


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("feedback", help="reader verdicts → sphere labels and hard negatives")
    actions = parser.add_subparsers(dest="feedback_action", metavar="ACTION", required=True)

    ingest = actions.add_parser("ingest", help="grow a manifest with the verdicts on one case's candidates")
    ingest.add_argument(
        "feedback", type=Path, metavar="FEEDBACK", help="CIRCUS feedback JSON or {rank: TP|FP}"
    )
    _common(ingest)
    ingest.add_argument("--out", type=Path, help="the grown manifest (default: --manifest, in place)")
    ingest.add_argument("--feedback-key", default="lesionCandidates", help="the LesionCandidates feedbackKey")
    ingest.add_argument(
        "--choices", default="TP,FP", help="verdict of each Choice option index (default TP,FP: 0=TP, 1=FP)"
    )
    ingest.add_argument("--lesion-type", help="lesion_type of new lesion rows (default: the case's)")
    ingest.set_defaults(handler=_ingest)

    simulate = actions.add_parser("simulate", help="a phantom reader's verdicts from the true lesions")
    _common(simulate)
    simulate.add_argument("--out", type=Path, help="write the verdicts here (default: stdout)")
    simulate.set_defaults(handler=_simulate)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--candidates", type=Path, required=True, help="wlcad detect JSON or CIRCUS results.json"
    )
    parser.add_argument("--manifest", type=Path, required=True, help="the manifest CSV")
    parser.add_argument("--case", help="the case the candidates are on (default: the candidates file's stem)")
    parser.add_argument("--image", type=Path, help="CIRCUS results: the volume its voxel locations index")


def _load(path: Path, field: str) -> Any:
    try:
        size = path.stat().st_size
    except OSError:
        raise InputError(f"{path.name} does not exist", field=field) from None
    if size > MAX_JSON_BYTES:
        raise InputError(f"{path.name} is {size} bytes, over {MAX_JSON_BYTES}", field=field)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path.name} is not readable JSON ({type(exc).__name__})", field=field) from None


def _candidates(args: argparse.Namespace) -> tuple[str, list]:
    from services.core.manifest import read_manifest
    from services.feedback.candidates import circus_candidates, detect_candidates, is_circus_results

    case_id = args.case or args.candidates.stem
    document = _load(args.candidates, "candidates")
    if not is_circus_results(document):
        return case_id, detect_candidates(document)
    from services.core.io import read_image

    image = args.image
    if image is None:
        rows = [r for r in read_manifest(args.manifest, check_files=False) if r["case_id"] == case_id]
        if not rows:
            raise InputError(f"case {case_id[:64]!r} is not in the manifest", field="case")
        image = rows[0]["image"]
    return case_id, circus_candidates(document, read_image(image))


def _ingest(args: argparse.Namespace) -> int:
    from services.feedback.ingest import ingest_feedback
    from services.feedback.verdicts import parse_choices, parse_verdicts

    verdicts = parse_verdicts(
        _load(args.feedback, "feedback"), feedback_key=args.feedback_key, choices=parse_choices(args.choices)
    )
    case_id, candidates = _candidates(args)
    result = ingest_feedback(
        verdicts, candidates, args.manifest, case_id, out=args.out, lesion_type=args.lesion_type
    )
    sys.stdout.write(json.dumps(result.as_dict(), indent=1) + "\n")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from services.feedback.ingest import phantom_verdicts

    case_id, candidates = _candidates(args)
    body = json.dumps(phantom_verdicts(candidates, args.manifest, case_id), indent=1) + "\n"
    if args.out is not None:
        from services.core.atomic import write_bytes_atomically

        write_bytes_atomically(args.out, body.encode())
    else:
        sys.stdout.write(body)
    return 0
