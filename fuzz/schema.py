"""The JSON Schema of trace lines, generated from the parser's own field table, so the two
cannot disagree. ``kvmspec schema`` prints it; docs/trace-schema.json is a copy checked by a
test."""

from __future__ import annotations

from typing import Any

from kvmspec.fuzz.guest_layout import ACCESS_SIZES
from kvmspec.fuzz.trace import FIELD_KINDS, FORMAT, MAX_BITMAP_WORDS, NAME_PATTERN, REQUIRED
from kvmspec.spec.platforms import PROFILES
from kvmspec.spec.uapi.constants import CAPABILITIES, U32_MAX, U64_MAX

_U32 = {"type": "integer", "minimum": 0, "maximum": U32_MAX}
_U64 = {"type": "integer", "minimum": 0, "maximum": U64_MAX}
_NAME = {"type": "string", "pattern": NAME_PATTERN}
_KINDS: dict[str, dict[str, Any]] = {
    "u32": _U32,
    "u64": _U64,
    "name": _NAME,
    "prot": {"enum": ["r", "rw", "none"]},
    "width": {"enum": list(ACCESS_SIZES)},
    "cap": {"enum": sorted(CAPABILITIES)},
    "address": {
        "oneOf": [
            _U64,
            {
                "type": "object",
                "properties": {"region": _NAME, "offset": _U64},
                "required": ["region"],
                "additionalProperties": False,
            },
        ]
    },
    "gmem": {"oneOf": [_NAME, _U32]},
    "args": {"type": "array", "items": _U64, "maxItems": 4},
    "words": {"type": "array", "items": _U64, "maxItems": MAX_BITMAP_WORDS},
}
_EXPECT = {
    "type": "object",
    "properties": {
        "errno": {"oneOf": [{"const": 0}, {"type": "string", "pattern": "^E[A-Z0-9]+$"}]}
    },
    "required": ["errno"],
}

# A "value" must fit in its "size" bytes.
_VALUE_FITS_SIZE = [
    {
        "if": {"properties": {"size": {"const": size}}},
        "then": {"properties": {"value": {"maximum": (1 << (8 * size)) - 1}}},
    }
    for size in ACCESS_SIZES
]


def trace_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) that every line of a v1 trace satisfies."""
    header = {
        "type": "object",
        "properties": {"format": {"const": FORMAT}, "platform": {"enum": sorted(PROFILES)}},
        "required": ["format", "platform"],
    }
    operations = []
    for name, kinds in FIELD_KINDS.items():
        properties: dict[str, Any] = {"op": {"const": name}, "expect": _EXPECT}
        properties.update({field: _KINDS[kind] for field, kind in kinds.items()})
        operation: dict[str, Any] = {
            "type": "object",
            "properties": properties,
            "required": ["op", *sorted(REQUIRED[name])],
            "additionalProperties": False,
        }
        if "value" in kinds and kinds.get("size") == "width":
            operation["allOf"] = _VALUE_FITS_SIZE
        operations.append(operation)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "kvmspec-trace/1",
        "title": "A line of a kvmspec trace (format v1)",
        "oneOf": [header, *operations],
    }
