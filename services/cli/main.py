"""Entry point of the ``wlcad`` command.

Errors caused by the input print one line naming the field and exit with status 2; anything else
prints one line and exits 70. Never a traceback, unless ``WLCAD_DEBUG=1`` asks for one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from services.cli import (
    batch_cmd,
    circus_cmd,
    circus_db_cmd,
    data_cmd,
    demo_cmd,
    detect_cmd,
    estimate_cmd,
    evaluate_cmd,
    experiment_cmd,
    feedback_cmd,
    info_cmd,
    inspect_cmd,
    models_cmd,
    pacs_cmd,
    phantom_cmd,
    score_cmd,
    serve_cmd,
    train_cmd,
    triton_cmd,
)
from services.cli.arguments import join_negative_values
from services.core.errors import InputError

EXIT_INPUT_ERROR = 2
EXIT_INTERNAL_ERROR = 70

_COMMANDS = (
    info_cmd,
    inspect_cmd,
    data_cmd,
    phantom_cmd,
    estimate_cmd,
    detect_cmd,
    score_cmd,
    evaluate_cmd,
    train_cmd,
    experiment_cmd,  # adds a protocol to train_cmd's 'experiment': after it
    models_cmd,
    triton_cmd,
    serve_cmd,
    demo_cmd,
    circus_cmd,
    pacs_cmd,
    circus_db_cmd,
    feedback_cmd,
    batch_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wlcad",
        description="Weak-Label CADe: lesion labels from centre + size, detectors and anomaly scores.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _COMMANDS:
        module.register(commands)
    return parser


_OWN_CODE = str(Path(__file__).resolve().parents[2])


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print wlcad's own warnings; drop third-party ones, which may quote DICOM values (patient names)."""
    if str(filename).startswith(_OWN_CODE) and "site-packages" not in str(filename):
        print(f"wlcad: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    warnings.showwarning = _show_warning
    try:
        return int(args.handler(args) or 0)
    except InputError as exc:
        print(f"wlcad: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("wlcad: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("WLCAD_DEBUG") == "1":
            raise
        print(
            f"wlcad: internal error: {type(exc).__name__}: {exc} (set WLCAD_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
