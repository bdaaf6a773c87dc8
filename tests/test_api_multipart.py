"""The WADO-RS multipart splitter (services/api/multipart.py) returns what the standard library's
email parser returns for well-formed bodies, and refuses malformed ones as the server's bad answer."""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.api.multipart import split_parts
from services.core.errors import InputError

BOUNDARY = "b0undary-42"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'


def _body(parts: list[bytes], preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = [preamble]
    for part in parts:
        out += [f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part, b"\r\n"]
    out += [f"--{BOUNDARY}--\r\n".encode(), epilogue]
    return b"".join(out)


def _email_parts(body: bytes) -> list[bytes]:
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + CONTENT_TYPE.encode() + b"\r\n\r\n" + body
    )
    return [part.get_payload(decode=True) or b"" for part in message.iter_parts()]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200).filter(lambda b: BOUNDARY.encode() not in b), min_size=1, max_size=5))
def test_parts_match_the_email_parser(parts):
    body = _body(parts, preamble=b"ignored\r\n", epilogue=b"ignored too")
    assert [bytes(p) for p in split_parts(body, CONTENT_TYPE)] == parts == _email_parts(body)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (_body([b"x"]), "application/dicom"),  # not multipart
        (_body([b"x"]), "multipart/related"),  # no boundary
        (b"no delimiter at all", CONTENT_TYPE),
        (_body([b"x"])[:-12], CONTENT_TYPE),  # truncated before the closing delimiter
        (f"--{BOUNDARY}\r\nContent-Type: x".encode(), CONTENT_TYPE),  # headers never end
    ],
)
def test_malformed_answers_are_input_errors(body, content_type):
    with pytest.raises(InputError):
        split_parts(body, content_type)
