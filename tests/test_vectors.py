"""The test vectors in docs/protocol.md and docs/vectors.json: regenerated from
the code and compared, then re-derived from the spec with hashlib and PyNaCl alone.

To refresh after an intended format change:
  python -m valuemesh.protocol.vectors > docs/vectors.json
  and paste `python -m valuemesh.protocol.vectors --markdown` over the section.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import nacl.pwhash
import nacl.secret
import nacl.signing
import pytest

from valuemesh.protocol import cbor
from valuemesh.protocol.errors import DecodeError
from valuemesh.protocol.identity import decode_keyfile
from valuemesh.protocol.invite import decode_invite
from valuemesh.protocol.records import EquivocationProof, decode_block, decode_record
from valuemesh.protocol.vectors import MD_BEGIN, MD_END, generate, render_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    return generate()


def H(data: bytes, size: int = 32) -> bytes:
    return hashlib.blake2b(data, digest_size=size).digest()


def test_vectors_json_matches_the_code(vectors: dict[str, Any]) -> None:
    stored = json.loads((DOCS / "vectors.json").read_text(encoding="utf-8"))
    assert stored == vectors, "docs/vectors.json is stale; regenerate it (see this file's docstring)"


def test_protocol_md_vectors_match_the_code(vectors: dict[str, Any]) -> None:
    doc = (DOCS / "protocol.md").read_text(encoding="utf-8")
    start, end = doc.index(MD_BEGIN), doc.index(MD_END) + len(MD_END)
    assert doc[start:end] + "\n" == render_markdown(vectors), "docs/protocol.md's vectors are stale"


def test_cbor_vectors(vectors: dict[str, Any]) -> None:
    for case in vectors["cbor"]["canonical"]:
        data = bytes.fromhex(case["hex"])
        assert cbor.encode(cbor.decode(data)) == data
    for case in vectors["cbor"]["rejected"]:
        with pytest.raises(DecodeError):
            cbor.decode(bytes.fromhex(case["hex"]))


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=").lower()


def test_identity_vectors_follow_the_spec(vectors: dict[str, Any]) -> None:
    for ident in vectors["identities"]:
        seed = bytes.fromhex(ident["seed"])
        assert seed == H(ident["label"].encode())
        key = bytes(nacl.signing.SigningKey(seed).verify_key)
        assert key.hex() == ident["public_key"]
        assert ident["member_id"] == "vm1" + _b32(key + H(b"valuemesh-member-id" + key, 4))


def _check_record(r: dict[str, Any], domain: bytes) -> None:
    payload = bytes.fromhex(r["payload"])
    raw = bytes.fromhex(r["record"])
    assert bytes.fromhex(r["signed_message"]) == domain + payload
    nacl.signing.VerifyKey(bytes.fromhex(r["author"])).verify(domain + payload, bytes.fromhex(r["sig"]))
    assert bytes.fromhex(r["id"]) == H(payload)
    m = cbor.decode(raw)
    assert m["sig"].hex() == r["sig"] and cbor.encode({k: v for k, v in m.items() if k != "sig"}) == payload
    assert (m["type"], m["v"], m["seq"], m["created"]) == (r["type"], r["v"], r["seq"], r["created"])
    # Splicing sig out of the record bytes gives the payload (map head a8 -> a7).
    i = raw.index(b"\x63sig\x58\x40")
    assert b"\xa7" + raw[1:i] + raw[i + 70 :] == payload
    assert decode_record(raw).id.hex() == r["id"]


def test_record_vectors_follow_the_spec(vectors: dict[str, Any]) -> None:
    for name in ("genesis", "record", "ack"):
        _check_record(vectors[name], b"valuemesh/record/v1\x00")
    g = vectors["genesis"]
    body = cbor.decode(bytes.fromhex(g["record"]))["body"]
    cid = H(b"valuemesh/constellation/v1\x00" + bytes.fromhex(g["author"]) + cbor.encode(body))
    assert cid.hex() == g["constellation"]
    assert g["constellation_text"] == "vc1" + _b32(cid + H(b"valuemesh-constellation-id" + cid, 4))
    assert cbor.decode(bytes.fromhex(vectors["ack"]["record"]))["body"]["target"].hex() == vectors["record"]["id"]


def test_block_and_proof_vectors_follow_the_spec(vectors: dict[str, Any]) -> None:
    b = vectors["block"]
    payload = bytes.fromhex(b["payload"])
    assert bytes.fromhex(b["signed_message"]) == b"valuemesh/block/v1\x00" + payload
    author = vectors["identities"][0]["public_key"]
    nacl.signing.VerifyKey(bytes.fromhex(author)).verify(b"valuemesh/block/v1\x00" + payload,
                                                         bytes.fromhex(b["sig"]))
    assert H(payload).hex() == b["id"]
    block = decode_block(bytes.fromhex(b["block"]))
    assert [r.id.hex() for r in block.records] == [vectors["record"]["id"], vectors["ack"]["id"]]
    proof = bytes.fromhex(vectors["equivocation"]["proof"])
    m = cbor.decode(proof)
    assert m["a"] < m["b"] and {m["a"].hex(), m["b"].hex()} == {
        vectors["record"]["record"], vectors["equivocation"]["second_record"]}
    assert EquivocationProof.decode(proof).verify().key.hex() == vectors["record"]["author"]


def test_state_hash_vectors_follow_the_spec(vectors: dict[str, Any]) -> None:
    state = {k: bytes.fromhex(v) for k, v in vectors["state_hashes"]["final_state"].items()}
    h = hashlib.blake2b(b"valuemesh/state/v1\x00", digest_size=32)
    for k in sorted(state, key=lambda s: s.encode()):
        kb = k.encode()
        h.update(len(kb).to_bytes(4, "big") + kb + len(state[k]).to_bytes(4, "big") + state[k])
    assert h.hexdigest() == vectors["state_hashes"]["after_ack"]
    bob = vectors["identities"][1]["public_key"]
    assert cbor.decode(state[f"ledger/seq/{bob}"]) == 1
    c = cbor.decode(state[f"contribution/c/{vectors['record']['id']}"])
    assert c["acks"] == [bytes.fromhex(vectors["identities"][0]["public_key"])]


def test_invite_vector_follows_the_spec(vectors: dict[str, Any]) -> None:
    v = vectors["invite"]
    raw = bytes.fromhex(v["raw"])
    assert v["token"] == "vmi1" + base64.urlsafe_b64encode(raw).decode().rstrip("=")
    m = cbor.decode(raw)
    payload = bytes.fromhex(v["payload"])
    assert cbor.encode(m["p"]) == payload and H(payload).hex() == v["id"]
    assert bytes.fromhex(v["signed_message"]) == b"valuemesh/invite/v1\x00" + payload
    nacl.signing.VerifyKey(m["p"]["inviter"]).verify(b"valuemesh/invite/v1\x00" + payload, m["sig"])
    assert decode_invite(raw).id.hex() == v["id"]


def test_keyfile_vectors_follow_the_spec(vectors: dict[str, Any]) -> None:
    k = vectors["keyfile"]
    alice_seed = bytes.fromhex(vectors["identities"][0]["seed"])
    assert cbor.decode(bytes.fromhex(k["plain"])) == {"v": 1, "kind": "plain", "seed": alice_seed}
    doc = cbor.decode(bytes.fromhex(k["sealed"]))
    assert (doc["ops"], doc["mem"], doc["salt"].hex()) == (k["opslimit"], k["memlimit"], k["salt"])
    assert doc["box"][:24].hex() == k["nonce"]
    key = nacl.pwhash.argon2id.kdf(32, k["passphrase"].encode(), doc["salt"], opslimit=doc["ops"],
                                   memlimit=doc["mem"])
    assert nacl.secret.SecretBox(key).decrypt(doc["box"]) == alice_seed
    assert decode_keyfile(bytes.fromhex(k["sealed"]), k["passphrase"]).seed == alice_seed
