"""``wlcad triton``: serve the model repository with a real Triton server on this machine (CPU).

Runs the ``tritonserver`` from ``scripts/install-triton.sh`` on a python-backend twin of the
repository (see services/inference/triton_server.py), bound to 127.0.0.1, until Ctrl-C or SIGTERM.
Point services at it with ``WLCAD_INFERENCE=triton://127.0.0.1:<grpc-port>``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from services.core.errors import InputError
from services.inference.factory import default_repository
from services.inference.triton_server import TritonNotInstalledError, TritonServer


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("triton", help="run a local Triton server (CPU) on the model repository")
    parser.add_argument(
        "--repository",
        type=Path,
        default=None,
        help="model repository (default: $WLCAD_MODEL_REPOSITORY or ./model_repository)",
    )
    parser.add_argument("--grpc-port", type=_port, default=8001, help="gRPC port on 127.0.0.1 (default 8001)")
    parser.add_argument("--http-port", type=_port, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    parser.add_argument(
        "--metrics-port", type=_port, default=8002, help="metrics port on 127.0.0.1 (default 8002)"
    )
    parser.add_argument(
        "--no-dynamic-batching",
        action="store_true",
        help="serve without the configs' dynamic_batching (for comparisons)",
    )
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to wait for readiness")
    parser.set_defaults(handler=run)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r}")
    return int(text)


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    root = args.repository or default_repository()
    if not root.is_dir():
        raise InputError(f"not a folder: {root}", field="--repository")
    try:
        server = TritonServer(
            root,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            dynamic_batching=not args.no_dynamic_batching,
        )
    except TritonNotInstalledError as exc:
        print(f"wlcad: error: {exc}", file=sys.stderr)
        return 1
    if not server.models:
        print(f"wlcad: warning: no models in {root}; Triton will serve none", file=sys.stderr)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        try:
            server.start(timeout_s=args.startup_timeout)
        except RuntimeError as exc:
            print(f"wlcad: error: {exc}", file=sys.stderr)
            return 1
        print(
            f"triton ready: grpc {server.grpc_url}  http {server.http_url}  metrics 127.0.0.1:{server.metrics_port}\n"
            f"models: {', '.join(server.models) or 'none'}\n"
            f"use it with: WLCAD_INFERENCE=triton://{server.grpc_url}   (Ctrl-C stops)",
            flush=True,
        )
        while server.process.poll() is None:
            time.sleep(0.5)
        print(
            f"wlcad: error: tritonserver exited with {server.process.returncode}:\n{server.log_tail()}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("stopping triton", file=sys.stderr, flush=True)
        return 0
    finally:
        server.cleanup()
