"""Fuzz: malformed requests never reach INTERNAL / 5xx and never take a process down.

* 10,000 hypothesis-generated malformed requests (wrong dtype/shape/byte length, NaN spacing, huge
  dimensions, bad prompts, junk files, truncated and disordered upload streams, bytes that are not
  protobuf) to the real servicer on an in-process gRPC server, over a real channel;
* 400 more through a gateway process to a service process (gRPC), and schemathesis against the
  gateway's OpenAPI (HTTP), after which both processes must be alive;
* a short atheris pass over the file readers (the long one is ``make fuzz``).
"""

from __future__ import annotations

import collections
import math
import subprocess
import sys
from concurrent import futures

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.api.client import channel
from services.api.pb import image_pb2
from services.api.pb import label_estimation_pb2 as pb
from services.api.pb import label_estimation_pb2_grpc as pb_grpc
from services.servers.grpc_server import grpc_options, servicer_handler
from services.servers.label_estimation import LabelEstimationServicer
from tests.conftest import REPO_ROOT
from tests.serving_support import free_port, start_stack

pytestmark = pytest.mark.timeout(300)

ALLOWED = {"INVALID_ARGUMENT", "OK", "FAILED_PRECONDITION"}
SENT: collections.Counter = collections.Counter()
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def stub():
    server = grpc.server(futures.ThreadPoolExecutor(8), options=grpc_options())
    service = pb.DESCRIPTOR.services_by_name["LabelEstimation"]
    server.add_generic_rpc_handlers((servicer_handler(LabelEstimationServicer(), service),))
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    wire = channel(f"127.0.0.1:{port}")
    stub = pb_grpc.LabelEstimationStub(wire)
    stub.raw = lambda rpc: wire.unary_unary(f"/wlcad.v1.LabelEstimation/{rpc}")  # bytes in, bytes out
    yield stub
    server.stop(0)


def _outcome(call) -> str:
    try:
        call()
        return "OK"
    except grpc.RpcError as error:
        return error.code().name


floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, -1.0, 1.0, 1e308, float("nan"), float("inf")]),
)
dims = st.one_of(st.integers(0, 8), st.sampled_from([0, 1, 2**16, 2**31, 2**32 - 1]))
dtypes = st.sampled_from(
    ["int16", "uint8", "float32", "float64", "int64", "complex64", "", "<i2", "bool", "S"]
)
methods = st.sampled_from(
    ["sphere", "ellipsoid", "threshold", "random-walker", "unet", "", "SPHERE", "x" * 300]
)


@st.composite
def volumes(draw) -> image_pb2.Volume:
    shape = draw(st.lists(dims, min_size=0, max_size=4))
    dtype = draw(dtypes)
    itemsize = np.dtype(dtype).itemsize if dtype in ("int16", "uint8", "float32", "float64") else 2
    exact = math.prod(shape) * itemsize if len(shape) == 3 and math.prod(shape) < 5000 else 0
    length = draw(
        st.one_of(st.just(exact), st.integers(0, 600), st.just(max(0, exact - 1)), st.just(exact + 1))
    )
    data = draw(st.one_of(st.binary(min_size=length, max_size=length), st.just(b"\xff" * length)))
    return image_pb2.Volume(
        dtype=dtype,
        shape_xyz=shape,
        spacing_mm=draw(st.lists(floats, max_size=4)),
        origin_mm=draw(st.lists(floats, max_size=4)),
        direction=draw(
            st.one_of(st.just([]), st.lists(floats, min_size=9, max_size=9), st.lists(floats, max_size=10))
        ),
        data=data,
        modality=draw(st.text(max_size=20)),
    )


@st.composite
def prompts(draw) -> list[pb.LesionPrompt]:
    return draw(
        st.lists(
            st.builds(
                pb.LesionPrompt,
                lesion_id=st.integers(0, 70000),
                center_mm=st.lists(floats, max_size=4),
                diameter_mm=floats,
                axes_mm=st.lists(floats, max_size=4),
            ),
            max_size=4,
        )
    )


def _record(name: str, code: str) -> None:
    SENT[name] += 1
    assert code in ALLOWED, code


@settings(FUZZ, max_examples=3500)
@given(volume=volumes(), lesions=prompts(), method=methods)
def test_malformed_volumes(stub, volume, lesions, method):
    request = pb.EstimateRequest(image=image_pb2.ImageSource(volume=volume), lesions=lesions, method=method)
    _record("volumes", _outcome(lambda: stub.Estimate(request, timeout=30)))


@settings(FUZZ, max_examples=2000)
@given(lesions=prompts(), method=methods)
def test_malformed_prompts_on_a_valid_image(stub, lesions, method):
    volume = image_pb2.Volume(
        dtype="int16", shape_xyz=[8, 8, 4], spacing_mm=[1, 1, 2], data=bytes(8 * 8 * 4 * 2)
    )
    request = pb.EstimateRequest(image=image_pb2.ImageSource(volume=volume), lesions=lesions, method=method)
    _record("prompts", _outcome(lambda: stub.Estimate(request, timeout=30)))


@settings(FUZZ, max_examples=1500)
@given(
    filename=st.one_of(
        st.sampled_from(["a.nii", "a.nii.gz", "a.nrrd", "a.mha", "a.dcm", "a.zip", "../../etc/x.dcm"]),
        st.text(max_size=30),
    ),
    content=st.one_of(
        st.binary(max_size=700),
        st.just(b"PK\x03\x04" + bytes(40)),
        st.builds(lambda b: b"\0" * 128 + b"DICM" + b, st.binary(max_size=300)),
        st.builds(
            lambda b: b"NRRD0004\ntype: short\ndimension: 3\nsizes: 99999 99999 99999\nencoding: raw\n\n" + b,
            st.binary(max_size=50),
        ),
    ),
    reference=st.builds(
        image_pb2.DicomWebReference,
        base_url=st.text(max_size=30),
        study_instance_uid=st.text(max_size=70),
        series_instance_uid=st.text(max_size=70),
    ),
    use_reference=st.booleans(),
)
def test_malformed_files_and_references(stub, filename, content, reference, use_reference):
    source = (
        image_pb2.ImageSource(dicomweb=reference)
        if use_reference
        else image_pb2.ImageSource(file=image_pb2.ImageFile(filename=filename, content=content))
    )
    lesion = pb.LesionPrompt(lesion_id=1, center_mm=[0, 0, 0], diameter_mm=5)
    request = pb.EstimateRequest(image=source, lesions=[lesion], method="sphere")
    _record("files", _outcome(lambda: stub.Estimate(request, timeout=30)))
    dose = pb.DoseRequest(image=source, rtdose_dicom=content, isodose=filename)
    _record("files", _outcome(lambda: stub.EstimateDose(dose, timeout=30)))


@settings(FUZZ, max_examples=1000)
@given(
    header=volumes(),
    chunks=st.lists(st.one_of(st.binary(max_size=300), st.none()), max_size=5),
    first_is_chunk=st.booleans(),
    lesions=prompts(),
)
def test_truncated_and_disordered_streams(stub, header, chunks, first_is_chunk, lesions):
    request = pb.EstimateRequest(
        image=image_pb2.ImageSource(volume=header),
        lesions=lesions or [pb.LesionPrompt(lesion_id=1, center_mm=[0, 0, 0], diameter_mm=2)],
        method="sphere",
    )
    messages = [] if first_is_chunk else [pb.EstimateUploadMessage(request=request)]
    for chunk in chunks:  # None: a second request where only chunks may follow
        messages.append(
            pb.EstimateUploadMessage(request=request)
            if chunk is None
            else pb.EstimateUploadMessage(chunk=image_pb2.ImageChunk(data=chunk))
        )
    _record("streams", _outcome(lambda: stub.EstimateUpload(iter(messages), timeout=30)))


@settings(FUZZ, max_examples=1000)
@given(raw=st.binary(max_size=200), rpc=st.sampled_from(["Estimate", "EstimateDose", "Describe"]))
def test_bytes_that_are_not_protobuf(stub, raw, rpc):
    _record("raw", _outcome(lambda: stub.raw(rpc)(raw, timeout=30)))


def test_at_least_10000_malformed_requests_were_sent():
    print(f"\nmalformed requests by kind: {dict(SENT)}; total {sum(SENT.values())}")
    assert sum(SENT.values()) >= 10_000


@settings(FUZZ, max_examples=400)
@given(volume=volumes(), lesions=prompts(), method=methods)
def _over_the_wire(stub_, volume, lesions, method):
    request = pb.EstimateRequest(image=image_pb2.ImageSource(volume=volume), lesions=lesions, method=method)
    code = _outcome(lambda: stub_.Estimate(request, timeout=30))
    assert code in ALLOWED, code


def test_gateway_and_service_processes_survive_fuzzing(tmp_path):
    stack = start_stack(tmp_path)
    try:
        _over_the_wire(pb_grpc.LabelEstimationStub(channel(stack.grpc_address)))
        schemathesis = subprocess.run(
            [
                str(REPO_ROOT / ".venv" / "bin" / "st"),
                "run",
                f"{stack.http_url}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "60",
                "--phases",
                "coverage,fuzzing",
                "--request-timeout",
                "30",
                "--generation-deterministic",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
        tail = schemathesis.stdout[-3000:]
        assert schemathesis.returncode == 0, tail
        print("\n" + "\n".join(line for line in tail.splitlines() if "generated" in line or "passed" in line))
        assert stack.gateway.alive() and stack.service.alive()
        logs = (tmp_path / "gateway.log").read_text() + (tmp_path / "service.log").read_text()
        assert "Traceback" not in logs
    finally:
        stack.stop()


def test_atheris_short_pass_over_the_file_readers():
    result = subprocess.run(
        # libFuzzer's default RSS limit (2048 MB) is below what a valid input may take: a compressed
        # file may expand to the 1 GiB upload limit, and a reader holds it plus a working copy.
        [
            sys.executable,
            str(REPO_ROOT / "tests" / "fuzz" / "fuzz_readers.py"),
            "-atheris_runs=4000",
            "-rss_limit_mb=3584",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 4000" in result.stderr
