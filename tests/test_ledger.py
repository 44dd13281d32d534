"""Tests of the ledger state machine with the built-in plugins: sequencing,
authorisation, the membership and contribution flows, and the state hash.

Every refusal is checked to leave the state hash unchanged; property tests
apply random record sequences to independent ledgers and compare hashes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valuemesh.protocol import ledger as ledger_module
from valuemesh.protocol.builtin import builtin_registry
from valuemesh.protocol.builtin.membership import make_genesis
from valuemesh.protocol.errors import AuthorizationError, SequenceError, ValidationError
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.invite import Invite
from valuemesh.protocol.ledger import MAX_DEFERRED_PER_AUTHOR, ApplyContext, Ledger, Outcome
from valuemesh.protocol.plugins import Field, Plugin, Version, text
from valuemesh.protocol.records import Record
from valuemesh.protocol.testing import STEP_MS, TestConstellation

WORK = {"op": "record", "action": "work", "quantity": "2", "unit": "hour"}


def refused(tc: TestConstellation, record: Record, fragment: str = "") -> Outcome:
    """Apply `record`, expect a rejection mentioning `fragment`, and an unchanged state."""
    before = tc.state_hash()
    out = tc.apply(record)
    assert out.status == "rejected", out
    assert fragment.lower() in out.reason.lower(), out.reason
    assert out.reason.endswith(".") and "\n" not in out.reason
    assert tc.state_hash() == before
    return out


def applied(tc: TestConstellation, record: Record) -> Outcome:
    before = tc.state_hash()
    out = tc.apply(record)
    assert out.applied, out.reason
    assert tc.state_hash() != before
    return out


def member(tc: TestConstellation, i: int) -> dict[str, Any]:
    m = tc.ledger.reader.member(tc.member(i).key)
    assert m is not None
    return m


# -- genesis and sequencing ---------------------------------------------------------


def test_genesis_founds_the_constellation() -> None:
    tc = TestConstellation(3)
    led = tc.ledger
    assert led.founded and not led.dissolved
    assert [m for m, _ in led.committee()] == sorted(tc.member(i) for i in range(3))
    assert member(tc, 0)["roles"] == ["customer", "facilitator", "investor", "producer"]
    assert member(tc, 1)["roles"] == ["producer"]
    meta = led.reader.read("membership", "meta")
    assert meta["founder"] == tc.member(0).key and "contribution" in meta["plugins"]
    assert led.reader.policy()["reserve"]["membership.remove"] == ["facilitator"]
    assert led.next_seq(tc.member(0)) == 1


def test_nothing_but_a_genesis_applies_first() -> None:
    tc = TestConstellation(2)
    empty = Ledger(tc.registry, tc.constellation)
    before = empty.state_hash()
    out = empty.apply(tc.sign(1, "contribution", WORK), 1)
    assert out[0].status == "rejected" and "no genesis" in out[0].reason
    assert empty.state_hash() == before and not empty.founded


def test_a_second_genesis_is_refused() -> None:
    tc = TestConstellation(2)
    again = Record.create(tc.identity(0), type="membership", v=1, constellation=tc.constellation,
                          seq=tc.ledger.next_seq(tc.member(0)), body=tc.genesis.body, created=1)
    refused(tc, again)


def test_genesis_must_hash_to_its_constellation_id() -> None:
    tc = TestConstellation(1)
    forged = Record.create(tc.identity(0), type="membership", v=1, constellation=b"\x09" * 32, seq=0,
                           body=tc.genesis.body, created=1)
    led = Ledger(tc.registry, b"\x09" * 32)
    out = led.apply(forged, 1)[0]
    assert out.status == "rejected" and "does not hash" in out.reason


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"reserve": {"contribution.record": ["wizard"]}}, "unknown role"),
        ({"members": []}, "founder must be among"),
        ({"plugins": {"contribution": "one"}}, "bad version"),
    ],
)
def test_bad_geneses_are_refused(kwargs: dict[str, Any], fragment: str) -> None:
    founder = Identity(b"\x05" * 32)
    args: dict[str, Any] = {"name": "x", "purpose": "", "nonce": b"\x00" * 16, "created": 1,
                            "plugins": {"contribution": "1.0"}}
    args.update(kwargs)
    g = make_genesis(founder, **args)
    led = Ledger(builtin_registry(), g.constellation)
    out = led.apply(g, 1)[0]
    assert out.status == "rejected" and fragment in out.reason, out.reason
    assert not led.founded


def test_out_of_sequence_records_are_deferred_then_released() -> None:
    tc = TestConstellation(2)
    r1, r2, r3 = (tc.sign(1, "contribution", {**WORK, "note": str(i)}) for i in range(3))
    h0 = tc.state_hash()
    assert tc.apply(r3).status == "deferred"
    assert tc.apply(r2).status == "deferred"
    assert tc.apply(r3).status == "duplicate"
    assert tc.state_hash() == h0
    outs = tc.apply_all(r1)
    assert [(o.status, o.record.seq) for o in outs] == [("applied", 0), ("applied", 1), ("applied", 2)]
    assert tc.ledger.next_seq(tc.member(1)) == 3
    assert tc.apply(r2).status == "duplicate"


def test_a_seq_used_twice_is_refused_and_changes_nothing() -> None:
    tc = TestConstellation(2)
    a = tc.sign(1, "contribution", WORK, seq=0)
    b = tc.sign(1, "contribution", {**WORK, "quantity": "3"}, seq=0)
    applied(tc, a)
    refused(tc, b, "reuses a seq")
    c = tc.sign(1, "contribution", WORK, seq=5)
    d = tc.sign(1, "contribution", {**WORK, "unit": "day"}, seq=5)
    assert tc.apply(c).status == "deferred"
    refused(tc, d, "reuses a seq")


def test_deferral_is_bounded_per_author() -> None:
    tc = TestConstellation(2)
    for seq in range(1, MAX_DEFERRED_PER_AUTHOR + 1):
        assert tc.apply(tc.sign(1, "contribution", WORK, seq=seq)).status == "deferred"
    refused(tc, tc.sign(1, "contribution", WORK, seq=MAX_DEFERRED_PER_AUTHOR + 1), "too many records")


def test_deferral_is_bounded_across_authors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_module, "MAX_DEFERRED_TOTAL", 3)
    tc = TestConstellation(2)
    for i in range(3):
        assert tc.apply(tc.sign(20 + i, "contribution", WORK, seq=1)).status == "deferred"
    refused(tc, tc.sign(30, "contribution", WORK, seq=1), "too many records out of sequence")
    # Releasing one author's waiting records frees room for others.
    r0 = tc.sign(1, "contribution", WORK, seq=0)
    monkeypatch.setattr(ledger_module, "MAX_DEFERRED_TOTAL", 4)
    assert tc.apply(tc.sign(1, "contribution", WORK, seq=1)).status == "deferred"
    refused(tc, tc.sign(31, "contribution", WORK, seq=1), "too many records")
    assert [o.status for o in tc.apply_all(r0)] == ["applied", "applied"]
    assert tc.apply(tc.sign(31, "contribution", WORK, seq=2)).status == "deferred"


def test_a_rejected_record_uses_up_its_seq_so_later_ones_still_apply() -> None:
    tc = TestConstellation(2)
    refused(tc, tc.sign(1, "contribution", {**WORK, "quantity": "0"}), "greater than zero")
    applied(tc, tc.sign(1, "contribution", WORK))
    assert tc.ledger.next_seq(tc.member(1)) == 2


@pytest.mark.parametrize(
    ("type_", "body", "fragment"),
    [
        ("contribution", {"op": "nope"}, "needs 'op'"),
        ("contribution", {**WORK, "extra": 1}, "unknown field"),
        ("contribution", {**WORK, "note": "x" * 1001}, "longer than 1000"),
        ("contribution", {**WORK, "quantity": "1e9"}, "decimal"),
        ("contribution", {**WORK, "action": "steal"}, "one of"),
        ("unknown_plugin", {"op": "x"}, "no plugin"),
        ("membership", {"op": "remove", "member": b"\x00" * 31, "reason": "x"}, "32 bytes"),
    ],
)
def test_malformed_bodies_are_refused(type_: str, body: dict[str, Any], fragment: str) -> None:
    tc = TestConstellation(2)
    refused(tc, tc.sign(0, type_, body, v=1), fragment)


def test_wrong_version_and_wrong_constellation_are_refused() -> None:
    tc = TestConstellation(2)
    refused(tc, tc.sign(0, "contribution", WORK, v=2), "version 2")
    other = Record.create(tc.identity(0), type="contribution", v=1, constellation=b"\x01" * 32,
                          seq=1, body=WORK, created=1)
    refused(tc, other, "another constellation")
    assert tc.ledger.next_seq(tc.member(0)) == 2  # the version-2 record took seq 1


def test_non_members_cannot_post() -> None:
    tc = TestConstellation(2)
    refused(tc, tc.sign(7, "contribution", WORK), "not an active member")
    refused(tc, tc.sign(7, "membership", {"op": "leave"}), "not an active member")


def test_check_raises_typed_errors_and_changes_nothing() -> None:
    tc = TestConstellation(2)
    led = tc.ledger
    before = led.state_hash()
    led.check(tc.sign(1, "contribution", WORK, seq=0), tc.now)
    with pytest.raises(SequenceError):
        led.check(tc.sign(1, "contribution", WORK, seq=3), tc.now)
    with pytest.raises(AuthorizationError):
        led.check(tc.sign(8, "contribution", WORK), tc.now)
    with pytest.raises(ValidationError):
        led.check(tc.sign(1, "contribution", {**WORK, "quantity": "0"}, seq=0), tc.now)
    other = Record.create(tc.identity(1), type="contribution", v=1, constellation=b"\x01" * 32,
                          seq=0, body=WORK, created=1)
    with pytest.raises(ValidationError, match="another constellation"):
        led.check(other, tc.now)
    assert led.state_hash() == before and led.next_seq(tc.member(1)) == 0


def test_same_records_same_order_same_hash_and_snapshot() -> None:
    a, b = TestConstellation(3), TestConstellation(3)
    for tc in (a, b):
        rid = tc.post(1, "contribution", WORK).record.id
        tc.post(2, "contribution", {"op": "ack", "target": rid})
        tc.post(0, "contribution", {"op": "dispute", "target": rid, "reason": "too much"})
    assert a.state_hash() == b.state_hash()
    assert list(a.ledger.entries()) == list(b.ledger.entries())
    c = TestConstellation(3, seed=b"another")
    assert c.state_hash() != a.state_hash()


# -- membership flows ---------------------------------------------------------------


def test_invite_and_join() -> None:
    tc = TestConstellation(2)
    inv = tc.invite(0, tier="contributor", roles=("customer",), uses=2)
    applied(tc, tc.join(5, inv, name="Eve"))
    m = member(tc, 5)
    assert (m["status"], m["tier"], m["roles"], m["name"]) == ("active", "contributor", ["customer"], "Eve")
    assert m["invited_by"] == tc.member(0).key
    applied(tc, tc.sign(5, "contribution", WORK))
    applied(tc, tc.join(6, inv))
    refused(tc, tc.join(7, inv), "no uses left")
    refused(tc, tc.join(5, tc.invite(0)), "already active")
    assert tc.member(5) not in [m for m, _ in tc.ledger.committee()]


def test_invite_expiry_is_checked_at_final_time() -> None:
    tc = TestConstellation(2)
    inv = tc.invite(0, expires=tc.now + 3 * STEP_MS)
    tc.now += 10 * STEP_MS
    refused(tc, tc.join(5, inv), "expired")


def test_unpublished_invites_work_and_count_uses() -> None:
    tc = TestConstellation(2)
    inv = tc.invite(0, publish=False)
    applied(tc, tc.join(5, inv))
    refused(tc, tc.join(6, inv), "no uses left")


def test_revoked_invites_stop_working() -> None:
    tc = TestConstellation(3)
    inv = tc.invite(1)
    refused(tc, tc.sign(2, "membership", {"op": "revoke", "invite": inv.id}), "only the inviter")
    applied(tc, tc.sign(1, "membership", {"op": "revoke", "invite": inv.id}))
    refused(tc, tc.join(5, inv), "revoked")
    refused(tc, tc.sign(0, "membership", {"op": "revoke", "invite": b"\x00" * 32}), "no published invite")


def test_invites_are_checked() -> None:
    tc = TestConstellation(3, tiers={2: "contributor"})
    inv = tc.invite(0, publish=False)
    refused(tc, tc.sign(1, "membership", {"op": "invite", "token": inv.raw()}), "only the inviter")
    contrib_inv = tc.invite(2, publish=False)
    refused(tc, tc.sign(2, "membership", {"op": "invite", "token": contrib_inv.raw()}), "core members")
    refused(tc, tc.join(5, contrib_inv), "core members")
    raw = bytearray(inv.raw())
    raw[-1] ^= 1
    refused(tc, tc.sign(5, "membership", {"op": "join", "token": bytes(raw)}), "signature")
    foreign = Invite.create(tc.identity(0), constellation=b"\x03" * 32, name="x", tier="core", roles=(),
                            uses=1, expires=tc.now + 10**6, addrs=(), nonce=b"\x00" * 16)
    refused(tc, tc.join(5, foreign), "another constellation")


def test_invite_reserved_by_policy() -> None:
    tc = TestConstellation(3, reserve={"membership.invite": ["facilitator"]})
    refused(tc, tc.sign(1, "membership", {"op": "invite", "token": tc.invite(1, publish=False).raw()}),
            "facilitator")
    applied(tc, tc.join(5, tc.invite(0)))


def test_approval_then_admission() -> None:
    tc = TestConstellation(3)
    inv = tc.invite(0, approve=True, tier="core", roles=("investor",))
    applied(tc, tc.join(5, inv))
    assert member(tc, 5)["status"] == "applicant"
    refused(tc, tc.sign(5, "contribution", WORK), "not an active member")
    assert tc.member(5) not in [m for m, _ in tc.ledger.committee()]
    refused(tc, tc.sign(0, "membership", {"op": "admit", "member": tc.member(1).key}), "only an applicant")
    applied(tc, tc.sign(1, "membership", {"op": "admit", "member": tc.member(5).key}))
    assert member(tc, 5)["status"] == "active"
    assert tc.member(5) in [m for m, _ in tc.ledger.committee()]
    applied(tc, tc.sign(5, "contribution", WORK))


def test_roles_weights_and_removal_are_reserved_to_facilitators() -> None:
    tc = TestConstellation(3)
    m2 = tc.member(2).key
    refused(tc, tc.sign(1, "membership", {"op": "roles", "member": m2, "roles": ["investor"]}), "facilitator")
    refused(tc, tc.sign(1, "membership", {"op": "weight", "member": m2, "weight": 3}), "facilitator")
    refused(tc, tc.sign(1, "membership", {"op": "remove", "member": m2, "reason": "x"}), "facilitator")
    refused(tc, tc.sign(1, "membership", {"op": "dissolve"}), "facilitator")
    applied(tc, tc.sign(0, "membership", {"op": "roles", "member": m2, "roles": ["investor", "customer"]}))
    assert member(tc, 2)["roles"] == ["customer", "investor"]
    applied(tc, tc.sign(0, "membership", {"op": "weight", "member": m2, "weight": 3}))
    assert dict(tc.ledger.committee())[tc.member(2)] == 3
    refused(tc, tc.sign(0, "membership", {"op": "roles", "member": b"\x04" * 32, "roles": []}), "not active")


def test_weights_are_for_core_members_only() -> None:
    tc = TestConstellation(2, tiers={1: "contributor"})
    refused(tc, tc.sign(0, "membership", {"op": "weight", "member": tc.member(1).key, "weight": 2}),
            "only core")


def test_custom_policy_reserves_a_plugin_op_to_a_role() -> None:
    tc = TestConstellation(3, roles={1: ["customer"]}, reserve={"contribution.record": ["producer"]})
    refused(tc, tc.sign(1, "contribution", WORK), "producer")
    applied(tc, tc.sign(2, "contribution", WORK))


def test_authorisation_follows_each_change_of_roles_and_policy_it_has_read_before() -> None:
    # The ledger keeps the member entries and policy it decoded for authorisation; every
    # change must still count from the next record on, as on a ledger that never read them.
    tc = TestConstellation(3, roles={1: ["customer"]}, reserve={"contribution.record": ["producer"]})
    m1 = tc.member(1).key
    refused(tc, tc.sign(1, "contribution", WORK), "producer")
    applied(tc, tc.sign(2, "contribution", WORK))
    applied(tc, tc.sign(0, "membership", {"op": "roles", "member": m1, "roles": ["producer"]}))
    applied(tc, tc.sign(1, "contribution", WORK))
    applied(tc, tc.sign(0, "membership", {"op": "roles", "member": m1, "roles": ["customer"]}))
    refused(tc, tc.sign(1, "contribution", WORK), "producer")
    assert tc.ledger.member_status(m1) == "active"
    applied(tc, tc.sign(1, "membership", {"op": "leave"}))
    refused(tc, tc.sign(1, "contribution", WORK), "not an active member")
    assert tc.ledger.member_status(m1) == member(tc, 1)["status"] == "left"
    assert tc.ledger.member_status(tc.member(7).key) is None  # an outsider
    replay = tc.fresh_ledger()
    for n, rec in enumerate(tc.log[1:]):
        replay.apply(rec, tc.log[0].created + (n + 1) * STEP_MS)
    assert replay.state_hash() == tc.state_hash()


def test_the_ledgers_decoded_entries_are_bounded_and_change_no_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    unbounded = TestConstellation(4)
    records = [unbounded.sign(i % 4, "contribution", WORK) for i in range(12)]
    want = [unbounded.apply(r).status for r in records]
    monkeypatch.setattr(ledger_module, "MAX_DECODED", 2)
    small = TestConstellation(4)
    for rec, status in zip(records, want, strict=True):
        assert small.apply(rec).status == status == "applied"
        assert len(small.ledger._decoded) <= 2
    assert small.state_hash() == unbounded.state_hash()


def test_leave_and_rejoin() -> None:
    tc = TestConstellation(3)
    applied(tc, tc.sign(2, "membership", {"op": "leave", "reason": "moving"}))
    assert member(tc, 2)["status"] == "left"
    refused(tc, tc.sign(2, "contribution", WORK), "not an active member")
    refused(tc, tc.sign(2, "membership", {"op": "leave"}), "not an active member")
    applied(tc, tc.join(2, tc.invite(0)))
    assert member(tc, 2)["status"] == "active"


def test_removed_members_cannot_post_or_rejoin() -> None:
    tc = TestConstellation(3)
    refused(tc, tc.sign(0, "membership", {"op": "remove", "member": tc.member(0).key, "reason": "x"}),
            "cannot remove themselves")
    applied(tc, tc.sign(0, "membership", {"op": "remove", "member": tc.member(1).key, "reason": "spam"}))
    assert member(tc, 1)["status"] == "removed" and member(tc, 1)["reason"] == "spam"
    refused(tc, tc.sign(1, "contribution", WORK), "not an active member")
    refused(tc, tc.join(1, tc.invite(0)), "already removed")
    refused(tc, tc.sign(0, "membership", {"op": "remove", "member": tc.member(1).key, "reason": "x"}),
            "not active")


def test_the_last_core_member_cannot_leave_or_be_removed() -> None:
    solo = TestConstellation(1)
    refused(solo, solo.sign(0, "membership", {"op": "leave"}), "last core member")
    tc = TestConstellation(2, tiers={1: "contributor"}, roles={1: ["facilitator"]})
    refused(tc, tc.sign(0, "membership", {"op": "leave"}), "last core member")
    refused(tc, tc.sign(1, "membership", {"op": "remove", "member": tc.member(0).key, "reason": "x"}),
            "last core member")
    applied(tc, tc.sign(1, "membership", {"op": "leave"}))


def test_dissolution_blocks_everything_after() -> None:
    tc = TestConstellation(3)
    applied(tc, tc.sign(0, "membership", {"op": "dissolve", "reason": "done"}))
    assert tc.ledger.dissolved
    for who, body in [(0, WORK), (1, WORK)]:
        refused(tc, tc.sign(who, "contribution", body), "dissolved")
    refused(tc, tc.sign(0, "membership", {"op": "dissolve"}), "dissolved")
    refused(tc, tc.join(5, tc.invite(0, publish=False)), "dissolved")


# -- contribution flows -------------------------------------------------------------


def contribution(tc: TestConstellation, rid: bytes) -> dict[str, Any]:
    c = tc.ledger.reader.read("contribution", f"c/{rid.hex()}")
    assert isinstance(c, dict)
    return c


def test_record_ack_dispute_amend() -> None:
    tc = TestConstellation(3)
    rid = applied(tc, tc.sign(1, "contribution", {**WORK, "note": "design",
                                                  "evidence": {"uri": "https://x", "hash": b"\x01" * 32},
                                                  "period": {"start": 1, "end": 2}})).record.id
    c = contribution(tc, rid)
    assert (c["poster"], c["provider"], c["quantity"], c["payback"]) == (tc.member(1).key,) * 2 + ("2", "once")
    applied(tc, tc.sign(2, "contribution", {"op": "ack", "target": rid}))
    refused(tc, tc.sign(2, "contribution", {"op": "ack", "target": rid}), "already acknowledged")
    refused(tc, tc.sign(1, "contribution", {"op": "ack", "target": rid}), "their own")
    refused(tc, tc.sign(1, "contribution", {"op": "dispute", "target": rid, "reason": "x"}), "their own")
    applied(tc, tc.sign(0, "contribution", {"op": "dispute", "target": rid, "reason": "only 1 hour"}))
    refused(tc, tc.sign(0, "contribution", {"op": "dispute", "target": rid, "reason": "again"}),
            "already disputed")
    assert contribution(tc, rid)["disputes"] == [[tc.member(0).key, "only 1 hour"]]
    applied(tc, tc.sign(0, "contribution", {"op": "ack", "target": rid}))
    c = contribution(tc, rid)
    assert c["disputes"] == [] and c["acks"] == sorted([tc.member(0).key, tc.member(2).key])
    refused(tc, tc.sign(2, "contribution", {"op": "amend", "target": rid, "quantity": "1"}), "only the member")
    refused(tc, tc.sign(1, "contribution", {"op": "amend", "target": rid}), "must change")
    refused(tc, tc.sign(1, "contribution", {"op": "amend", "target": rid, "unit": " "}), "needs a unit")
    applied(tc, tc.sign(1, "contribution", {"op": "amend", "target": rid, "quantity": "1"}))
    c = contribution(tc, rid)
    assert (c["quantity"], c["amended"], c["acks"]) == ("1", 1, [])
    refused(tc, tc.sign(2, "contribution", {"op": "ack", "target": b"\x00" * 32}), "no final contribution")


def test_a_contribution_posted_for_another_provider() -> None:
    tc = TestConstellation(3)
    rid = applied(tc, tc.sign(0, "contribution", {**WORK, "provider": tc.member(1).key})).record.id
    refused(tc, tc.sign(1, "contribution", {"op": "ack", "target": rid}), "their own")
    refused(tc, tc.sign(0, "contribution", {"op": "ack", "target": rid}), "their own")
    applied(tc, tc.sign(2, "contribution", {"op": "ack", "target": rid}))
    refused(tc, tc.sign(0, "contribution", {**WORK, "provider": b"\x06" * 32}), "not an active member")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"quantity": "1000000001"}, "not plausible"),
        ({"quantity": "0"}, "greater than zero"),
        ({"quantity": "0.000000"}, "greater than zero"),
        ({"unit": "  "}, "needs a unit"),
        ({"period": {"start": 5, "end": 4}}, "end before"),
    ],
)
def test_implausible_contributions_are_refused(change: dict[str, Any], fragment: str) -> None:
    tc = TestConstellation(2)
    refused(tc, tc.sign(1, "contribution", {**WORK, **change}), fragment)


# -- broken plugins never corrupt the ledger ----------------------------------------


class _Broken(Plugin):
    name = "broken"
    version = Version(1, 0)
    ops = {"go": {"how": text(16)}}

    def apply(self, ctx: ApplyContext, record: Record) -> None:
        ctx.put("x", 1)
        how = record.body["how"]
        if how == "raise":
            raise RuntimeError("boom")
        if how == "sneak":
            ctx._data["membership/dissolved"] = b"\xf5"  # type: ignore[index]
        if how == "recurse":
            self.apply(ctx, record)


class _BadSchema(Plugin):
    name = "badschema"
    version = Version(1, 0)
    ops = {"go": {"n": Field("int")}}

    def check_body(self, body: Any) -> str:
        return str(body["missing"])


@pytest.mark.parametrize("how", ["raise", "sneak", "recurse"])
def test_a_crashing_plugin_rejects_its_record_and_changes_nothing(how: str) -> None:
    tc = TestConstellation(2, plugins=[_Broken()])
    refused(tc, tc.sign(1, "broken", {"op": "go", "how": how}), "failed on this record")
    assert not tc.ledger.dissolved
    applied(tc, tc.sign(1, "broken", {"op": "go", "how": "fine"}))


def test_a_plugin_whose_schema_check_crashes_cannot_break_apply() -> None:
    tc = TestConstellation(2, plugins=[_BadSchema()])
    refused(tc, tc.sign(1, "badschema", {"op": "go", "n": 1}), "KeyError")
    applied(tc, tc.sign(1, "contribution", WORK))


# -- properties ---------------------------------------------------------------------

ACTIONS = st.sampled_from(["record", "ack", "dispute", "amend", "bad", "leave", "outsider", "gap", "huge"])


def _script_step(tc: TestConstellation, who: int, action: str, q: int, targets: list[bytes]) -> Record:
    target = targets[q % len(targets)] if targets else hashlib.blake2b(b"none", digest_size=32).digest()
    if action == "record":
        return tc.sign(who, "contribution", {**WORK, "quantity": str(q)})
    if action == "ack":
        return tc.sign(who, "contribution", {"op": "ack", "target": target})
    if action == "dispute":
        return tc.sign(who, "contribution", {"op": "dispute", "target": target, "reason": "r"})
    if action == "amend":
        return tc.sign(who, "contribution", {"op": "amend", "target": target, "note": str(q)})
    if action == "leave":
        return tc.sign(who, "membership", {"op": "leave"})
    if action == "outsider":
        return tc.sign(10 + who, "contribution", WORK)
    if action == "gap":
        return tc.sign(who, "contribution", WORK, seq=tc.ledger.next_seq(tc.member(who)) + 1 + q % 3)
    if action == "huge":
        return tc.sign(who, "contribution", {**WORK, "note": "x" * 1500})
    return tc.sign(who, "contribution", {"op": "record", "action": "work"})


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), ACTIONS, st.integers(0, 50)), min_size=1, max_size=25))
def test_random_scripts_give_equal_hashes_and_refusals_change_nothing(
    script: list[tuple[int, str, int]],
) -> None:
    a, b = TestConstellation(4), TestConstellation(4)
    targets: list[bytes] = []
    records: list[Record] = []
    for who, action, q in script:
        rec = _script_step(a, who, action, q, targets)
        rec_b = _script_step(b, who, action, q, targets)
        assert rec.raw == rec_b.raw
        records.append(rec)
        before = a.state_hash()
        outs = a.apply_all(rec)
        assert [o.status for o in outs] == [o.status for o in b.apply_all(rec_b)]
        if not any(o.applied for o in outs):
            assert a.state_hash() == before
        if outs[0].applied and action == "record":
            targets.append(rec.id)
        assert a.state_hash() == b.state_hash()
    # A third ledger fed the same records in the same order agrees as well.
    replay = a.fresh_ledger()
    for n, rec in enumerate(records):
        replay.apply(rec, a.log[0].created + (n + 1) * STEP_MS)
    assert replay.state_hash() == a.state_hash()
