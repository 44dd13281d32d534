"""The JSON <-> CBOR body conversion of the local API (node/jsonbody.py), driven by a plugin's
field schema: member ids and hashes cross as text, anything the schema refuses is one LocalError.
"""

from __future__ import annotations

from typing import Any

import pytest

from valuemesh.node.jsonbody import body_from_json, body_to_json, to_json
from valuemesh.protocol.builtin.contribution import PLUGIN as CONTRIBUTION
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.plugins import Field

BOB = Identity(b"\x02" * 32).member
TARGET = bytes(range(32))


def record_json(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"op": "record", "action": "work", "quantity": "2.5", "unit": "hour",
                            "provider": str(BOB), "evidence": {"uri": "https://x.example/a", "hash": TARGET.hex()}}
    body.update(over)
    return body


def test_a_body_crosses_both_ways_unchanged() -> None:
    body = body_from_json(CONTRIBUTION, record_json())
    assert body["provider"] == BOB.key
    assert body["evidence"]["hash"] == TARGET
    assert body_to_json(CONTRIBUTION, body) == record_json()


def test_outward_bytes_are_hex_and_members_are_ids() -> None:
    assert to_json(TARGET) == TARGET.hex()
    assert to_json(BOB.key, Field("member")) == str(BOB)
    # A 32-byte value not declared as a member stays hex, whatever it looks like.
    assert to_json(BOB.key, Field("hash")) == BOB.key.hex()
    assert to_json([b"\x01", {"k": b"\x02"}]) == ["01", {"k": "02"}]


def test_an_unknown_op_is_named() -> None:
    with pytest.raises(LocalError, match="needs 'op', one of: record, ack, dispute, amend"):
        body_from_json(CONTRIBUTION, {"op": "steal"})


@pytest.mark.parametrize(("body", "words"), [
    ([1, 2], "must be a JSON object"),
    ({"op": "ack"}, "lacks the required field 'target'"),
    ({"op": "ack", "target": "zz"}, "Field 'target' must be hex text"),
    ({"op": "ack", "target": 5}, "Field 'target' must be hex text"),
    ({"op": "ack", "target": "00"}, "must be 32 bytes"),
    ({"op": "ack", "target": TARGET.hex(), "extra": 1}, "has no field 'extra'"),
    (record_json(provider="bob"), "member id"),
    (record_json(provider=7), "must be a member id"),
    (record_json(quantity=2.5), "must not be a floating-point number"),
    (record_json(evidence=["x"]), "must be an object"),
    (record_json(action="theft"), "must be one of"),
])
def test_bad_bodies_are_refused_with_one_sentence(body: Any, words: str) -> None:
    with pytest.raises(LocalError, match=words):
        body_from_json(CONTRIBUTION, body)
