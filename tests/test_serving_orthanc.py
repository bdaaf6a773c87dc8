"""The DICOMweb reference form end to end against a real Orthanc: a series stored through Orthanc's
REST API is estimated by StudyInstanceUID/SeriesInstanceUID through the gateway, and gives the same
masks as sending the same voxels; a missing series is the caller's error, not a failure."""

from __future__ import annotations

import grpc
import pydicom
import pytest

from services.api.client import channel
from services.api.pb import image_pb2
from services.api.pb import label_estimation_pb2 as pb
from services.api.pb import label_estimation_pb2_grpc as pb_grpc
from services.servers.orthanc import LocalOrthanc
from tests.serving_support import estimate_request, small_volume, start_stack
from training.data.dicom_export import write_dicom_series

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = LocalOrthanc(tmp_path_factory.mktemp("orthanc")).start(timeout_s=60)  # readiness: generous
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stored(orthanc, tmp_path_factory):
    """A small CT series with a bright ball, stored in Orthanc; returns (volume, study, series UID)."""
    volume = small_volume((24, 40, 40))
    paths = write_dicom_series(volume, tmp_path_factory.mktemp("series"), uid_seed="orthanc-test")
    assert orthanc.upload(paths) == len(paths)
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return volume, str(header.StudyInstanceUID), str(header.SeriesInstanceUID)


@pytest.fixture(scope="module")
def stack(orthanc, tmp_path_factory):
    stack = start_stack(
        tmp_path_factory.mktemp("orthanc-stack"), service_extra=["--dicomweb", orthanc.dicomweb_url]
    )
    yield stack
    stack.stop()


def _reference_request(
    base_url: str, study: str, series: str, like: pb.EstimateRequest
) -> pb.EstimateRequest:
    request = pb.EstimateRequest()
    request.CopyFrom(like)
    request.image.CopyFrom(
        image_pb2.ImageSource(
            dicomweb=image_pb2.DicomWebReference(
                base_url=base_url, study_instance_uid=study, series_instance_uid=series
            )
        )
    )
    return request


def test_a_series_in_orthanc_estimates_like_its_voxels(orthanc, stored, stack):
    volume, study, series = stored
    by_voxels = estimate_request(volume, method="threshold", lesions=2)
    by_reference = _reference_request(orthanc.dicomweb_url, study, series, by_voxels)
    stub = pb_grpc.LabelEstimationStub(channel(stack.grpc_address))
    expected = stub.Estimate(by_voxels, timeout=60)
    fetched = stub.Estimate(by_reference, timeout=60)
    assert [lesion.mask for lesion in fetched.lesions] == [lesion.mask for lesion in expected.lesions]
    assert fetched.lesions[0].measurements.voxels > 0
    assert list(fetched.grid.shape_xyz) == [40, 40, 24]


def test_a_missing_series_is_invalid_argument(orthanc, stored, stack):
    volume, study, _ = stored
    request = _reference_request(orthanc.dicomweb_url, study, "1.2.3.4", estimate_request(volume))
    stub = pb_grpc.LabelEstimationStub(channel(stack.grpc_address))
    with pytest.raises(grpc.RpcError) as error:
        stub.Estimate(request, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no such study/series" in error.value.details()


def test_a_jpeg_2000_series_is_fetched_as_stored(orthanc, stack, tmp_path):
    """The real CT sample is JPEG 2000: the fetch must accept the stored transfer syntax (Orthanc
    cannot transcode it and answered 500 to a plain request) and decode it like the files."""
    from services.core.io import read_image
    from services.core.sample_data import sample_path
    from tests.dicom_checks import dicom_files, with_uids_restored

    folder = with_uids_restored(sample_path("ct-dicom-series"), tmp_path / "series")  # the sample's are blank
    paths = dicom_files(folder)
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID.is_compressed
    study, series = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
    assert orthanc.upload(paths) == len(paths)
    local = read_image(folder)
    by_reference = _reference_request(orthanc.dicomweb_url, study, series, estimate_request(local))
    by_voxels = estimate_request(local)
    stub = pb_grpc.LabelEstimationStub(channel(stack.grpc_address))
    fetched, expected = stub.Estimate(by_reference, timeout=60), stub.Estimate(by_voxels, timeout=60)
    assert list(fetched.grid.shape_xyz) == list(local.shape_xyz)
    assert [lesion.mask for lesion in fetched.lesions] == [lesion.mask for lesion in expected.lesions]
