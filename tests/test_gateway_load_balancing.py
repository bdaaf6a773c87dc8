"""The gateway's upstream channels spread calls over every address a name resolves to (round_robin),
so replicas behind a headless Kubernetes Service share the load; and services age connections out so
clients re-resolve and find replicas added later."""

from __future__ import annotations

from concurrent import futures

import grpc

from services.gateway.core import channel_options
from services.servers.grpc_server import grpc_options

METHOD = "/wlcad.test.Echo/Port"


def echo_server(label: bytes) -> tuple[grpc.Server, int]:
    """A real gRPC server whose one unary method answers its own label."""
    handler = grpc.method_handlers_generic_handler(
        "wlcad.test.Echo", {"Port": grpc.unary_unary_rpc_method_handler(lambda request, context: label)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=grpc_options())
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_calls_through_the_gateways_channel_options_reach_every_replica():
    servers = [echo_server(b"a"), echo_server(b"b")]
    try:
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for _, port in servers)
        with grpc.insecure_channel(target, options=channel_options()) as channel:
            call = channel.unary_unary(METHOD)
            seen = [call(b"", timeout=30, wait_for_ready=True) for _ in range(20)]
    finally:
        for server, _ in servers:
            server.stop(None)
    assert set(seen) == {b"a", b"b"}
    assert min(seen.count(b"a"), seen.count(b"b")) >= 5  # shared, not one call on the second pod


def test_services_age_connections_out_so_clients_re_resolve():
    options = dict(grpc_options())
    assert 0 < options["grpc.max_connection_age_ms"] <= 15 * 60 * 1000
    assert options["grpc.max_connection_age_grace_ms"] > 0
