"""The one capability table: every wlcad service, its proto service, ports, HTTP routes and servicer.

Everything that names a service is derived from this table: the gateway's routes
(``services.gateway.routes.ROUTES``), ``wlcad serve <name>|all``, and the checks that keep
docker-compose, the Helm values and the Prometheus targets in step (``tests/test_capabilities.py``).
Adding a capability is a proto, a servicer over :class:`services.servers.scaffold.CapabilityServicer`
and one :class:`Capability` here — or, out of tree, a module named in ``$WLCAD_CAPABILITY_PLUGINS``
(``package.module:ATTRIBUTE`` items, comma-separated) whose attribute is a ``Capability``.

The table holds names, not imports: the servicer is resolved only in the process that serves it, so
the gateway never imports a pipeline (or torch).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

PLUGINS_ENV = "WLCAD_CAPABILITY_PLUGINS"
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$")


@dataclass(frozen=True)
class HttpBinding:
    """``verb path`` → ``rpc``. An upload RPC (the upload shape of ``common.proto``) takes
    multipart/form-data: a ``file`` part, which becomes ``request.image.file``, and a ``request`` JSON part."""

    verb: str
    path: str
    rpc: str
    summary: str = ""


@dataclass(frozen=True)
class Capability:
    """One service of equal rank to the others.

    ``servicer`` is ``module:attribute`` of a factory taking :class:`ServiceSettings` and returning the
    servicer; ``idempotent`` RPCs are retried by the gateway on UNAVAILABLE.
    """

    name: str
    service: str
    port: int
    metrics_port: int
    servicer: str
    summary: str
    idempotent: frozenset[str] = frozenset()
    http: tuple[HttpBinding, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or self.name in ("all", "gateway", "token"):
            raise ValueError(f"capability name {self.name!r}: lower-case words joined by '-', not a command")
        if ":" not in self.servicer:
            raise ValueError(f"{self.name}: servicer must be 'module:attribute', got {self.servicer!r}")
        for port in (self.port, self.metrics_port):
            if not 1024 <= port <= 65535:
                raise ValueError(f"{self.name}: port {port} outside 1024..65535")

    @property
    def default_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def default_metrics_address(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    @property
    def descriptor(self) -> ServiceDescriptor:
        """The proto service (its module must be imported first; the gateway imports ``services.api.pb``
        and plugin modules import their own)."""
        return descriptor_pool.Default().FindServiceByName(self.service)

    def method(self, rpc: str) -> MethodDescriptor:
        return self.descriptor.methods_by_name[rpc]

    def servicer_factory(self) -> Callable[..., Any]:
        module, _, attribute = self.servicer.partition(":")
        return getattr(importlib.import_module(module), attribute)


BUILT_IN: tuple[Capability, ...] = (
    Capability(
        name="label-estimation",
        service="wlcad.v1.LabelEstimation",
        port=50061,
        metrics_port=9101,
        servicer="services.servers.label_estimation:LabelEstimationServicer",
        summary="lesion masks from weak labels (centre + diameter) and from RT Dose plans",
        idempotent=frozenset({"Estimate", "EstimateDose", "Describe"}),
        http=(
            HttpBinding("POST", "/v1/labels:estimate", "Estimate", "Lesion masks from centre + diameter"),
            HttpBinding(
                "POST",
                "/v1/labels:upload",
                "EstimateUpload",
                "The same, for an uploaded NIfTI/NRRD/MHA/DICOM file or DICOM zip (multipart)",
            ),
            HttpBinding(
                "POST",
                "/v1/labels:toPacs",
                "EstimateToPacs",
                "Estimate on a series of a configured DICOMweb server; store SEG/SR back there (STOW-RS)",
            ),
            HttpBinding("POST", "/v1/labels:estimateDose", "EstimateDose", "Lesion labels from an RT Dose"),
            HttpBinding("GET", "/v1/labels:describe", "Describe", "Methods offered and model versions"),
        ),
    ),
    Capability(
        name="cade",
        service="wlcad.v1.Detection",
        port=50062,
        metrics_port=9102,
        servicer="services.servers.cade:DetectionServicer",
        summary="lesion detection (CADe): ranked candidates with centre, diameter and confidence",
        idempotent=frozenset({"Detect", "Describe"}),
        http=(
            HttpBinding(
                "POST", "/v1/detections:detect", "Detect", "Lesion candidates of one image for one task"
            ),
            HttpBinding(
                "POST",
                "/v1/detections:upload",
                "DetectUpload",
                "The same, for an uploaded NIfTI/NRRD/MHA/DICOM file or DICOM zip (multipart)",
            ),
            HttpBinding(
                "POST",
                "/v1/detections:toPacs",
                "DetectToPacs",
                "Detect on a series of a configured DICOMweb server; store SEG/SR back there (STOW-RS)",
            ),
            HttpBinding(
                "GET",
                "/v1/detections:describe",
                "Describe",
                "Tasks offered, their model versions and operating points",
            ),
        ),
    ),
    Capability(
        name="anomaly",
        service="wlcad.v1.AnomalyScoring",
        port=50063,
        metrics_port=9103,
        servicer="services.servers.anomaly:AnomalyScoringServicer",
        summary="anomaly scores from presence-only labels, calibrated on normals (percentile, z)",
        idempotent=frozenset({"Score", "Describe"}),
        http=(
            HttpBinding("POST", "/v1/anomaly:score", "Score", "Anomaly score of one image for one task"),
            HttpBinding(
                "POST",
                "/v1/anomaly:upload",
                "ScoreUpload",
                "The same, for an uploaded NIfTI/NRRD/MHA/DICOM file or DICOM zip (multipart)",
            ),
            HttpBinding(
                "GET", "/v1/anomaly:describe", "Describe", "Models offered, their versions and calibration"
            ),
        ),
    ),
)


def _plugins(spec: str) -> tuple[Capability, ...]:
    found = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        module, sep, attribute = item.partition(":")
        if not sep:
            raise ValueError(f"${PLUGINS_ENV}: expected module:ATTRIBUTE, got {item!r}")
        capability = getattr(importlib.import_module(module), attribute)
        if not isinstance(capability, Capability):
            raise TypeError(f"${PLUGINS_ENV}: {item} is not a Capability")
        found.append(capability)
    return tuple(found)


def _table() -> tuple[Capability, ...]:
    table = BUILT_IN + _plugins(os.environ.get(PLUGINS_ENV, ""))
    for attribute in ("name", "service", "port", "metrics_port"):
        values = [getattr(c, attribute) for c in table]
        if len(set(values)) != len(values):
            raise ValueError(f"two capabilities share a {attribute}: {values}")
    return table


#: Every capability this process knows: the built-in ones, then the plugins.
CAPABILITIES: tuple[Capability, ...] = _table()


def capability(name: str) -> Capability:
    """The capability called ``name`` (KeyError names the known ones)."""
    for entry in CAPABILITIES:
        if entry.name == name:
            return entry
    raise KeyError(f"no capability {name!r}; known: {', '.join(c.name for c in CAPABILITIES)}")
