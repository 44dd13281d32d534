"""Tests of the plugin conformance kit: the built-in plugins pass it, and each
kind of broken plugin is caught with a clear message and never corrupts a ledger.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from typing import Any

import pytest

from valuemesh.protocol.builtin import builtin_registry, contribution, membership
from valuemesh.protocol.errors import DecodeError
from valuemesh.protocol.ledger import ApplyContext
from valuemesh.protocol.plugins import Field, Plugin, Registry, Version, integer, text
from valuemesh.protocol.records import Record
from valuemesh.protocol.testing import Report, TestConstellation, check_plugin, malformed_bodies


class Tally(Plugin):
    """A small, correct third-party plugin: members count things."""

    name = "tally"
    version = Version(1, 2)
    ops = {
        "add": {"what": text(16, choices=("apples", "pears")), "n": integer(1, 100),
                "tags": Field("list", item=text(8), max=3, required=False),
                "meta": Field("map", required=False, fields={"why": text(20), "ok": Field("bool")})},
        "reset": {},
    }

    def validate(self, ctx: ApplyContext, record: Record) -> None:
        if ctx.op == "reset" and not ctx.get("total"):
            from valuemesh.protocol.errors import ValidationError

            raise ValidationError("There is nothing to reset.")

    def apply(self, ctx: ApplyContext, record: Record) -> None:
        if ctx.op == "reset":
            ctx.put("total", 0)
            return
        ctx.put("total", (ctx.get("total") or 0) + record.body["n"])
        key = f"by/{record.author.key.hex()}/{record.body['what']}"
        ctx.put(key, (ctx.get(key) or 0) + record.body["n"])

    def views(self) -> dict[str, Any]:
        return {"total": lambda state: state.read(self.name, "total") or 0}

    def examples(self) -> list[dict[str, Any]]:
        return [
            {"op": "add", "what": "apples", "n": 3, "tags": ["red"], "meta": {"why": "harvest", "ok": True}},
            {"op": "add", "what": "pears", "n": 1},
            {"op": "reset"},
        ]


def test_builtin_plugins_pass() -> None:
    for plugin in (membership.PLUGIN, contribution.PLUGIN):
        report = check_plugin(plugin)
        assert isinstance(report, Report) and report.plugin == plugin.name
        assert "registers" in report.checks
        assert any("deterministic" in c for c in report.checks)
        assert any("malformed variants refused" in c for c in report.checks)
        assert str(report).endswith("checks passed")


def test_a_third_party_plugin_passes_and_reports_every_check() -> None:
    report = check_plugin(Tally())
    assert len(report.checks) == 1 + 3 * 3 + 4
    assert "(ops without an example" not in " ".join(report.checks)


def test_a_custom_registry_factory_and_examples() -> None:
    def factory() -> Registry:
        reg = Registry()
        reg.register(membership.PLUGIN)
        return reg

    report = check_plugin(Tally(), registry_factory=factory, examples=[{"op": "add", "what": "pears", "n": 2}])
    assert any("ops without an example, so unchecked: reset" in c for c in report.checks)


def test_malformed_bodies_cover_the_schema() -> None:
    body = Tally().examples()[0]
    variants = dict(malformed_bodies(Tally(), body))
    for fragment in ["required field 'what' dropped", "required field 'n' dropped", "unknown field",
                     "field 'what' as text that is not one of the choices", "field 'n' as an integer below",
                     "field 'n' as an integer above", "field 'n' as a boolean", "field 'tags' as a list with too many",
                     "field 'meta' as a nested map with the required field 'why' dropped",
                     "field 'meta' as a nested map with field 'ok' as an integer", "unknown op", "no op at all"]:
        assert any(fragment in why for why in variants), fragment
    for bad in variants.values():
        with pytest.raises(DecodeError):
            Tally().check_body(bad)


# -- broken plugins ------------------------------------------------------------------


class RaisesInApply(Tally):
    def apply(self, ctx: ApplyContext, record: Record) -> None:
        ctx.put("total", 1)
        raise RuntimeError("bug")


_counter = itertools.count()


class CounterInApply(Tally):
    def apply(self, ctx: ApplyContext, record: Record) -> None:
        ctx.put("total", next(_counter))


class RandomInApply(Tally):
    def apply(self, ctx: ApplyContext, record: Record) -> None:
        ctx.put("total", random.random() < 2)  # True, but also draws
        ctx.put("noise", random.getrandbits(32))


class OrderDependent(Tally):
    def apply(self, ctx: ApplyContext, record: Record) -> None:
        ctx.put("first", next(iter(record.body)))


class LaxSchema(Tally):
    def check_body(self, body: Any) -> str:
        op = body.get("op") if isinstance(body, dict) else None
        if op not in self.ops:
            raise DecodeError("A 'tally' record needs 'op'.")
        return str(op)


class CrashingSchema(Tally):
    def check_body(self, body: Any) -> str:
        body["op"]  # KeyError when there is no op
        return super().check_body(body)


class Stateful(Tally):
    def apply(self, ctx: ApplyContext, record: Record) -> None:
        super().apply(ctx, record)
        self.__dict__.setdefault("seen", []).append(record.id)


class MutatesBody(Tally):
    def apply(self, ctx: ApplyContext, record: Record) -> None:
        super().apply(ctx, record)
        record.body["n"] = 0  # type: ignore[index]


class SneakyWriter(Tally):
    def apply(self, ctx: ApplyContext, record: Record) -> None:
        ctx._data["membership/dissolved"] = b"\xf5"  # type: ignore[index]


class NoExamples(Tally):
    def examples(self) -> list[dict[str, Any]]:
        return []


class BadExample(Tally):
    def examples(self) -> list[dict[str, Any]]:
        return [{"op": "add", "what": "plums", "n": 1}]


class BrokenView(Tally):
    def views(self) -> dict[str, Any]:
        return {"boom": lambda state: 1 / 0}


@pytest.mark.parametrize(
    ("plugin", "fragment"),
    [
        (RaisesInApply(), "none of its examples applies"),
        (CounterInApply(), "different results on two ledgers"),
        (RandomInApply(), "different results on two ledgers"),
        (OrderDependent(), "different results on two ledgers"),
        (LaxSchema(), "was accepted by check_body"),
        (CrashingSchema(), "raised KeyError instead of DecodeError or ValidationError"),
        (Stateful(), "changed the plugin object's attributes"),
        (MutatesBody(), "changed the record's body"),
        (SneakyWriter(), "none of its examples applies"),
        (NoExamples(), "gives no example bodies"),
        (BadExample(), "is refused by its own schema"),
        (BrokenView(), "view 'boom' raised ZeroDivisionError"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Plugin) else "",
)
def test_broken_plugins_are_caught(plugin: Plugin, fragment: str) -> None:
    with pytest.raises(AssertionError) as exc:
        check_plugin(plugin)
    assert fragment in str(exc.value)
    assert str(exc.value).startswith("Plugin 'tally'")


@pytest.mark.parametrize(
    ("plugin", "body"),
    [
        (RaisesInApply(), {"op": "add", "what": "apples", "n": 1}),
        (SneakyWriter(), {"op": "add", "what": "apples", "n": 1}),
        (CrashingSchema(), {"what": "apples", "n": 1}),
    ],
    ids=["raises", "sneaks", "schema-crashes"],
)
def test_broken_plugins_never_corrupt_a_ledger(plugin: Plugin, body: dict[str, Any]) -> None:
    tc = TestConstellation(2, plugins=[plugin])
    before = tc.state_hash()
    out = tc.post(1, "tally", body)
    assert out.status == "rejected" and "failed on this record" in out.reason
    assert tc.state_hash() == before and not tc.ledger.dissolved
    assert tc.post(1, "contribution", {"op": "record", "action": "work", "quantity": "1", "unit": "h"}).applied


def test_not_a_plugin_is_refused() -> None:
    with pytest.raises(AssertionError, match="not a valuemesh Plugin"):
        check_plugin(object())  # type: ignore[arg-type]


# -- test constellations ---------------------------------------------------------------


def test_test_constellations_are_reproducible() -> None:
    a = TestConstellation(4, roles={2: ["investor", "customer"]}, tiers=["core", "core", "contributor"])
    b = TestConstellation(4, roles={2: ["investor", "customer"]}, tiers=["core", "core", "contributor"])
    assert a.genesis.raw == b.genesis.raw and a.state_hash() == b.state_hash()
    assert a.ledger.reader.member(a.member(2).key)["roles"] == ["customer", "investor"]  # type: ignore[index]
    assert a.ledger.reader.member(a.member(2).key)["tier"] == "contributor"  # type: ignore[index]
    assert a.ledger.reader.member(a.member(3).key)["tier"] == "core"  # type: ignore[index]
    assert a.ledger.reader.member(a.member(9).key) is None
    assert a.identity(9).member == b.identity(9).member != a.member(0)
    r1 = a.sign(1, "tally", {"op": "reset"})
    r2 = a.sign(1, "tally", {"op": "reset"})
    assert (r1.seq, r2.seq, r1.v) == (0, 1, 1)
    assert a.sign(a.identity(1), "x", {}, seq=7).seq == 7
    assert a.sign(1, "x", {}).seq == 8
    assert TestConstellation(2, seed=b"other").constellation != a.constellation


def test_test_constellation_registry_replaces_a_same_named_plugin() -> None:
    class MyContribution(contribution.Contribution):
        pass

    mine = MyContribution()
    tc = TestConstellation(1, plugins=[mine])
    assert tc.registry.get("contribution") is mine
    assert builtin_registry().get("contribution") is contribution.PLUGIN


_SCRIPT = """
from valuemesh.protocol.testing import TestConstellation
tc = TestConstellation(4, roles={3: ["customer"]})
work = {"op": "record", "action": "work", "quantity": "2", "unit": "hour"}
rid = tc.post(1, "contribution", work).record.id
out = [
    tc.post(2, "contribution", {"op": "ack", "target": rid}),
    tc.post(3, "contribution", {"op": "dispute", "target": rid, "reason": "no"}),
    tc.post(2, "contribution", {**work, "zz": 1, "aa": 2, "mm": 3}),
    tc.post(0, "membership", {"op": "roles", "member": tc.member(3).key, "roles": ["investor", "producer"]}),
    tc.apply(tc.join(9, tc.invite(0, roles=("customer", "investor")))),
]
print(tc.state_hash().hex(), "|".join(o.status + ":" + o.reason for o in out))
"""


def test_same_results_under_different_hash_seeds() -> None:
    """Hash randomisation (set and str-hash order) must not reach the state or the outcomes."""
    results = set()
    for seed in ("0", "1", "12345"):
        proc = subprocess.run([sys.executable, "-c", _SCRIPT], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        results.add(proc.stdout.strip())
    assert len(results) == 1
    line = results.pop()
    assert "unknown field 'aa'" in line and line.count("applied:") == 4
