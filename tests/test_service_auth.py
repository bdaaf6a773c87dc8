"""Authentication between the gateway and a capability's service (``services/servers/service_auth.py``).

A service on a non-loopback address without token hashes refuses to start (exit 2, one line naming
``--listen``); with them, every RPC but ``grpc.health.v1`` needs ``authorization: Bearer <token>``
and a refused upload is answered before its handler runs. The gateway's client tokens and the
service's tokens are separate sets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.core.errors import InputError
from services.gateway.auth import ENV_HASHES as GATEWAY_HASHES
from services.gateway.auth import TokenSet, new_token
from services.servers.service_auth import (
    ENV_SERVICE_HASHES,
    ENV_UPSTREAM_TOKEN,
    ServiceAuthInterceptor,
    check_listen,
    load_service_tokens,
    load_upstream_token,
)
from tests.serving_support import REPO_ROOT, free_port


def _wlcad(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in (ENV_SERVICE_HASHES, ENV_UPSTREAM_TOKEN)}
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**clean, **(env or {})},
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "10.1.2.3"])
def test_service_refuses_a_non_loopback_listen_without_tokens(host: str) -> None:
    result = _wlcad("serve", "label-estimation", "--listen", f"{host}:{free_port()}", "--metrics-listen", "")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("wlcad: error: --listen: ") and "--tokens-file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_listen_check_accepts_loopback_or_tokens() -> None:
    tokens = TokenSet([new_token()[1]])
    for address in ("127.0.0.1:1", "localhost:1", "[::1]:1"):
        check_listen(address, None)
    check_listen("0.0.0.0:1", tokens)
    with pytest.raises(InputError, match="--listen"):
        check_listen("no-port", tokens)


def test_service_tokens_come_from_their_own_file_or_variable_not_the_gateways(tmp_path, monkeypatch) -> None:
    service_token, service_hash = new_token()
    client_token, client_hash = new_token()
    monkeypatch.setenv(GATEWAY_HASHES, client_hash)
    monkeypatch.delenv(ENV_SERVICE_HASHES, raising=False)
    assert load_service_tokens(None) is None  # the gateway's client tokens do not count
    monkeypatch.setenv(ENV_SERVICE_HASHES, service_hash)
    tokens = load_service_tokens(None)
    assert tokens.check(f"Bearer {service_token}") and not tokens.check(f"Bearer {client_token}")
    hashes = tmp_path / "hashes"
    hashes.write_text("# from wlcad serve token\n" + client_hash + "\n")
    assert load_service_tokens(hashes).check(f"Bearer {client_token}")
    with pytest.raises(InputError, match="--tokens-file"):
        load_service_tokens(tmp_path / "absent")


def test_upstream_token_from_file_or_variable_and_an_empty_file_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(ENV_UPSTREAM_TOKEN, raising=False)
    assert load_upstream_token(None) is None
    monkeypatch.setenv(ENV_UPSTREAM_TOKEN, "from-env")
    assert load_upstream_token(None) == "from-env"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert load_upstream_token(token_file) == "from-file"
    token_file.write_text("\n")
    with pytest.raises(InputError, match="--upstream-token-file"):
        load_upstream_token(token_file)


def test_gateway_refuses_an_empty_upstream_token_file(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("")
    result = _wlcad(
        "serve", "gateway", "--grpc-listen", f"127.0.0.1:{free_port()}", "--upstream-token-file", str(empty)
    )
    assert result.returncode == 2
    assert result.stderr.startswith("wlcad: error: --upstream-token-file: ") and "empty" in result.stderr


# --- the interceptor on a real grpc server on 127.0.0.1 -------------------------------------------


def _identity(data: bytes) -> bytes:
    return data


@pytest.fixture
def guarded_server():
    """A sync grpc server with the interceptor, a unary echo, an upload (client stream) that counts
    its calls, and the standard health service; yields (address, token, calls)."""
    token, digest = new_token()
    calls: list[str] = []

    def echo(request: bytes, context) -> bytes:
        calls.append("echo")
        return request

    def upload(requests, context) -> bytes:
        calls.append("upload")
        return b"".join(requests)

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo, _identity, _identity),
        "Upload": grpc.stream_unary_rpc_method_handler(upload, _identity, _identity),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=[ServiceAuthInterceptor(TokenSet([digest]))]
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Guarded", handlers),))
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    server.start()
    try:
        yield address, token, calls
    finally:
        server.stop(grace=None)


def test_interceptor_requires_the_token_except_for_health(guarded_server) -> None:
    address, token, calls = guarded_server
    with grpc.insecure_channel(address) as channel:
        echo = channel.unary_unary("/test.Guarded/Echo", _identity, _identity)
        upload = channel.stream_unary("/test.Guarded/Upload", _identity, _identity)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", token),)):
            with pytest.raises(grpc.RpcError) as refused:
                echo(b"x", metadata=metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:
            upload(iter([b"a" * 1000] * 50), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert calls == []  # refused before any handler ran

        bearer = (("authorization", f"Bearer {token}"),)
        assert echo(b"hello", metadata=bearer, timeout=10) == b"hello"
        assert upload(iter([b"a", b"b"]), metadata=bearer, timeout=10) == b"ab"
        assert calls == ["echo", "upload"]

        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- a real service process with tokens ---------------------------------------------------------


def test_a_service_with_tokens_refuses_calls_without_one(tmp_path: Path) -> None:
    from services.api.pb import label_estimation_pb2_grpc as pb_grpc
    from tests.serving_support import estimate_request, small_volume, start_service, wait_serving

    token, digest = new_token()
    hashes = tmp_path / "hashes"
    hashes.write_text(digest + "\n")
    service, address, _ = start_service(tmp_path, extra=["--tokens-file", str(hashes)])
    try:
        for _ in range(60):  # health needs no token; a service that exits is a failure at once
            assert service.alive(), (tmp_path / "service.log").read_text()[-2000:]
            try:
                wait_serving(address, timeout_s=2)
                break
            except TimeoutError:
                continue
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.LabelEstimationStub(channel)
            request = estimate_request(small_volume())
            with pytest.raises(grpc.RpcError) as refused:
                stub.Estimate(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Estimate(request, metadata=(("authorization", f"Bearer {token}"),), timeout=60)
            assert len(reply.lesions) == 1
    finally:
        service.stop()
