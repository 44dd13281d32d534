"""The gossip messages' wire form: every type round-trips, and the decoder refuses
missing, extra, mistyped and out-of-bounds fields with a DecodeError."""

from __future__ import annotations

import pytest

from valuemesh.protocol import cbor
from valuemesh.protocol import messages as m
from valuemesh.protocol.errors import DecodeError

C = bytes(range(32))

GOOD: list[m.Message] = [
    m.Heads(C, 1, 5, [[bytes(32), 1, 7]]),
    m.GetCheckpoint(C),
    m.CheckpointChain(C, [[b"cert", b"committee"]], 1000, 12),
    m.CheckpointChain(C, [], 0, 0),
    m.GetSnapshot(C, 2, 0),
    m.SnapshotPart(C, 2, 0, b"x" * 10, 10),
]


@pytest.mark.parametrize("msg", GOOD, ids=lambda x: type(x).__name__)
def test_messages_round_trip(msg: m.Message) -> None:
    assert m.decode_message(m.encode_message(msg)) == msg


@pytest.mark.parametrize("bad", [
    m.CheckpointChain(C, [[b"cert"]], 1000, 12),              # a link is [certificate, committee]
    m.CheckpointChain(C, [[b"a", b"b"]], 0, 12),              # links but no snapshot
    m.CheckpointChain(C, [], 10, 0),                          # a snapshot without links
    m.CheckpointChain(C, [[b"a", b"b"]] * (m.MAX_CHAIN_LINKS + 1), 10, 0),
    m.CheckpointChain(C[:31], [], 0, 0),
    m.GetSnapshot(C, -1, 0),
    m.SnapshotPart(C, 1, 5, b"xx", 6),                        # runs past its total
    m.SnapshotPart(C, 1, 0, b"", 6),                          # an empty part
    m.SnapshotPart(C, 1, 0, b"x" * (m.SNAPSHOT_CHUNK + 1), m.SNAPSHOT_CHUNK + 1),
    m.SnapshotPart(C, 1, 6, b"x", 6),                         # starts at its end
], ids=repr)
def test_out_of_bounds_messages_are_refused(bad: m.Message) -> None:
    with pytest.raises(DecodeError, match="out of bounds"):
        m.decode_message(m.encode_message(bad))


def test_missing_extra_and_mistyped_fields_are_refused() -> None:
    good = cbor.decode(m.encode_message(m.GetSnapshot(C, 2, 0)))
    assert isinstance(good, dict)
    for bad, why in (({k: v for k, v in good.items() if k != "offset"}, "missing or unknown"),
                     ({**good, "more": 1}, "missing or unknown"),
                     ({**good, "offset": "0"}, "wrong type"),
                     ({**good, "epoch": True}, "wrong type"),
                     ({**good, "t": "nope"}, "Unknown message type")):
        with pytest.raises(DecodeError, match=why):
            m.decode_message(cbor.encode(bad))
