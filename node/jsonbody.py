"""Conversion between record bodies (CBOR values) and the JSON the local API
and CLI speak, driven by each plugin's declarative field schema.

Outward: bytes become hex, member keys become `vm1…` ids. Inward: a JSON body
is converted field by field (member ids parsed with their checksum, hashes
from hex), then checked by the plugin's schema; anything else is refused.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Any

from valuemesh.protocol.errors import LocalError, ValuemeshError
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.plugins import Field, Plugin

# A request body may nest arrays and objects this deep; the deepest real one (a batch of
# agreements with their terms) is 5. Deeper JSON is refused before it is parsed.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_depth(data: bytes) -> int:
    """How deep arrays and objects nest in JSON text, counted without recursion (brackets
    inside strings do not count), so any depth is measured in bounded stack."""
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKET)
    return max(itertools.accumulate(_STEP[b] for b in brackets), default=0)


def check_json_depth(data: bytes) -> None:
    """Refuse (LocalError, one sentence) a request body that nests deeper than MAX_JSON_DEPTH,
    before any parser recurses into it."""
    if json_depth(data) > MAX_JSON_DEPTH:
        raise LocalError(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.")


def to_json(value: Any, field: Field | None = None) -> Any:
    """A JSON-safe copy of a CBOR value; 32-byte member fields as vm1 ids."""
    if isinstance(value, bytes):
        if field is not None and field.kind == "member" and len(value) == 32:
            return str(MemberId(value))
        return value.hex()
    if isinstance(value, Mapping):
        sub = field.fields if field is not None and field.kind == "map" else None
        return {str(k): to_json(v, sub.get(str(k)) if sub else None) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        item = field.item if field is not None and field.kind == "list" else None
        return [to_json(v, item) for v in value]
    return value


def body_to_json(plugin: Plugin | None, body: Mapping[str, Any]) -> dict[str, Any]:
    fields = plugin.ops.get(str(body.get("op")), {}) if plugin is not None else {}
    return {str(k): to_json(v, fields.get(str(k))) for k, v in body.items()}


def _from_json(name: str, field: Field, value: Any) -> Any:
    k = field.kind
    if k == "member":
        if not isinstance(value, str):
            raise LocalError(f"Field '{name}' must be a member id (vm1…).")
        return MemberId.parse(value).key
    if k in ("hash", "bytes"):
        if not isinstance(value, str):
            raise LocalError(f"Field '{name}' must be hex text.")
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise LocalError(f"Field '{name}' must be hex text.") from None
    if k == "list":
        if not isinstance(value, list):
            raise LocalError(f"Field '{name}' must be a list.")
        assert field.item is not None
        return [_from_json(f"{name}[{i}]", field.item, v) for i, v in enumerate(value)]
    if k == "map":
        if not isinstance(value, dict):
            raise LocalError(f"Field '{name}' must be an object.")
        assert field.fields is not None
        return {key: (_from_json(key, field.fields[key], v) if key in field.fields else v)
                for key, v in value.items()}
    if isinstance(value, float):
        raise LocalError(f"Field '{name}' must not be a floating-point number; use a decimal string.")
    return value


def body_from_json(plugin: Plugin, body: Any) -> dict[str, Any]:
    """Convert and schema-check a JSON body for `plugin`; raise LocalError."""
    if not isinstance(body, dict):
        raise LocalError("A record body must be a JSON object.")
    op = body.get("op")
    if not isinstance(op, str) or op not in plugin.ops:
        raise LocalError(f"A '{plugin.name}' record needs 'op', one of: {', '.join(plugin.ops)}.")
    fields = plugin.ops[op]
    out: dict[str, Any] = {"op": op}
    for key, value in body.items():
        if key == "op":
            continue
        if key not in fields:
            raise LocalError(f"A '{plugin.name}.{op}' record has no field '{key}'.")
        out[key] = _from_json(key, fields[key], value)
    try:
        plugin.check_body(out)
    except ValuemeshError as exc:
        raise LocalError(exc.message) from None
    return out
