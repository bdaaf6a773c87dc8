"""The routing table: the capability table as the gateway reads it (which upstream serves which gRPC
service, and which HTTP paths map to its RPCs).

The gateway's core reads methods, streaming kinds and message types from the proto descriptors, so
a new capability (``services/capabilities.py``) needs no code here.
"""

from __future__ import annotations

from services.api import pb  # noqa: F401 - registers the wlcad.v1 descriptors
from services.capabilities import CAPABILITIES, Capability, HttpBinding

__all__ = ["DEFAULT_UPSTREAMS", "ROUTES", "HttpBinding", "Route"]

#: A route is a capability: its service descriptor and methods come from ``Capability.descriptor``.
Route = Capability
ROUTES: tuple[Route, ...] = CAPABILITIES

#: Default upstream addresses (``wlcad serve all`` starts the services there).
DEFAULT_UPSTREAMS = {c.name: c.default_address for c in CAPABILITIES}
