"""``wlcad circus build-plugin``: the files CIRCUS CS needs to register a wlcad plug-in.

A Docker plug-in is an image whose entrypoint reads ``/circus/in`` and whose ``/plugin.json``
describes it. The image is the wlcad runtime image (the repository's Dockerfile, which already holds
the package and the model repository) plus ``plugin.json`` and the ``run-plugin`` entrypoint, so a
plug-in runs exactly the code and models the services run, and building it needs no network beyond
the base image. With ``--remote-endpoint`` a ``plugin-remote.json`` (``CAD+remote``) is written too,
for the same capability served by ``wlcad circus serve-remote``.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.circus.plugin import SEMVER, Capability, PluginManifest
from services.core.errors import InputError
from services.core.version import software_version

__all__ = ["build_plugin", "dockerfile", "manifest"]

PLUGIN_FILE = "plugin.json"
REMOTE_PLUGIN_FILE = "plugin-remote.json"


def _version(version: str | None) -> str:
    chosen = version or software_version()
    if not SEMVER.match(chosen):
        raise InputError(f"{chosen!r} is not a semantic version; give --version x.y.z", field="version")
    return chosen


def manifest(capability: Capability, version: str, endpoint: str | None = None) -> PluginManifest:
    return PluginManifest(
        type="CAD+remote" if endpoint else "CAD",
        plugin_name=capability.plugin_name,
        version=version,
        description=capability.description,
        display_strategy=capability.display_strategy(),
        endpoint=endpoint,
    )


def dockerfile(capability: Capability, version: str, base_image: str) -> str:
    return f"""\
# syntax=docker/dockerfile:1
# CIRCUS CS plug-in {capability.plugin_name} {version} (type CAD), written by `wlcad circus build-plugin`.
#
# Build the wlcad runtime image first, from the repository root:  docker build -t {base_image} .
# then this folder:  docker build -t {capability.plugin_name}:{version} <this folder>
# and register the image with CIRCUS (node circus register-cad-plugin <image id>).
#
# CIRCUS mounts /circus/in (N.mhd, N.raw, N.json) and /circus/out; the entrypoint writes
# /circus/out/results.json last (its presence means success), exits 0, and on a bad input exits 2
# with one line naming it. It runs as 10001:10001: /circus/out must be writable by that user.
# Inference is embedded (ONNX Runtime): the container needs no network (docker run --network none).
ARG BASE_IMAGE={base_image}
FROM ${{BASE_IMAGE}}
ENV WLCAD_INFERENCE=embedded
COPY {PLUGIN_FILE} /plugin.json
# A batch job, not a server: the base image's gRPC health check does not apply.
HEALTHCHECK NONE
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["wlcad", "circus", "run-plugin", "--task", "{capability.name}"]
CMD []
"""


def build_plugin(
    capability: Capability,
    out_dir: Path,
    *,
    version: str | None = None,
    base_image: str | None = None,
    remote_endpoint: str | None = None,
) -> list[Path]:
    """Write Dockerfile and plugin.json (and plugin-remote.json) into ``out_dir``; checked first."""
    from services.core.atomic import write_bytes_atomically

    chosen = _version(version)
    image = base_image or f"wlcad:{software_version()}"
    if not image or any(c.isspace() for c in image):
        raise InputError(f"{image!r} is not an image reference", field="base-image")
    documents = {PLUGIN_FILE: manifest(capability, chosen)}
    if remote_endpoint is not None:
        documents[REMOTE_PLUGIN_FILE] = manifest(capability, chosen, remote_endpoint)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a folder", field="out")
    written = [write_bytes_atomically(out_dir / "Dockerfile", dockerfile(capability, chosen, image).encode())]
    for name, document in documents.items():
        body = (json.dumps(document.as_json(), indent=2) + "\n").encode()
        written.append(write_bytes_atomically(out_dir / name, body))
    return written
