"""``LabelEstimation/EstimateToPacs`` through the gateway against a real Orthanc (issue 14 item 3: any
capability's PACS round trip, "the same through the gateway"): a real ``wlcad serve label-estimation``
process configured with Orthanc's DICOMweb URL, behind a real gateway, on the shipped label U-Net. The
SEG and SR it stores are found again and read back by an independent client (``dicomweb-client``),
carrying the prompts' lesion types. Refusals name the field and store nothing; the route is never
retried by the gateway (it is not idempotent)."""

from __future__ import annotations

import json
import urllib.request

import grpc
import pydicom
import pytest
from dicomweb_client import DICOMwebClient

from services.api.client import channel
from services.api.pb import image_pb2
from services.api.pb import label_estimation_pb2 as pb
from services.api.pb import label_estimation_pb2_grpc as pb_grpc
from services.capabilities import capability
from services.servers.orthanc import LocalOrthanc
from tests.serving_support import Process, free_port, wait_serving
from tests.test_detect_cli import CT_GRID, CT_SPHERES, synthetic_ct
from tests.test_pacs import SEG_CLASS, SR_CLASS
from training.data.dicom_export import write_dicom_series

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = LocalOrthanc(tmp_path_factory.mktemp("orthanc")).start(timeout_s=60)  # readiness: generous
    yield server
    server.stop()


@pytest.fixture(scope="module")
def source(orthanc, tmp_path_factory) -> dict:
    paths = write_dicom_series(synthetic_ct(), tmp_path_factory.mktemp("series"), uid_seed="pacs-estimate")
    assert orthanc.upload(paths) == len(paths)
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return {
        "study": str(header.StudyInstanceUID),
        "series": str(header.SeriesInstanceUID),
        "count": len(paths),
    }


@pytest.fixture(scope="module")
def gateway(orthanc, tmp_path_factory):
    """(gateway gRPC address, HTTP URL) in front of ``wlcad serve label-estimation --dicomweb <orthanc>``."""
    logs = tmp_path_factory.mktemp("pacs-estimate-logs")
    service_address = f"127.0.0.1:{free_port()}"
    grpc_address, http_port = f"127.0.0.1:{free_port()}", free_port()
    service = Process(
        ["serve", "label-estimation", "--listen", service_address, "--metrics-listen", "",
         "--dicomweb", orthanc.dicomweb_url],
        logs / "label-estimation.log",
    ).start()  # fmt: skip
    listen = ["--grpc-listen", grpc_address, "--http-listen", f"127.0.0.1:{http_port}"]
    gateway = Process(
        ["serve", "gateway", *listen, "--route", f"label-estimation={service_address}"], logs / "gw.log"
    ).start()
    try:
        wait_serving(service_address)
        wait_serving(grpc_address, service="wlcad.v1.LabelEstimation")
        yield grpc_address, f"http://127.0.0.1:{http_port}"
    finally:
        gateway.stop()
        service.stop()
    assert "Traceback" not in (logs / "label-estimation.log").read_text()


def _prompts() -> list[pb.LesionPrompt]:
    """The synthetic CT's two nodules at their world centres, typed."""
    return [
        pb.LesionPrompt(
            lesion_id=number,
            center_mm=list(CT_GRID.index_to_world(index)),
            diameter_mm=diameter,
            lesion_type=kind,
        )
        for number, ((index, diameter, _), kind) in enumerate(
            zip(CT_SPHERES, ("solid", "ground-glass"), strict=True), 1
        )
    ]


def _request(base_url: str, study: str, series: str, lesions=None, method="unet") -> pb.PacsEstimateRequest:
    reference = image_pb2.DicomWebReference(
        base_url=base_url, study_instance_uid=study, series_instance_uid=series
    )
    return pb.PacsEstimateRequest(
        series=reference, lesions=_prompts() if lesions is None else lesions, method=method
    )


def _series_in(orthanc, study: str) -> set[str]:
    client = DICOMwebClient(orthanc.dicomweb_url, timeout=30)
    return {item["0020000E"]["Value"][0] for item in client.search_for_series(study)}


def test_estimate_to_pacs_stores_a_typed_seg_and_sr_that_qido_finds(orthanc, source, gateway):
    stub = pb_grpc.LabelEstimationStub(channel(gateway[0]))
    answer = stub.EstimateToPacs(
        _request(orthanc.dicomweb_url, source["study"], source["series"]), timeout=240
    )
    assert answer.all_found and answer.instances_fetched == source["count"]
    assert answer.task == "label-estimation" and answer.findings == 2
    assert answer.model_version.startswith("label_unet3d/")
    kinds = {o.kind: o for o in answer.stored}
    assert set(kinds) == {"seg", "sr"}
    assert (kinds["seg"].sop_class_uid, kinds["sr"].sop_class_uid) == (SEG_CLASS, SR_CLASS)
    client = DICOMwebClient(orthanc.dicomweb_url, timeout=30)  # an independent client reads them back
    seg = client.retrieve_instance(
        source["study"], kinds["seg"].series_instance_uid, kinds["seg"].sop_instance_uid
    )
    assert [s.SegmentDescription for s in seg.SegmentSequence] == ["solid", "ground-glass"]
    assert kinds["seg"].series_instance_uid != source["series"]
    assert kinds["sr"].sop_instance_uid in {
        item["00080018"]["Value"][0]
        for item in client.search_for_instances(source["study"], kinds["sr"].series_instance_uid)
    }


def test_the_http_route_does_the_same_with_a_rule_based_method(orthanc, source, gateway):
    lesion = {
        "lesion_id": 1,
        "center_mm": list(CT_GRID.index_to_world(CT_SPHERES[0][0])),
        "diameter_mm": 14.0,
    }
    body = json.dumps({
        "series": {"base_url": orthanc.dicomweb_url, "study_instance_uid": source["study"],
                   "series_instance_uid": source["series"]},
        "lesions": [lesion], "method": "sphere",
    }).encode()  # fmt: skip
    request = urllib.request.Request(
        gateway[1] + "/v1/labels:toPacs", body, {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=240) as response:
        answer = json.loads(response.read())
    assert answer["all_found"] is True and answer["model_version"] == "sphere" and len(answer["stored"]) == 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"base_url": "http://127.0.0.1:9/dicom-web"}, "series.base_url"),  # not a configured server
        ({"series": "not-a-uid"}, "series.series_instance_uid"),
        ({"method": "magic"}, "method"),
        ({"lesions": []}, "lesions"),
        (
            {"lesions": [pb.LesionPrompt(lesion_id=1, center_mm=[0, 0], diameter_mm=5)]},
            "lesions[0].center_mm",
        ),
        (
            {
                "lesions": [
                    pb.LesionPrompt(lesion_id=1, center_mm=[0, 0, 60], diameter_mm=5, lesion_type="x" * 65)
                ]
            },
            "lesions[0].lesion_type",
        ),
        (
            {
                "lesions": [
                    pb.LesionPrompt(lesion_id=1, center_mm=[0, 0, 60], diameter_mm=5, axes_mm=[5, 4, 3])
                ]
            },
            "lesions[0].axes_mm",
        ),
        ({"series": "1.2.3.4"}, "series"),  # no such series: refused by the size check, nothing stored
    ],
)
def test_refusals_name_the_field_and_store_nothing(orthanc, source, gateway, change, field):
    before = _series_in(orthanc, source["study"])
    stub = pb_grpc.LabelEstimationStub(channel(gateway[0]))
    request = _request(
        change.get("base_url", orthanc.dicomweb_url),
        source["study"],
        change.get("series", source["series"]),
        lesions=change.get("lesions"),
        method=change.get("method", "unet"),
    )
    with pytest.raises(grpc.RpcError) as error:
        stub.EstimateToPacs(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()
    assert _series_in(orthanc, source["study"]) == before


def test_the_gateway_never_retries_it():
    assert "EstimateToPacs" not in capability("label-estimation").idempotent
