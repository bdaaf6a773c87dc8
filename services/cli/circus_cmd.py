"""``wlcad circus``: wlcad as a CIRCUS CS plug-in.

* ``run-plugin --task T``: the Docker plug-in's entrypoint: ``/circus/in`` → ``/circus/out/results.json``
  (exit 0; a bad input exits 2 with one line naming it, and writes no results.json).
* ``serve-remote --task T``: the ``CAD+remote`` endpoint (``POST /run``, ``GET /result/{id}``).
* ``build-plugin --task T --out DIR``: the plug-in's Dockerfile and plugin.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from services.circus.plugin import CAPABILITIES, CIRCUS_IN, CIRCUS_OUT


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("circus", help="run, serve or build wlcad as a CIRCUS CS plug-in")
    actions = parser.add_subparsers(dest="circus_action", metavar="ACTION", required=True)
    tasks = ", ".join(CAPABILITIES)

    run = actions.add_parser("run-plugin", help="the Docker plug-in: /circus/in → /circus/out/results.json")
    run.add_argument("--task", required=True, help=f"one of: {tasks}")
    run.add_argument("--in", dest="in_dir", type=Path, default=Path(CIRCUS_IN), help=f"default {CIRCUS_IN}")
    run.add_argument("--out", type=Path, default=Path(CIRCUS_OUT), help=f"default {CIRCUS_OUT}")
    run.add_argument("--method", default="unet", help="label-estimation method (label-estimation only)")
    run.add_argument("--model-repository", type=Path, metavar="DIR")
    run.set_defaults(handler=_run_plugin)

    serve = actions.add_parser("serve-remote", help="the CAD+remote endpoint over HTTP")
    serve.add_argument("--task", required=True, help=f"one of: {tasks}")
    serve.add_argument("--listen", default="127.0.0.1:8090", help="host:port (port 0: any free port)")
    serve.add_argument(
        "--secret-file", type=Path, required=True, help="the Bearer secret CIRCUS sends (one line)"
    )
    serve.add_argument("--endpoint-path", default="", help="path prefix of /run and /result (e.g. /wlcad)")
    serve.add_argument("--work-dir", type=Path, help="where jobs and results are kept (default: a temp dir)")
    serve.add_argument("--max-request-bytes", type=int, default=2 * 1024**3, help="largest POST /run body")
    serve.add_argument("--method", default="unet", help="label-estimation method (label-estimation only)")
    serve.add_argument("--model-repository", type=Path, metavar="DIR")
    serve.set_defaults(handler=_serve_remote)

    build = actions.add_parser("build-plugin", help="write the plug-in's Dockerfile and plugin.json")
    build.add_argument("--task", required=True, help=f"one of: {tasks}")
    build.add_argument("--out", type=Path, required=True, help="folder for Dockerfile and plugin.json")
    build.add_argument("--version", help="plug-in version (semver; default: wlcad's)")
    build.add_argument("--base-image", default=None, help="the wlcad runtime image (default wlcad:<version>)")
    build.add_argument("--remote-endpoint", help="also write plugin-remote.json (CAD+remote) for this URL")
    build.set_defaults(handler=_build_plugin)


def _run_plugin(args: argparse.Namespace) -> int:
    from services.circus.entrypoint import run_plugin, write_results
    from services.circus.plugin import capability_named

    capability = capability_named(args.task)

    def progress(line: str) -> None:
        if args.verbose:
            print(f"wlcad: {line}", file=sys.stderr)

    results = run_plugin(
        capability, args.in_dir, repository=args.model_repository, method=args.method, progress=progress
    )
    path = write_results(results, args.out)
    print(f"{capability.name}: {results.summary()} → {path}")
    return 0


def _serve_remote(args: argparse.Namespace) -> int:
    from services.circus.plugin import capability_named
    from services.circus.remote import RemoteConfig, serve

    config = RemoteConfig.from_options(
        capability_named(args.task),
        listen=args.listen,
        secret_file=args.secret_file,
        endpoint_path=args.endpoint_path,
        work_dir=args.work_dir,
        max_request_bytes=args.max_request_bytes,
        method=args.method,
        repository=args.model_repository,
    )
    serve(config)
    return 0


def _build_plugin(args: argparse.Namespace) -> int:
    from services.circus.build import build_plugin
    from services.circus.plugin import capability_named

    written = build_plugin(
        capability_named(args.task),
        args.out,
        version=args.version,
        base_image=args.base_image,
        remote_endpoint=args.remote_endpoint,
    )
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
