"""protocol/punch.py: the hole-punch messages, both state machines, roles and budgets."""

from __future__ import annotations

import pytest

from valuemesh.protocol import cbor, punch
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.punch import Candidate, Connect, PunchError, Sync

AID = bytes(range(16))
A_ADDRS = (Candidate("198.51.100.7", 7600), Candidate("192.168.1.10", 7600))
B_ADDRS = (Candidate("203.0.113.9", 7601), Candidate("2001:db8::1", 7601))


def member(n: int) -> MemberId:
    return MemberId(bytes([n]) * 32)


def test_round_trip() -> None:
    for msg in (Connect(AID, A_ADDRS), Sync(AID)):
        assert punch.decode(punch.encode(msg)) == msg


def test_full_exchange_times_the_dial() -> None:
    ini = punch.Initiator(AID, A_ADDRS)
    resp = punch.Responder(B_ADDRS)
    connect = ini.connect(now=10.0)
    msg = punch.decode(connect)
    assert isinstance(msg, Connect)
    answer = resp.on_connect(msg, now=10.05)
    plan = ini.on_reply(answer, now=10.1)
    assert plan.dial == B_ADDRS
    assert plan.rtt == pytest.approx(0.1)
    assert plan.wait == pytest.approx(0.05)
    assert resp.on_sync(plan.sync, now=10.15) == A_ADDRS


def test_replayed_sync_is_refused() -> None:
    ini = punch.Initiator(AID, A_ADDRS)
    resp = punch.Responder(B_ADDRS)
    msg = punch.decode(ini.connect(0.0))
    assert isinstance(msg, Connect)
    plan = ini.on_reply(resp.on_connect(msg, 0.0), 0.1)
    resp.on_sync(plan.sync, 0.2)
    with pytest.raises(PunchError, match="twice"):
        resp.on_sync(plan.sync, 0.3)


def test_sync_for_another_attempt_or_too_late_is_refused() -> None:
    resp = punch.Responder(B_ADDRS)
    with pytest.raises(PunchError, match="not answering"):
        resp.on_sync(punch.encode(Sync(AID)), 0.0)
    resp.on_connect(Connect(AID, A_ADDRS), 0.0)
    with pytest.raises(PunchError, match="not answering"):
        resp.on_sync(punch.encode(Sync(bytes(16))), 0.1)
    with pytest.raises(PunchError, match="too late"):
        resp.on_sync(punch.encode(Sync(AID)), punch.SYNC_TIMEOUT + 1)
    with pytest.raises(PunchError, match="second"):
        resp.on_connect(Connect(AID, A_ADDRS), 0.2)


def test_initiator_refuses_wrong_answers() -> None:
    ini = punch.Initiator(AID, A_ADDRS)
    with pytest.raises(PunchError, match="none was awaited"):
        ini.on_reply(punch.encode(Connect(AID, B_ADDRS)), 0.0)
    ini.connect(0.0)
    with pytest.raises(PunchError, match="punch-sync where"):
        ini.on_reply(punch.encode(Sync(AID)), 0.1)
    with pytest.raises(PunchError, match="different"):
        ini.on_reply(punch.encode(Connect(bytes(16), B_ADDRS)), 0.1)
    with pytest.raises(PunchError, match="too late"):
        ini.on_reply(punch.encode(Connect(AID, B_ADDRS)), punch.REPLY_TIMEOUT + 1)
    with pytest.raises(LocalError):
        ini.connect(0.2)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (b"\xff" * (punch.MAX_MESSAGE + 1), "at most"),
        (b"\x9f\x00", "not valid CBOR"),
        (cbor.encode([1, 2]), "must be a map"),
        (cbor.encode({"t": "punch-hello", "id": AID}), "must be a map"),
        (cbor.encode({"t": "punch-sync", "id": AID, "x": 1}), "missing or unknown"),
        (cbor.encode({"t": "punch-sync", "id": b"short"}), "16 bytes"),
        (cbor.encode({"t": "punch-connect", "id": AID, "addrs": []}), "1 to 8"),
        (
            cbor.encode({"t": "punch-connect", "id": AID, "addrs": [["10.0.0.1", p] for p in range(1, 10)]}),
            "1 to 8",
        ),
        (cbor.encode({"t": "punch-connect", "id": AID, "addrs": [["10.0.0.1"]]}), "pair"),
        (cbor.encode({"t": "punch-connect", "id": AID, "addrs": [["example.org", 80]]}), "not an IP"),
        (cbor.encode({"t": "punch-connect", "id": AID, "addrs": [["0.0.0.0", 80]]}), "unicast"),
        (cbor.encode({"t": "punch-connect", "id": AID, "addrs": [["224.0.0.1", 80]]}), "unicast"),
        (cbor.encode({"t": "punch-connect", "id": AID, "addrs": [["2001:DB8::1", 80]]}), "canonical"),
        (cbor.encode({"t": "punch-connect", "id": AID, "addrs": [["10.0.0.1", 0]]}), "port"),
        (cbor.encode({"t": "punch-connect", "id": AID, "addrs": [["10.0.0.1", 65536]]}), "port"),
        (cbor.encode({"t": "punch-connect", "id": AID, "addrs": [["10.0.0.1", True]]}), "port"),
        (cbor.encode({"t": "punch-connect", "id": AID, "addrs": [["x" * 500, 1]]}), "IP address"),
        (cbor.encode({"t": "punch-connect", "id": AID, "addrs": [["10.0.0.1", 5], ["10.0.0.1", 5]]}), "twice"),
    ],
)
def test_hostile_input_is_one_sentence(value: bytes, why: str) -> None:
    with pytest.raises(PunchError, match=why) as err:
        punch.decode(value)
    text = str(err.value)
    assert "\n" not in text and text.endswith(".")


def test_garbage_to_state_machines_changes_nothing() -> None:
    ini = punch.Initiator(AID, A_ADDRS)
    ini.connect(0.0)
    with pytest.raises(PunchError):
        ini.on_reply(b"\x00garbage", 0.1)
    assert ini.phase is punch.Phase.CONNECT_SENT
    resp = punch.Responder(B_ADDRS)
    resp.on_connect(Connect(AID, A_ADDRS), 0.0)
    with pytest.raises(PunchError):
        resp.on_sync(b"\xa0", 0.1)
    assert resp.phase is punch.Phase.ANSWERED
    assert resp.on_sync(punch.encode(Sync(AID)), 0.1) == A_ADDRS


def test_handshake_role_is_the_lower_id_whoever_started() -> None:
    lo, hi = member(1), member(2)
    assert punch.handshake_initiator(lo, hi) is True
    assert punch.handshake_initiator(hi, lo) is False
    with pytest.raises(LocalError):
        punch.handshake_initiator(lo, lo)


def test_candidates_keep_order_dedupe_and_bound() -> None:
    got = punch.candidates([("198.51.100.7", 7600), ("198.51.100.7", 7600), ("192.168.1.10", 7600), ("::1", 7600)])
    assert got == (Candidate("198.51.100.7", 7600), Candidate("192.168.1.10", 7600), Candidate("::1", 7600))
    many = punch.candidates([(f"10.0.0.{i}", 1) for i in range(1, 20)])
    assert len(many) == punch.MAX_ADDRS
    with pytest.raises(LocalError, match="Cannot offer"):
        punch.candidates([("example.org", 1)])
    with pytest.raises(LocalError, match="Cannot offer"):
        punch.candidates([("10.0.0.1", 0)])


def test_backoff_doubles_with_jitter_and_resets() -> None:
    b = punch.PairBackoff(base=10, cap=35)
    p = member(3)
    assert b.wait(p, 0) == 0
    assert b.failed(p, 0, jitter=0.0) == 5
    assert b.wait(p, 1) == 4
    assert b.failed(p, 5, jitter=0.999999) == pytest.approx(20, abs=1e-3)
    assert b.failed(p, 25, jitter=0.999999) == pytest.approx(35, abs=1e-3)  # capped
    b.succeeded(p)
    assert b.wait(p, 26) == 0


def test_backoff_and_budget_are_bounded_in_peers() -> None:
    b = punch.PairBackoff()
    g = punch.ResponderBudget()
    for i in range(punch.MAX_TRACKED_PEERS + 50):
        m = MemberId(i.to_bytes(32, "big"))
        b.failed(m, 0, 0.5)
        g.allow(m, 0)
    assert len(b._state) == punch.MAX_TRACKED_PEERS
    assert len(g._seen) == punch.MAX_TRACKED_PEERS


def test_responder_budget_limits_connects_per_member() -> None:
    g = punch.ResponderBudget(limit=3, window=60)
    p, q = member(4), member(5)
    assert [g.allow(p, t) for t in (0, 1, 2, 3)] == [True, True, True, False]
    assert g.allow(q, 3)
    assert g.allow(p, 61)
