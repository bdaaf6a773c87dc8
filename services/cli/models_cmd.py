"""``wlcad models check``: verify every model in the repository before it ships.

Each model's config.pbtxt must parse with Triton's own protobuf, its ONNX inputs/outputs must match
the config, and its model card must list every version with the sha256 of that model.onnx. Exit 0
when all pass, 1 when any model has a problem (each printed on its own line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.core.errors import InputError
from services.inference.checks import check_model
from services.inference.factory import default_repository
from services.inference.repository import ModelRepository


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("models", help="inspect the model repository")
    actions = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="verify configs, ONNX signatures and model-card checksums")
    check.add_argument(
        "--repository",
        type=Path,
        default=None,
        help="model repository (default: $WLCAD_MODEL_REPOSITORY or ./model_repository)",
    )
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(handler=run_check)


def run_check(args: argparse.Namespace) -> int:
    root = args.repository or default_repository()
    if not root.is_dir():
        raise InputError(f"not a folder: {root}", field="--repository")
    repository = ModelRepository(root)
    results = {name: check_model(repository, name) for name in repository.model_names()}
    if args.json:
        print(json.dumps({"repository": str(root), "models": results}, indent=2))
    elif not results:
        print(f"no models in {root} (nothing to check)")
    else:
        for name, problems in results.items():
            print(f"{name}: {'ok' if not problems else 'FAILED'}")
            for problem in problems:
                print(f"  - {problem}")
    return 1 if any(results.values()) else 0
