"""The routing table, derived from the capability table: which upstream serves which gRPC service,
and which HTTP paths map to its RPCs.

The gateway's core reads methods, streaming kinds and message types from the proto descriptors, so
a new capability (``services/capabilities.py``) needs no code here.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from services.api import pb  # noqa: F401 - registers the wlcad.v1 descriptors
from services.capabilities import CAPABILITIES, Capability, HttpBinding

__all__ = ["DEFAULT_UPSTREAMS", "ROUTES", "HttpBinding", "Route"]


@dataclass(frozen=True)
class Route:
    """One upstream service as the gateway sees it."""

    capability: Capability

    @property
    def name(self) -> str:
        return self.capability.name

    @property
    def service(self) -> str:
        return self.capability.service

    @property
    def idempotent(self) -> frozenset[str]:
        return self.capability.idempotent

    @property
    def http(self) -> tuple[HttpBinding, ...]:
        return self.capability.http

    @property
    def descriptor(self) -> ServiceDescriptor:
        return descriptor_pool.Default().FindServiceByName(self.service)

    def method(self, rpc: str) -> MethodDescriptor:
        return self.descriptor.methods_by_name[rpc]


ROUTES: tuple[Route, ...] = tuple(Route(c) for c in CAPABILITIES)

#: Default upstream addresses (``wlcad serve all`` starts the services there).
DEFAULT_UPSTREAMS = {c.name: c.default_address for c in CAPABILITIES}
