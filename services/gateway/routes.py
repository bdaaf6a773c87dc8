"""The routing table: which upstream serves which gRPC service, and which HTTP paths map to its RPCs.

Adding a capability (CADe, anomaly scoring) is a new proto + service module + one ``Route`` here;
the gateway's core reads methods, streaming kinds and message types from the proto descriptors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from services.api import pb  # noqa: F401 - registers the wlcad.v1 descriptors


@dataclass(frozen=True)
class HttpBinding:
    """``verb path`` → ``rpc``. An ``upload`` binding takes multipart/form-data (a ``file`` part and a
    ``request`` JSON part) and calls a client-streaming RPC whose messages have the ``request`` /
    ``chunk`` oneof of ``EstimateUploadMessage``; the file goes into ``request.image.file``."""

    verb: str
    path: str
    rpc: str
    upload: bool = False
    summary: str = ""


@dataclass(frozen=True)
class Route:
    """One upstream service. ``idempotent`` RPCs are retried on UNAVAILABLE."""

    name: str
    service: str
    idempotent: frozenset[str]
    http: tuple[HttpBinding, ...] = field(default_factory=tuple)

    @property
    def descriptor(self) -> ServiceDescriptor:
        return descriptor_pool.Default().FindServiceByName(self.service)

    def method(self, rpc: str) -> MethodDescriptor:
        return self.descriptor.methods_by_name[rpc]


ROUTES: tuple[Route, ...] = (
    Route(
        name="label-estimation",
        service="wlcad.v1.LabelEstimation",
        idempotent=frozenset({"Estimate", "EstimateDose", "Describe"}),
        http=(
            HttpBinding(
                "POST", "/v1/labels:estimate", "Estimate", summary="Lesion masks from centre + diameter"
            ),
            HttpBinding(
                "POST",
                "/v1/labels:upload",
                "EstimateUpload",
                upload=True,
                summary="The same, for an uploaded NIfTI/NRRD/MHA/DICOM file or DICOM zip (multipart)",
            ),
            HttpBinding(
                "POST", "/v1/labels:estimateDose", "EstimateDose", summary="Lesion labels from an RT Dose"
            ),
            HttpBinding(
                "GET", "/v1/labels:describe", "Describe", summary="Methods offered and model versions"
            ),
        ),
    ),
)

#: Default upstream addresses (``wlcad serve all`` starts the services there).
DEFAULT_UPSTREAMS = {"label-estimation": "127.0.0.1:50061"}
