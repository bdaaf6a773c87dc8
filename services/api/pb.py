"""The generated wlcad.v1 modules, regenerated first when missing or stale.

The generated code imports itself as ``wlcad.v1.*`` (the proto package path), so its folder is put on
``sys.path``; everything else in wlcad imports the messages from here.
"""

from __future__ import annotations

import sys

from services.api import codegen

if codegen.is_stale():
    codegen.generate()
if str(codegen.OUT_DIR) not in sys.path:
    sys.path.insert(0, str(codegen.OUT_DIR))

from wlcad.v1 import (
    anomaly_pb2,
    anomaly_pb2_grpc,
    common_pb2,
    detection_pb2,
    detection_pb2_grpc,
    image_pb2,
    label_estimation_pb2,
    label_estimation_pb2_grpc,
    pacs_pb2,
)

__all__ = [
    "anomaly_pb2",
    "anomaly_pb2_grpc",
    "common_pb2",
    "detection_pb2",
    "detection_pb2_grpc",
    "image_pb2",
    "label_estimation_pb2",
    "label_estimation_pb2_grpc",
    "pacs_pb2",
]
