"""How stored bytes are read back: decoding checked against the row's key, and signature sets.

Raw bytes were verified before they were stored, so they are decoded with verify=False; the id
is still recomputed, so on-disk corruption is reported as `StoreError`, never returned.
"""

from __future__ import annotations

from collections.abc import Mapping

from valuemesh.node.store.errors import StoreError
from valuemesh.protocol import cbor
from valuemesh.protocol.errors import DecodeError, ValuemeshError
from valuemesh.protocol.records import Block, EquivocationProof, Record, decode_block, decode_record


def decode_stored_block(raw: bytes, expected_id: bytes) -> Block:
    try:
        block = decode_block(bytes(raw), verify=False)
    except ValuemeshError as e:
        raise StoreError(f"The stored block {expected_id.hex()[:16]} is unreadable ({e}).") from None
    if block.id != expected_id:
        raise StoreError(f"The stored block {expected_id.hex()[:16]} does not match its id.")
    return block


def decode_stored_record(raw: bytes, expected_id: bytes) -> Record:
    try:
        record = decode_record(bytes(raw), verify=False)
    except ValuemeshError as e:
        raise StoreError(f"The stored record {expected_id.hex()[:16]} is unreadable ({e}).") from None
    if record.id != expected_id:
        raise StoreError(f"The stored record {expected_id.hex()[:16]} does not match its id.")
    return record


def encode_signatures(sigs: Mapping[bytes, bytes]) -> bytes:
    # CBOR map keys are text or integers here, so signatures are a list of [signer, sig] pairs
    # sorted by signer: one canonical encoding per set of signatures.
    return cbor.encode([[k, sigs[k]] for k in sorted(sigs)])


def decode_signatures(raw: bytes) -> dict[bytes, bytes]:
    try:
        value = cbor.decode(raw)
        return {bytes(k): bytes(v) for k, v in value}
    except (DecodeError, TypeError, ValueError):
        raise StoreError("A stored checkpoint's signatures are unreadable.") from None


def decode_proof(raw: bytes) -> EquivocationProof:
    try:
        m = cbor.decode(raw)
        return EquivocationProof(str(m["kind"]), bytes(m["a"]), bytes(m["b"]))
    except (DecodeError, KeyError, TypeError):
        raise StoreError("A stored equivocation proof is unreadable.") from None
