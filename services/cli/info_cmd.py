"""``wlcad info``: library versions, inference providers and the models in the repository."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]
_PACKAGES = (
    "wlcad",
    "numpy",
    "onnxruntime",
    "pydicom",
    "highdicom",
    "SimpleITK",
    "nibabel",
    "grpcio",
    "tritonclient",
    "torch",
    "monai",
)


def model_repository() -> Path:
    return Path(os.environ.get("WLCAD_MODEL_REPOSITORY", _REPO_ROOT / "model_repository"))


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("info", help="versions, inference providers and models found")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=run)


def collect() -> dict:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    import onnxruntime

    repository = model_repository()
    models = sorted(p.parent.name for p in repository.glob("*/config.pbtxt")) if repository.is_dir() else []
    return {
        "python": platform.python_version(),
        "versions": versions,
        "inference_providers": onnxruntime.get_available_providers(),
        "inference_setting": os.environ.get("WLCAD_INFERENCE", "embedded"),
        "model_repository": str(repository),
        "models": models,
    }


def run(args: argparse.Namespace) -> int:
    facts = collect()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    print(f"wlcad {facts['versions']['wlcad']} on Python {facts['python']}")
    for name, version in facts["versions"].items():
        print(f"  {name:<13} {version or 'not installed'}")
    print(
        f"inference: {facts['inference_setting']} (onnxruntime providers: {', '.join(facts['inference_providers'])})"
    )
    print(f"model repository: {facts['model_repository']}")
    print(f"  models: {', '.join(facts['models']) if facts['models'] else 'none yet'}")
    return 0
