"""OpenAPI 3 for the HTTP/JSON side, derived from the proto descriptors (the one source of truth).

JSON follows the proto3 JSON mapping with the proto's own (snake_case) field names: ``bytes`` are
base64 strings, 64-bit integers may be strings, ``NaN``/``Infinity`` are accepted for doubles (and
refused by the service's validation).
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_INT_RANGES = {
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
}
_INT64 = (
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
)


def _field_schema(field: FieldDescriptor, schemas: dict) -> dict:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        schema = message_schema(field.message_type, schemas)
    elif field.type == FieldDescriptor.TYPE_ENUM:
        schema = {"type": "string", "enum": [v.name for v in field.enum_type.values]}
    elif field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        schema = {"type": "number"}
    elif field.type in _INT_RANGES:
        low, high = _INT_RANGES[field.type]
        schema = {"type": "integer", "minimum": low, "maximum": high}
    elif field.type in _INT64:
        low = 0 if field.type in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64) else -(2**63)
        schema = {"type": "integer", "minimum": low}
    elif field.type == FieldDescriptor.TYPE_BOOL:
        schema = {"type": "boolean"}
    elif field.type == FieldDescriptor.TYPE_BYTES:
        schema = {"type": "string", "format": "byte"}
    else:
        schema = {"type": "string"}
    if field.is_repeated:
        return {"type": "array", "items": schema}
    return schema


def message_schema(descriptor: Descriptor, schemas: dict) -> dict:
    """A ``$ref`` to the message's schema, adding it (and what it uses) to ``schemas``."""
    name = descriptor.full_name
    if name not in schemas:
        schemas[name] = {}  # placeholder first: recursive messages terminate
        schemas[name] = {
            "type": "object",
            "additionalProperties": False,
            "properties": {field.name: _field_schema(field, schemas) for field in descriptor.fields},
        }
    return {"$ref": f"#/components/schemas/{name}"}


ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "description": "gRPC status name, e.g. INVALID_ARGUMENT"},
        "message": {"type": "string", "description": "what to fix; input errors start with the field's path"},
    },
    "required": ["code", "message"],
}
