"""The HTTP/JSON twin of the client's upload call, with only the standard library (urllib), so a
plain Python can talk to the gateway the way curl does."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

from google.protobuf import json_format

from services.api.pb import label_estimation_pb2 as pb


class HttpError(RuntimeError):
    def __init__(self, status: int, body: dict) -> None:
        super().__init__(f"HTTP {status}: {body.get('code')}: {body.get('message')}")
        self.status = status
        self.body = body


def _call(request: urllib.request.Request, timeout: float) -> dict:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            body = {"code": "UNKNOWN", "message": exc.reason}
        raise HttpError(exc.code, body) from None


def multipart(fields: dict[str, tuple[str | None, bytes, str]]) -> tuple[bytes, str]:
    """(body, content type) of multipart/form-data; ``fields``: name → (filename, bytes, type)."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, (filename, data, content_type) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n"
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def upload(
    base_url: str,
    filename: str,
    content: bytes,
    request: pb.EstimateRequest,
    token: str | None = None,
    timeout: float = 120.0,
) -> pb.EstimateResponse:
    """``POST /v1/labels:upload`` with the file and the request (lesions, method) as JSON."""
    options = json.dumps(json_format.MessageToDict(request, preserving_proto_field_name=True)).encode()
    body, content_type = multipart(
        {  # the request first: the gateway streams the file on as it arrives
            "request": (None, options, "application/json"),
            "file": (filename, content, "application/octet-stream"),
        }
    )
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    http_request = urllib.request.Request(
        f"{base_url.rstrip('/')}/v1/labels:upload", body, headers, method="POST"
    )
    return json_format.ParseDict(_call(http_request, timeout), pb.EstimateResponse())


def post_json(
    base_url: str, path: str, payload: dict, token: str | None = None, timeout: float = 60.0
) -> dict:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}{path}", json.dumps(payload).encode(), headers, method="POST"
    )
    return _call(request, timeout)
