"""Test vectors for docs/protocol.md: every encoded object valuemesh defines,
built from fixed seeds, so a second implementation can check itself byte for byte.

`generate()` is pure and deterministic; `python -m valuemesh.protocol.vectors`
prints the JSON kept in docs/vectors.json (tests/test_vectors.py compares them).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import nacl.pwhash
import nacl.secret

from . import cbor, wire
from . import circuit as cm
from .builtin import builtin_registry
from .builtin.membership import make_genesis
from .identity import FAST_MEMLIMIT, FAST_OPSLIMIT, Identity, encode_keyfile
from .invite import INVITE_DOMAIN, Invite
from .ledger import Ledger
from .records import BLOCK_DOMAIN, RECORD_DOMAIN, Block, Record, check_equivocation, constellation_text

VECTORS_VERSION = 1
GENESIS_TIME = 1_700_000_000_000


def seed(label: str) -> bytes:
    """The 32-byte seed of a named test identity: BLAKE2b-256 of the label."""
    return hashlib.blake2b(label.encode(), digest_size=32).digest()


def diag(value: Any) -> str:
    """RFC 8949 §8 diagnostic notation of a value (h'…' for byte strings)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, bytes):
        return f"h'{value.hex()}'"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(diag(v) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: cbor.encode(kv[0]))
        return "{" + ", ".join(f"{diag(k)}: {diag(v)}" for k, v in items) + "}"
    raise TypeError(f"no diagnostic notation for {type(value).__name__}")


CANONICAL = [
    0, 23, 24, 255, 256, 65535, 65536, 4294967295, 4294967296, 18446744073709551615,
    -1, -24, -25, -18446744073709551616, False, True, None, b"", b"\x01\x02", "", "vm1", "ü", [], [1, [2]],
    {}, {"b": 1, "a": 2, "aa": 3, 10: 4, -1: 5},
]

REJECTED = [
    ("integer 0 in a two-byte head", "1800"),
    ("integer 255 in a three-byte head", "1900ff"),
    ("byte string length in a longer head than needed", "580161"),
    ("map keys out of order", "a2616201616101"),
    ("map key repeated", "a2616101616102"),
    ("indefinite-length array", "9f01ff"),
    ("indefinite-length byte string", "5f4101ff"),
    ("float", "f93c00"),
    ("tag", "c249010000000000000000"),
    ("undefined", "f7"),
    ("byte-string map key", "a1410000"),
    ("trailing byte", "0000"),
    ("invalid UTF-8", "62c328"),
    ("17 nested arrays", "81" * 17 + "00"),
]


def _record_vector(r: Record) -> dict[str, Any]:
    payload = cbor.encode(r.payload_map())
    return {
        "type": r.type, "v": r.v, "constellation": r.constellation.hex(), "author": r.author.key.hex(),
        "seq": r.seq, "created": r.created, "body": diag(r.body),
        "payload": payload.hex(), "signed_message": (RECORD_DOMAIN + payload).hex(),
        "sig": r.sig.hex(), "record": r.raw.hex(), "id": r.id.hex(),
    }


WIRE_NETWORK = b"valuemesh-vectors"


def _wire_vectors(alice: Identity, bob: Identity) -> dict[str, Any]:
    """A whole handshake (alice initiates, bob responds), frames, relay sub-protocol messages."""
    e_i, e_r = seed("alice ephemeral"), seed("bob ephemeral")
    i = wire.Initiator(alice, WIRE_NETWORK, e_i)
    r = wire.Responder(bob, WIRE_NETWORK, e_r)
    hello = i.start()
    response = r.read_hello(hello)
    i.read_response(response)
    auth = i.auth()
    r.read_auth(auth)
    verdict, _ = r.verdict()
    ch = i.read_verdict(verdict)
    opened = cm.open_(1, bob.member)
    frames = [
        {"from": "alice", "counter": 0, "kind": wire.FRAME_DATA, "body": b"hello bob".hex(),
         "frame": ch.seal(wire.FRAME_DATA, b"hello bob").hex()},
        {"from": "alice", "counter": 1, "kind": wire.FRAME_CIRCUIT, "body": opened.hex(),
         "frame": ch.seal(wire.FRAME_CIRCUIT, opened).hex()},
    ]
    circuit = {
        "reserve": cm.reserve(), "reserved_ok": cm.reserved(cm.Code.OK),
        "open_1_to_bob": opened,
        "incoming_responder_side_1_from_alice": cm.incoming(cm.RESPONDER_BIT | 1, alice.member),
        "opened_1_refused": cm.opened(1, cm.Code.REFUSED), "data_1": cm.data(1, hello),
        "close_1": cm.close(1, "bye"), "credit_1": cm.credit(1, cm.INITIAL_WINDOW // 2),
    }
    return {
        "version": wire.VERSION, "network_id": WIRE_NETWORK.hex(),
        "initiator": "alice", "responder": "bob",
        "initiator_ephemeral_secret": e_i.hex(), "responder_ephemeral_secret": e_r.hex(),
        "hello": hello.hex(), "response": response.hex(), "auth": auth.hex(), "verdict": verdict.hex(),
        "session_id": ch.session_id.hex(), "frames": frames,
        "circuit": {k: v.hex() for k, v in circuit.items()},
    }


def generate() -> dict[str, Any]:
    """All test vectors, as JSON-ready data."""
    alice = Identity(seed("alice"))
    bob = Identity(seed("bob"))

    genesis = make_genesis(
        alice, name="Bakery co-op", purpose="bread for the street", nonce=bytes(range(16)),
        created=GENESIS_TIME, plugins={"contribution": "1.0"},
        members=[
            {"key": alice.member.key, "name": "Alice", "roles": ["facilitator", "producer"], "tier": "core",
             "weight": 1},
            {"key": bob.member.key, "name": "Bob", "roles": ["investor"], "tier": "core", "weight": 1},
        ],
    )
    cid = genesis.constellation
    work = Record.create(bob, type="contribution", v=1, constellation=cid, seq=0, created=GENESIS_TIME + 60_000,
                         body={"op": "record", "action": "work", "quantity": "3.5", "unit": "hour",
                               "note": "oven repair", "period": {"start": GENESIS_TIME, "end": GENESIS_TIME + 1}})
    ack = Record.create(alice, type="contribution", v=1, constellation=cid, seq=1, created=GENESIS_TIME + 120_000,
                        body={"op": "ack", "target": work.id})
    fork = Record.create(bob, type="contribution", v=1, constellation=cid, seq=0, created=GENESIS_TIME + 60_000,
                         body={"op": "record", "action": "work", "quantity": "35", "unit": "hour"})
    proof = check_equivocation(work, fork)
    assert proof is not None

    block = Block.create(alice, constellation=cid, epoch=0, round=1, prev=None,
                         parents=[hashlib.blake2b(b"parent", digest_size=32).digest()],
                         records=[work, ack], created=GENESIS_TIME + 130_000)
    block_payload = cbor.encode({k: v for k, v in cbor.decode(block.raw).items() if k != "sig"})

    ledger = Ledger(builtin_registry(), cid)
    hashes = []
    for rec, now in ((genesis, GENESIS_TIME), (work, GENESIS_TIME + 200_000), (ack, GENESIS_TIME + 200_000)):
        out = ledger.apply(rec, now)
        assert all(o.applied for o in out), out
        hashes.append(ledger.state_hash().hex())

    invite = Invite.create(alice, constellation=cid, name="Bakery co-op", tier="contributor", roles=("customer",),
                           uses=5, expires=GENESIS_TIME + 86_400_000, addrs=(("127.0.0.1", 7300),),
                           nonce=bytes(16), approve=True)

    salt = bytes(range(nacl.pwhash.argon2id.SALTBYTES))
    nonce = bytes(range(100, 100 + nacl.secret.SecretBox.NONCE_SIZE))
    parts = iter([salt, nonce])
    sealed = encode_keyfile(alice, "correct horse battery staple", lambda n: next(parts)[:n],
                            opslimit=FAST_OPSLIMIT, memlimit=FAST_MEMLIMIT)

    return {
        "version": VECTORS_VERSION,
        "cbor": {
            "canonical": [{"value": diag(v), "hex": cbor.encode(v).hex()} for v in CANONICAL],
            "rejected": [{"why": why, "hex": h} for why, h in REJECTED],
        },
        "identities": [
            {"label": label, "seed": ident.seed.hex(), "public_key": ident.member.key.hex(),
             "member_id": str(ident.member)}
            for label, ident in (("alice", alice), ("bob", bob))
        ],
        "genesis": {**_record_vector(genesis), "constellation_text": constellation_text(cid)},
        "record": _record_vector(work),
        "ack": _record_vector(ack),
        "equivocation": {"second_record": fork.raw.hex(), "proof": proof.encode().hex()},
        "block": {
            "payload": block_payload.hex(), "signed_message": (BLOCK_DOMAIN + block_payload).hex(),
            "sig": block.sig.hex(), "block": block.raw.hex(), "id": block.id.hex(),
        },
        "state_hashes": {
            "after_genesis": hashes[0], "after_record": hashes[1], "after_ack": hashes[2],
            "applied_at": [GENESIS_TIME, GENESIS_TIME + 200_000, GENESIS_TIME + 200_000],
            "final_state": {k: v.hex() for k, v in ledger.entries()},
        },
        "invite": {
            "payload": cbor.encode(invite.payload()).hex(),
            "signed_message": (INVITE_DOMAIN + cbor.encode(invite.payload())).hex(),
            "raw": invite.raw().hex(), "id": invite.id.hex(), "token": invite.text(),
        },
        "wire": _wire_vectors(alice, bob),
        "keyfile": {
            "plain": encode_keyfile(alice, None, lambda n: b"").hex(),
            "sealed": sealed.hex(), "passphrase": "correct horse battery staple",
            "opslimit": FAST_OPSLIMIT, "memlimit": FAST_MEMLIMIT, "salt": salt.hex(), "nonce": nonce.hex(),
        },
    }


def render_json(vectors: dict[str, Any] | None = None) -> str:
    """docs/vectors.json."""
    return json.dumps(generate() if vectors is None else vectors, indent=1, ensure_ascii=False) + "\n"


MD_BEGIN = "<!-- vectors:begin (generated by python -m valuemesh.protocol.vectors --markdown) -->"
MD_END = "<!-- vectors:end -->"


def render_markdown(vectors: dict[str, Any] | None = None) -> str:
    """The test-vector section of docs/protocol.md, between MD_BEGIN and MD_END."""
    v = generate() if vectors is None else vectors
    out = [MD_BEGIN, ""]

    def block(title: str, rows: list[tuple[str, object]]) -> None:
        out.append(f"**{title}**")
        out.append("")
        out.append("```")
        out.extend(f"{k}: {val}" for k, val in rows)
        out.append("```")
        out.append("")

    block("Canonical CBOR (diagnostic notation → hex)",
          [(c["value"], c["hex"]) for c in v["cbor"]["canonical"]])
    block("Encodings every decoder must reject", [(c["why"], c["hex"]) for c in v["cbor"]["rejected"]])
    for ident in v["identities"]:
        block(f"Identity '{ident['label']}' (seed = BLAKE2b-256 of the label)",
              [(k, ident[k]) for k in ("seed", "public_key", "member_id")])
    for name, title in (("genesis", "Genesis record (signed by alice)"),
                        ("record", "Contribution record (signed by bob)"),
                        ("ack", "Acknowledgement record (signed by alice)")):
        r = v[name]
        block(title, [(k, r[k]) for k in r])
    block("Equivocation: bob's second record with seq 0, and the proof",
          list(v["equivocation"].items()))
    block("Block (signed by alice, carrying the record and the ack)", list(v["block"].items()))
    sh = v["state_hashes"]
    block("State hashes after applying genesis, record, ack (at the times given)",
          [(k, sh[k]) for k in ("applied_at", "after_genesis", "after_record", "after_ack")])
    block("Final ledger state (key: canonical CBOR value)", list(sh["final_state"].items()))
    block("Invite token (signed by alice)", list(v["invite"].items()))
    block("Key files of alice", list(v["keyfile"].items()))
    out.append(MD_END)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    print(render_markdown() if "--markdown" in sys.argv else render_json(), end="")
