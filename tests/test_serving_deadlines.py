"""Deadlines and cancellation end work in the service (issue 10, deliverable 2).

A real ``wlcad serve label-estimation`` process on 127.0.0.1. Each request's work is long on purpose
(256 random-walker lesions: tens of seconds on two cores), so a request that is cancelled or whose
deadline passes can only free its slot within the bound when the service stops the work; the bounds
are generous so a loaded machine cannot fail them, and the measured times are printed.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from services.api.convert import volume_to_proto
from services.api.pb import image_pb2
from services.api.pb import label_estimation_pb2 as pb
from services.api.pb import label_estimation_pb2_grpc as pb_grpc
from services.servers.grpc_server import grpc_options, servicer_handler
from services.servers.label_estimation import LabelEstimationServicer
from services.servers.observability import IN_FLIGHT
from services.servers.scaffold import ServiceSettings
from tests.serving_support import (
    centre_mm,
    estimate_request,
    free_port,
    metric_value,
    small_volume,
    start_service,
    until,
    wait_serving,
)

COMPONENT = "label-estimation"
#: Seconds a freed slot may take to show: ~0.1 s is measured; only a service that keeps computing
#: an abandoned request (tens of seconds here) runs it out.
FREED_WITHIN_S = 10.0


def _long_request() -> pb.EstimateRequest:
    """256 random-walker lesions on a 96³ volume: ~0.1 s each on an idle core, ~25 s in all."""
    volume = small_volume((96, 96, 96))
    centre = centre_mm(volume)
    return pb.EstimateRequest(
        image=image_pb2.ImageSource(volume=volume_to_proto(volume)),
        lesions=[pb.LesionPrompt(lesion_id=i + 1, center_mm=centre, diameter_mm=40.0) for i in range(256)],
        method="random-walker",
    )


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("deadlines")
    process, address, metrics = start_service(log_dir, extra=["--compute-slots", "2"])
    try:
        wait_serving(address)
        yield process, address, metrics
    finally:
        process.stop()


def _gauge(metrics: str, name: str) -> float:
    return metric_value(metrics, name, component=COMPONENT)


def _requests(metrics: str, code: str) -> float:
    return metric_value(metrics, "wlcad_requests_total", component=COMPONENT, method="Estimate", code=code)


def _freed_after(metrics: str, started: float) -> float:
    until(lambda: True if _gauge(metrics, "wlcad_in_flight_requests") == 0 else None, "slots freed")
    return time.monotonic() - started


def test_cancelled_requests_stop_computing_free_their_slots_and_are_logged_cancelled(service):
    process, address, metrics = service
    cancelled_before = _requests(metrics, "CANCELLED")
    with grpc.insecure_channel(address, options=grpc_options()) as channel:
        stub = pb_grpc.LabelEstimationStub(channel)
        calls = [stub.Estimate.future(_long_request(), timeout=600) for _ in range(2)]
        until(
            lambda: (
                True
                if _gauge(metrics, "wlcad_in_flight_requests") == 2
                and _gauge(metrics, "wlcad_queue_depth") == 0
                else None
            ),
            "both requests computing",
        )
        time.sleep(1.0)  # well inside the ~25 s of work
        started = time.monotonic()
        for call in calls:
            call.cancel()
        freed_s = _freed_after(metrics, started)
        print(f"two cancelled requests freed their slots {freed_s:.2f} s after the cancel")
        assert freed_s < FREED_WITHIN_S
        # The service serves again at once: a small request needs no queue.
        reply = stub.Estimate(estimate_request(small_volume()), timeout=60)
        assert reply.lesions[0].measurements.voxels > 0
    until(
        lambda: True if _requests(metrics, "CANCELLED") == cancelled_before + 2 else None,
        "two CANCELLED requests counted",
    )
    log = process.log.read_text()
    assert log.count("Estimate cancelled by the caller during lesion") == 2
    assert "ERROR" not in log and "INTERNAL" not in log


def test_an_expired_deadline_stops_the_work_and_counts_deadline_exceeded(service):
    process, address, metrics = service
    expired_before = _requests(metrics, "DEADLINE_EXCEEDED")
    with grpc.insecure_channel(address, options=grpc_options()) as channel:
        stub = pb_grpc.LabelEstimationStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Estimate(_long_request(), timeout=3)  # the work needs ~25 s: it cannot finish in time
        assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        freed_s = _freed_after(metrics, time.monotonic())
        print(f"an expired request freed its slot {freed_s:.2f} s after the caller's deadline")
        assert freed_s < FREED_WITHIN_S
    until(
        lambda: True if _requests(metrics, "DEADLINE_EXCEEDED") == expired_before + 1 else None,
        "one DEADLINE_EXCEEDED counted",
    )
    assert "Estimate stopped: the deadline passed during lesion" in process.log.read_text()


def test_a_cancelled_queued_request_leaves_the_queue_while_another_computes(service):
    _, address, metrics = service
    with grpc.insecure_channel(address, options=grpc_options()) as channel:
        stub = pb_grpc.LabelEstimationStub(channel)
        running = [stub.Estimate.future(_long_request(), timeout=600) for _ in range(2)]
        until(lambda: True if _gauge(metrics, "wlcad_in_flight_requests") == 2 else None, "slots taken")
        queued = stub.Estimate.future(_long_request(), timeout=600)
        until(lambda: True if _gauge(metrics, "wlcad_queue_depth") == 1 else None, "one request queued")
        started = time.monotonic()
        queued.cancel()
        until(lambda: True if _gauge(metrics, "wlcad_queue_depth") == 0 else None, "queue emptied")
        left_s = time.monotonic() - started
        print(f"a cancelled queued request left the queue {left_s:.2f} s after the cancel")
        assert left_s < FREED_WITHIN_S
        assert _gauge(metrics, "wlcad_in_flight_requests") == 2  # the running ones were not disturbed
        for call in running:
            call.cancel()
        _freed_after(metrics, time.monotonic())


def test_the_service_limit_ends_a_stalled_upload_whose_caller_gave_no_deadline():
    """``max_request_s`` is the deadline of a caller that gave none: a stream stalled after its first
    message is cancelled by the service, which frees the handler (the real servicer and gRPC server,
    in this process)."""
    server = grpc.server(
        __import__("concurrent.futures").futures.ThreadPoolExecutor(max_workers=4), options=grpc_options()
    )
    servicer = LabelEstimationServicer(ServiceSettings(max_request_s=2.0))
    from google.protobuf import descriptor_pool

    descriptor = descriptor_pool.Default().FindServiceByName("wlcad.v1.LabelEstimation")
    server.add_generic_rpc_handlers((servicer_handler(servicer, descriptor),))
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    release = threading.Event()
    volume = small_volume()
    header = volume_to_proto(volume, with_data=False)

    def stalled():
        request = pb.EstimateRequest(image=image_pb2.ImageSource(volume=header), method="sphere")
        request.lesions.add(lesion_id=1, center_mm=centre_mm(volume), diameter_mm=10)
        yield pb.EstimateUploadMessage(request=request)
        yield pb.EstimateUploadMessage(chunk=image_pb2.ImageChunk(data=np.zeros(16, np.uint8).tobytes()))
        release.wait(120)  # the caller stalls: no more chunks, no deadline

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options()) as channel:
            stub = pb_grpc.LabelEstimationStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as ended:
                stub.EstimateUpload(stalled())  # no timeout on purpose
            ended_s = time.monotonic() - started
            print(f"a stalled upload without a deadline ended {ended_s:.2f} s after it began (limit 2 s)")
            assert ended.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert ended_s < 60
            until(lambda: True if IN_FLIGHT.labels(COMPONENT)._value.get() == 0 else None, "handler freed")
    finally:
        release.set()
        server.stop(grace=None)
        servicer.close()
