"""``DetectToPacs`` through the gateway against a real Orthanc (issue 14 item 3, "the same through the
gateway"): a real ``wlcad serve cade`` process configured with Orthanc's DICOMweb URL, behind a real
gateway; the SEG and SR it stores are found again by an independent client (``dicomweb-client``). A
server the service was not given, or a bad UID, is refused naming the field before anything is
fetched or stored; the route is never retried by the gateway (it is not idempotent)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import grpc
import pydicom
import pytest
from dicomweb_client import DICOMwebClient

from services.api.client import channel
from services.api.pb import detection_pb2 as pb
from services.api.pb import detection_pb2_grpc as pb_grpc
from services.api.pb import image_pb2
from services.capabilities import capability
from services.servers.orthanc import LocalOrthanc
from tests.serving_support import Process, free_port, wait_serving
from tests.test_cade_service import repository  # noqa: F401 - the module fixture (tiny real model)
from tests.test_detect_cli import synthetic_ct
from tests.test_pacs import SEG_CLASS, SR_CLASS
from training.data.dicom_export import write_dicom_series

pytestmark = pytest.mark.timeout(300)
TASK = "chest-ct-nodule"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = LocalOrthanc(tmp_path_factory.mktemp("orthanc")).start(timeout_s=60)  # readiness: generous
    yield server
    server.stop()


@pytest.fixture(scope="module")
def source(orthanc, tmp_path_factory) -> dict:
    paths = write_dicom_series(synthetic_ct(), tmp_path_factory.mktemp("series"), uid_seed="pacs-service")
    assert orthanc.upload(paths) == len(paths)
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return {
        "study": str(header.StudyInstanceUID),
        "series": str(header.SeriesInstanceUID),
        "count": len(paths),
    }


@contextmanager
def behind_gateway(name: str, orthanc, logs: Path, env: dict | None = None):
    """(gateway gRPC address, HTTP URL) in front of ``wlcad serve <name> --dicomweb <orthanc>``;
    the service's log must hold no traceback when it stops."""
    service_address = f"127.0.0.1:{free_port()}"
    grpc_address, http_port = f"127.0.0.1:{free_port()}", free_port()
    log = logs / f"{name}.log"
    service = Process(
        [
            "serve",
            name,
            "--listen",
            service_address,
            "--metrics-listen",
            "",
            "--dicomweb",
            orthanc.dicomweb_url,
        ],
        log,
        env,
    ).start()
    listen = ["--grpc-listen", grpc_address, "--http-listen", f"127.0.0.1:{http_port}"]
    gateway = Process(
        ["serve", "gateway", *listen, "--route", f"{name}={service_address}"], logs / "gw.log"
    ).start()
    try:
        wait_serving(service_address)
        wait_serving(grpc_address, service=capability(name).service)
        yield grpc_address, f"http://127.0.0.1:{http_port}"
    finally:
        gateway.stop()
        service.stop()
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def gateway(orthanc, repository, tmp_path_factory):  # noqa: F811 - pytest fixture argument
    """(gateway gRPC address, gateway HTTP URL) in front of ``wlcad serve cade --dicomweb <orthanc>``."""
    logs = tmp_path_factory.mktemp("pacs-service-logs")
    with behind_gateway("cade", orthanc, logs, {"WLCAD_MODEL_REPOSITORY": str(repository)}) as addresses:
        yield addresses


def _request(base_url: str, study: str, series: str, **cutoff) -> pb.PacsDetectRequest:
    reference = image_pb2.DicomWebReference(
        base_url=base_url, study_instance_uid=study, series_instance_uid=series
    )
    return pb.PacsDetectRequest(series=reference, task=TASK, **cutoff)


def series_in(orthanc, study: str) -> set[str]:
    client = DICOMwebClient(orthanc.dicomweb_url, timeout=30)
    return {item["0020000E"]["Value"][0] for item in client.search_for_series(study)}


def test_detect_to_pacs_through_the_gateway_stores_seg_and_sr_that_qido_finds(orthanc, source, gateway):
    stub = pb_grpc.DetectionStub(channel(gateway[0]))
    answer = stub.DetectToPacs(
        _request(orthanc.dicomweb_url, source["study"], source["series"], threshold=0.5), timeout=240
    )
    assert answer.all_found and answer.instances_fetched == source["count"]
    assert answer.findings == 2 and answer.model_version == f"cade_{TASK}/1"
    kinds = {o.kind: o for o in answer.stored}
    assert set(kinds) == {"seg", "sr"}
    assert {kinds["seg"].sop_class_uid, kinds["sr"].sop_class_uid} == {SEG_CLASS, SR_CLASS}
    client = DICOMwebClient(orthanc.dicomweb_url, timeout=30)  # an independent client finds them
    for stored in answer.stored:
        found = client.search_for_instances(source["study"], stored.series_instance_uid)
        assert [item["00080018"]["Value"][0] for item in found] == [stored.sop_instance_uid]
        assert stored.series_instance_uid != source["series"]


def test_the_http_route_does_the_same(orthanc, source, gateway):
    body = json.dumps({
        "series": {"base_url": orthanc.dicomweb_url, "study_instance_uid": source["study"],
                   "series_instance_uid": source["series"]},
        "task": TASK, "threshold": 0.5,
    }).encode()  # fmt: skip
    request = urllib.request.Request(
        gateway[1] + "/v1/detections:toPacs", body, {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=240) as response:
        answer = json.loads(response.read())
    assert answer["all_found"] is True and len(answer["stored"]) == 2


@pytest.mark.parametrize(
    ("base", "study", "series", "field"),
    [
        ("http://127.0.0.1:9/dicom-web", None, None, "series.base_url"),  # not a configured server
        (None, "1.2.3", "not-a-uid", "series.series_instance_uid"),
        (None, "1.2.3", "1.2.3.4", "series"),  # no such series: refused by the size check, nothing stored
    ],
)
def test_refusals_name_the_field_and_store_nothing(orthanc, source, gateway, base, study, series, field):
    before = series_in(orthanc, source["study"])
    stub = pb_grpc.DetectionStub(channel(gateway[0]))
    with pytest.raises(grpc.RpcError) as error:
        stub.DetectToPacs(
            _request(base or orthanc.dicomweb_url, study or source["study"], series or source["series"]),
            timeout=60,
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()
    assert series_in(orthanc, source["study"]) == before


def test_an_unknown_http_body_field_is_a_4xx(gateway):
    request = urllib.request.Request(
        gateway[1] + "/v1/detections:toPacs",
        b'{"task": 7}',
        {"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=60)
    assert 400 <= error.value.code < 500


def test_the_gateway_never_retries_it():
    assert "DetectToPacs" not in capability("cade").idempotent
