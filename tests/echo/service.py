"""The echo capability: a proto, a servicer over the scaffold and one table entry — nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

from services.api import pb as _wlcad  # noqa: F401 - wlcad/v1/image.proto is imported by echo.proto
from services.api.upload import upload_shape
from services.capabilities import Capability, HttpBinding
from services.core.errors import InputError
from services.servers.scaffold import CapabilityServicer

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parents[1] / "proto")]  # protoc include paths
try:
    echo_pb2, _ = grpc.protos_and_services("echo.proto")
finally:
    del sys.path[:2]

UPLOAD = upload_shape(echo_pb2.MeasureUploadMessage.DESCRIPTOR)


class EchoServicer(CapabilityServicer):
    component = "echo"

    def Say(self, request, context):  # noqa: N802 - gRPC names
        return self.handle("Say", context, lambda: _say(request))

    def Count(self, request, context):  # noqa: N802 - gRPC names
        for value in range(1, request.up_to + 1):
            yield echo_pb2.CountReply(value=value)

    def MeasureUpload(self, messages, context):  # noqa: N802 - gRPC names
        return self.handle_upload("MeasureUpload", context, messages, UPLOAD, lambda request: None, _measure)


def _say(request):
    if not request.text:
        raise InputError("say something", field="text")
    return echo_pb2.EchoReply(text=request.text, component="echo")


def _measure(request, image):
    return echo_pb2.MeasureReply(shape_xyz=list(image.shape_xyz), sum=float(image.array.sum()))


ECHO = Capability(
    name="echo",
    service="wlcad.test.v1.Echo",
    port=50099,
    metrics_port=9199,
    servicer="tests.echo.service:EchoServicer",
    summary="echo for the capability-table test",
    idempotent=frozenset({"Say"}),
    http=(
        HttpBinding("POST", "/v1/echo:say", "Say"),
        HttpBinding("POST", "/v1/echo:count", "Count"),
        HttpBinding("POST", "/v1/echo:measure", "MeasureUpload"),
    ),
)
