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
import pytest
from dicomweb_client import DICOMwebClient

from services.api.client import channel
from services.api.pb import image_pb2
from services.api.pb import label_estimation_pb2 as pb
from services.api.pb import label_estimation_pb2_grpc as pb_grpc
from services.capabilities import capability
from tests.test_detect_cli import CT_GRID, CT_SPHERES
from tests.test_pacs import SEG_CLASS, SR_CLASS
from tests.test_pacs_service import behind_gateway, orthanc, series_in, source  # noqa: F401 - module fixtures

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def gateway(orthanc, tmp_path_factory):  # noqa: F811 - pytest fixture arguments
    """(gateway gRPC address, HTTP URL) in front of ``wlcad serve label-estimation --dicomweb <orthanc>``."""
    with behind_gateway(
        "label-estimation", orthanc, tmp_path_factory.mktemp("pacs-estimate-logs")
    ) as addresses:
        yield addresses


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


def test_estimate_to_pacs_stores_a_typed_seg_and_sr_that_qido_finds(orthanc, source, gateway):  # noqa: F811 - pytest fixture arguments
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


def test_the_http_route_does_the_same_with_a_rule_based_method(orthanc, source, gateway):  # noqa: F811 - pytest fixture arguments
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
def test_refusals_name_the_field_and_store_nothing(orthanc, source, gateway, change, field):  # noqa: F811 - pytest fixture arguments
    before = series_in(orthanc, source["study"])
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
    assert series_in(orthanc, source["study"]) == before


def test_the_gateway_never_retries_it():
    assert "EstimateToPacs" not in capability("label-estimation").idempotent
