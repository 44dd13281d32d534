"""Tests of the plugin API: declarative fields, versions, the registry's
refusals, and loading plugins from entry points.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

import pytest

from valuemesh.protocol.builtin import builtin_registry, contribution, membership
from valuemesh.protocol.errors import DecodeError, PluginError, ValidationError
from valuemesh.protocol.plugins import (
    ENTRY_POINT_GROUP,
    PLUGIN_API_VERSION,
    Field,
    Plugin,
    Registry,
    Version,
    integer,
    load_entry_points,
    text,
)
from valuemesh.protocol.testing import TestConstellation


class Notes(Plugin):
    name = "notes"
    version = Version(2, 3)
    distribution = "notes-dist"
    ops = {"add": {"text": text(10), "n": integer(0, 5, required=False)}}


@pytest.mark.parametrize(
    ("spec", "good", "bad"),
    [
        (text(3), ["", "abc", "äöü"], [None, 1, b"a", "abcd"]),
        (text(8, choices=("a", "b")), ["a", "b"], ["c", "", 1]),
        (integer(-2, 2), [-2, 0, 2], [-3, 3, True, "1", 1.0]),
        (integer(), [-(2**63), 2**63], [False, None]),
        (Field("bytes", max_len=2), [b"", b"ab"], [b"abc", "ab", bytearray(b"a")]),
        (Field("hash"), [b"\x00" * 32], [b"\x00" * 31, b"\x00" * 33, "x" * 32]),
        (Field("member"), [b"\x01" * 32], [b"", None]),
        (Field("bool"), [True, False], [0, 1, "true", None]),
        (Field("decimal"), ["0", "12.5", "999999999999999.123456", "1.0"],
         ["", "-1", "1e3", "01", ".5", "1.", "1.1234567", "1" * 16, 1, "\u0661", "1\n", "1.5\n"]),
        (Field("list", item=integer(0), max=2), [[], [1, 2]], [[1, 2, 3], [-1], (1,), {}]),
        (Field("list", item=text(1)), [["a"] * 64], [["a"] * 65]),
        (Field("map", fields={"a": integer(), "b": text(required=False)}), [{"a": 1}, {"a": 1, "b": ""}],
         [{}, {"b": "x"}, {"a": 1, "c": 2}, [("a", 1)], {"a": "1"}]),
    ],
)
def test_field_checks(spec: Field, good: list[Any], bad: list[Any]) -> None:
    for v in good:
        spec.check("f", v)
    for v in bad:
        with pytest.raises(DecodeError) as exc:
            spec.check("f", v)
        msg = str(exc.value)
        assert msg.endswith(".") and "\n" not in msg


@pytest.mark.parametrize(
    "kwargs",
    [{"kind": "float"}, {"kind": "list"}, {"kind": "map"}],
)
def test_bad_field_declarations_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(PluginError):
        Field(**kwargs)


def test_check_body_messages() -> None:
    p = Notes()
    assert p.check_body({"op": "add", "text": "hi"}) == "add"
    with pytest.raises(DecodeError, match="needs 'op', one of: add"):
        p.check_body({"text": "hi"})
    with pytest.raises(DecodeError, match="lacks the required field 'text'"):
        p.check_body({"op": "add"})
    with pytest.raises(DecodeError, match="unknown field 'zzz'"):
        p.check_body({"op": "add", "text": "hi", "zzz": 1})
    with pytest.raises(DecodeError, match="at most 5"):
        p.check_body({"op": "add", "text": "hi", "n": 6})
    with pytest.raises(DecodeError):
        p.check_body([("op", "add")])  # type: ignore[arg-type]


def test_versions() -> None:
    v = Version.parse(" 1.2 ")
    assert (v.major, v.minor, str(v)) == (1, 2, "1.2")
    assert v.satisfies(Version(1, 0)) and v.satisfies(Version(1, 2))
    assert not v.satisfies(Version(1, 3)) and not v.satisfies(Version(2, 0))
    for bad in ["1", "1.2.3", "v1.0", "", "a.b", "12345.0", "\u0661.0"]:
        with pytest.raises(PluginError, match="not a plugin version"):
            Version.parse(bad)


def test_registry_refuses_collisions_and_bad_plugins() -> None:
    reg = Registry()
    n = Notes()
    reg.register(n)
    reg.register(n)  # the same object twice is harmless
    with pytest.raises(PluginError, match=r"Two plugins are named 'notes' \(notes-dist 2.3 and other 2.3\)"):
        reg.register(type("Other", (Notes,), {"distribution": "other"})())
    for name in ["", "Notes", "9lives", "a-b", "x" * 33, "notes\n"]:
        with pytest.raises(PluginError, match="lowercase"):
            reg.register(type("P", (Plugin,), {"name": name})())
    with pytest.raises(PluginError, match="plugin API 2"):
        reg.register(type("Future", (Plugin,), {"name": "future", "api_version": PLUGIN_API_VERSION + 1})())
    with pytest.raises(PluginError, match="must not declare a field named 'op'"):
        reg.register(type("OpField", (Plugin,), {"name": "opfield", "ops": {"x": {"op": text()}}})())
    assert reg.names() == ["notes"]


def test_registry_get_require_and_check() -> None:
    reg = builtin_registry()
    reg.register(Notes())
    assert reg.get("notes").name == "notes"
    with pytest.raises(PluginError, match="No plugin 'nope' is installed"):
        reg.get("nope")
    reg.require({"notes": Version(2, 1), "membership": Version(1, 0)})
    with pytest.raises(PluginError, match=r"'notes' 2\.4, but 2\.3 is installed"):
        reg.require({"notes": Version(2, 4)})
    with pytest.raises(PluginError, match=r"'notes' 3\.0, but 2\.3"):
        reg.require({"notes": Version(3, 0)})
    with pytest.raises(PluginError, match=r"'revenue' 1\.0, which is not installed"):
        reg.require({"revenue": Version(1, 0)})

    tc = TestConstellation(1, plugins=[Notes()])
    good = tc.sign(0, "notes", {"op": "add", "text": "x"})
    assert reg.check(good)[1] == "add"
    with pytest.raises(ValidationError, match="version 1 cannot be read"):
        reg.check(tc.sign(0, "notes", {"op": "add", "text": "x"}, v=1))
    with pytest.raises(ValidationError, match="No plugin interprets"):
        reg.check(tc.sign(0, "nothing", {"op": "add"}))


@dataclass
class FakeEntryPoint:
    name: str
    obj: Any

    def load(self) -> Any:
        if isinstance(self.obj, Exception):
            raise self.obj
        return self.obj


def test_load_entry_points() -> None:
    reg = load_entry_points([FakeEntryPoint("notes", Notes), FakeEntryPoint("membership", membership.PLUGIN)])
    assert reg.names() == ["membership", "notes"]
    with pytest.raises(PluginError, match="failed to load: no module"):
        load_entry_points([FakeEntryPoint("x", ImportError("no module"))])
    with pytest.raises(PluginError, match="does not name a valuemesh Plugin"):
        load_entry_points([FakeEntryPoint("x", object())])
    with pytest.raises(PluginError, match="names plugin 'notes'"):
        load_entry_points([FakeEntryPoint("other", Notes())])
    with pytest.raises(PluginError, match="Two plugins"):
        load_entry_points([FakeEntryPoint("notes", Notes)], registry=reg)


def test_installed_entry_points_provide_the_builtins() -> None:
    reg = load_entry_points(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    assert {"membership", "contribution"} <= set(reg.names())
    assert reg.get("membership") is membership.PLUGIN
    assert reg.get("contribution") is contribution.PLUGIN
