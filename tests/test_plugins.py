"""Tests of the plugin API: declarative fields, versions, the registry's
refusals, loading plugins from entry points, and serving plugin routes.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

import pytest

from valuemesh.plugin import (
    ENTRY_POINT_GROUP,
    PLUGIN_API_VERSION,
    ConstellationView,
    DecodeError,
    Field,
    Json,
    LocalError,
    Plugin,
    PluginError,
    Route,
    RouteRequest,
    TestConstellation,
    ValidationError,
    Version,
    integer,
    text,
)
from valuemesh.protocol.builtin import builtin_registry, contribution, membership
from valuemesh.protocol.plugins import Registry, load_entry_points
from valuemesh.protocol.records import constellation_text


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
    with pytest.raises(PluginError, match=f"plugin API {PLUGIN_API_VERSION + 1}; this valuemesh supports"):
        reg.register(type("Future", (Plugin,), {"name": "future", "api_version": PLUGIN_API_VERSION + 1})())
    # API 2 changed what api_routes() returns, so a plugin written for API 1 is refused by name.
    with pytest.raises(PluginError, match="'old' targets plugin API 1; this valuemesh supports 2"):
        reg.register(type("Old", (Plugin,), {"name": "old", "api_version": 1})())
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


# -- read-only routes (plugin API 2) -----------------------------------------------------------


def test_route_paths_are_checked() -> None:
    for good in ["", "/items", "/items/{n}", "/a.b/{x_1}/c-d"]:
        assert Route(good, lambda r: None).path == good
    for bad in ["/", "items", "/items/", "/{N}", "/a b", "/{cid}", "//x"]:
        with pytest.raises(PluginError):
            Route(bad, lambda r: None)
    with pytest.raises(PluginError, match="not callable"):
        Route("", "nope")  # type: ignore[arg-type]


def test_a_constellation_view_shows_the_final_state_read_only() -> None:
    tc = TestConstellation(3, plugins=[Notes()])
    view = ConstellationView.of(tc.ledger)
    assert view.id == constellation_text(tc.ledger.constellation) and view.name == tc.ledger.reader.read(
        "membership", "meta")["name"]
    assert view.members == tuple(sorted((tc.member(i) for i in range(3)), key=lambda m: m.key))
    assert view.plugins["notes"] == Version(2, 3) and view.state_hash == tc.state_hash()
    assert not hasattr(view.state, "put") and not hasattr(view, "ledger")
    with pytest.raises(TypeError):
        view.plugins["x"] = Version(1, 0)  # type: ignore[index]


def _item(request: RouteRequest) -> Json:
    """One note, by number."""
    n = request.params["n"]
    if n == "gone":
        raise ValidationError("There is no such note.")
    if n == "bug":
        raise KeyError("bug")
    c = request.constellation
    return {"constellation": c.id, "n": n, "query": dict(request.query), "hash": c.state_hash.hex(),
            "members": [str(m) for m in c.members]}


class Routed(Plugin):
    name = "routed"
    ops = {"add": {"text": text(10)}}

    def api_routes(self) -> list[Route]:
        return [Route("/items/{n}", _item), Route("", lambda r: {"ok": True})]


class _Plugin(Plugin):
    ops = {"add": {"text": text(10)}}


def _bad_plugins() -> list[Plugin]:
    def raising(self: Plugin) -> list[Route]:
        raise RuntimeError("routes exploded")

    return [type("Raises", (_Plugin,), {"name": "raises", "api_routes": raising})(),
            type("Raw", (_Plugin,), {"name": "raw", "api_routes": lambda self: [("GET", "/x", print)]})(),
            type("Twice", (_Plugin,), {"name": "twice", "api_routes": lambda self: [
                Route("/x", lambda r: 1), Route("/x", lambda r: 2)]})()]


async def test_the_daemon_serves_plugin_routes_over_a_constellation_view(caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from aiohttp.test_utils import TestClient, TestServer

    from valuemesh.node.api import make_app

    with_it = TestConstellation(2, plugins=[Routed()])
    without = TestConstellation(2)
    ledgers = {ConstellationView.of(tc.ledger).id: tc.ledger for tc in (with_it, without)}

    def engine_for(cid: str) -> SimpleNamespace:
        if cid not in ledgers:
            raise LocalError(f"This node does not follow constellation {cid}.")
        return SimpleNamespace(ledger=ledgers[cid])

    reg = builtin_registry()
    for p in [Routed(), *_bad_plugins()]:
        reg.register(p)
    node: Any = SimpleNamespace(registry=reg, engine_for=engine_for)
    cid, other = ConstellationView.of(with_it.ledger).id, ConstellationView.of(without.ledger).id
    async with TestClient(TestServer(make_app(node, "tok"))) as client:
        auth = {"Authorization": "Bearer tok"}

        async def get(path: str) -> tuple[int, Any]:
            resp = await client.get(path, headers=auth)
            return resp.status, await resp.json()

        status, doc = await get(f"/plugins/routed/{cid}/items/7?q=a&q=b")
        assert status == 200
        assert doc == {"constellation": cid, "n": "7", "query": {"q": "a"}, "hash": with_it.state_hash().hex(),
                       "members": [str(m) for m in ConstellationView.of(with_it.ledger).members]}
        assert await get(f"/plugins/routed/{cid}") == (200, {"ok": True})
        assert await get(f"/plugins/routed/{cid}/items/gone") == (422, {"error": "There is no such note."})
        assert await get(f"/plugins/routed/{cid}/items/bug") == (
            500, {"error": "Plugin 'routed' failed in its route (KeyError: 'bug')."})
        assert await get(f"/plugins/routed/{other}") == (
            400, {"error": "This constellation does not use the routed plugin."})
        assert (await get("/plugins/routed/vc1nothing"))[0] == 400
        assert (await client.get(f"/plugins/routed/{cid}")).status == 401  # behind the token like every route
        for name in ("raises", "raw", "twice"):  # left out whole, the daemon serves on
            assert (await client.get(f"/plugins/{name}/{cid}/x", headers=auth)).status == 404
        paths = (await get("/v1/openapi.json"))[1]["paths"]
        assert paths["/plugins/routed/{cid}/items/{n}"]["get"]["summary"] == "One note, by number."
    logged = caplog.text
    assert "routes exploded" in logged and "not a list of valuemesh Routes" in logged and "twice" in logged
