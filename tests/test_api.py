"""The local API: token guard, bounded bodies, one-sentence errors, and an
OpenAPI document that names every route the daemon serves."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from valuemesh.node.api import make_app
from valuemesh.node.daemon import installed_registry
from valuemesh.node.engine import Engine
from valuemesh.node.home import Home
from valuemesh.node.store import Store
from valuemesh.node.testing import Daemon, free_port
from valuemesh.protocol.errors import LocalError, NotFoundError
from valuemesh.protocol.plugins import Registry
from valuemesh.protocol.records import constellation_text


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = Daemon("api", tmp_path_factory.mktemp("api") / "home", free_port(), "valuemesh-test")
    d.start()
    try:
        yield d
    finally:
        d.stop()


def _call(node: Daemon, method: str, path: str, body: bytes | None = None, token: str | None = "ok",
          ) -> tuple[int, dict]:
    home = Home(node.home)
    host, port = home.api_address()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {home.api_token() if token == 'ok' else token}"
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_token_is_required(node: Daemon) -> None:
    assert _call(node, "GET", "/v1/health", token=None)[0] == 200
    for token in (None, "wrong"):
        status, doc = _call(node, "GET", "/v1/status", token=token)
        assert status == 401 and "token" in doc["error"]
    assert (node.home / "api.token").stat().st_mode & 0o777 == 0o600


def test_bad_requests_change_nothing(node: Daemon) -> None:
    before = _call(node, "GET", "/v1/constellations")[1]
    cases = [
        (b"{not json", 400), (b"[1,2]", 400), (b'{"name": 5}', 400), (b'{"name": "  "}', 400),
        (b'{"name": "' + b"x" * 1_200_000 + b'"}', 413),
    ]
    for body, want in cases:
        status, doc = _call(node, "POST", "/v1/constellations", body)
        assert status == want, (body[:20], doc)
        assert doc["error"].endswith(".") and "\n" not in doc["error"]
    assert _call(node, "GET", "/v1/constellations")[1] == before


def test_records_route_validates_type_and_body(node: Daemon) -> None:
    cid = _call(node, "POST", "/v1/constellations", b'{"name": "api"}')[1]["id"]
    ledger_before = _call(node, "GET", f"/v1/constellations/{cid}/ledger")[1]
    bad = [
        {"type": "nope", "body": {"op": "record"}},
        {"type": "contribution", "body": {"op": "record", "action": "work", "quantity": 1.5, "unit": "h"}},
        {"type": "contribution", "body": {"op": "record", "action": "work", "quantity": "1", "unit": "h", "x": 1}},
        {"type": "contribution", "body": {"op": "ack", "target": "zz"}},
        {"type": "membership", "body": {"op": "remove", "member": "vm1notamember", "reason": "r"}},
        {"type": "contribution", "body": "record"},
    ]
    for doc in bad:
        status, out = _call(node, "POST", f"/v1/constellations/{cid}/records", json.dumps(doc).encode())
        assert status == 400, (doc, out)
    assert _call(node, "GET", f"/v1/constellations/{cid}/ledger")[1] == ledger_before
    assert _call(node, "GET", f"/v1/constellations/{cid}/records/{'0' * 64}")[0] == 404


class _FollowsNothing:
    """Just enough of a node (NodeFacade) for the routes that look a constellation up."""

    store: Store | None = None

    def __init__(self) -> None:
        self.registry: Registry = installed_registry()

    def engine_for(self, text: str) -> Engine:
        if text == "malformed":
            raise LocalError("That is not a constellation id.")
        raise NotFoundError(f"This node does not follow constellation {text}.")

    def plugin_routes(self) -> dict[str, list[Any]]:
        return {}


async def test_not_found_errors_become_404_json_at_the_api() -> None:
    app = make_app(_FollowsNothing(), "secret")  # type: ignore[arg-type]
    auth = {"Authorization": "Bearer secret"}
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        for method, path in (("GET", "/v1/constellations/vc1x"), ("GET", "/v1/constellations/vc1x/ledger"),
                             ("GET", f"/v1/constellations/vc1x/records/{'0' * 64}"),
                             ("POST", "/v1/constellations/vc1x/accounting/split"),
                             ("GET", "/v1/constellations/vc1x/accounting/revenues"),
                             ("GET", "/v1/constellations/vc1x/export")):
            resp = await client.request(method, path, headers=auth, json={})
            assert resp.status == 404, (method, path)
            assert resp.content_type == "application/json"
            assert await resp.json() == {"error": "This node does not follow constellation vc1x."}
        # Any other local error stays a bad request.
        resp = await client.get("/v1/constellations/malformed", headers=auth)
        assert resp.status == 400 and await resp.json() == {"error": "That is not a constellation id."}


def test_an_unknown_constellation_or_record_is_a_404(node: Daemon) -> None:
    unknown = constellation_text(bytes(32))
    for path in (f"/v1/constellations/{unknown}", f"/v1/constellations/{unknown}/ledger",
                 f"/v1/constellations/{unknown}/accounting/policies"):
        status, doc = _call(node, "GET", path)
        assert status == 404 and doc == {"error": f"This node does not follow constellation {unknown}."}
    cid = _call(node, "POST", "/v1/constellations", b'{"name": "lookups"}')[1]["id"]
    status, doc = _call(node, "GET", f"/v1/constellations/{cid}/records/{'ab' * 32}")
    assert status == 404 and doc["error"].startswith("No record abababab")
    status, doc = _call(node, "POST", f"/v1/constellations/{cid}/accounting/split", b'{"revenue": "' +
                        b"cd" * 32 + b'"}')
    assert status == 404 and "no final revenue" in doc["error"]


def test_openapi_documents_every_route(node: Daemon) -> None:
    status, doc = _call(node, "GET", "/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    static = json.loads((Path(__file__).parent.parent / "node" / "openapi.json").read_text())
    core = ["/v1/health", "/v1/id", "/v1/status", "/v1/peers", "/v1/constellations", "/v1/join",
            "/v1/constellations/{cid}", "/v1/constellations/{cid}/ledger", "/v1/constellations/{cid}/invites",
            "/v1/constellations/{cid}/records", "/v1/constellations/{cid}/records/{rid}"]
    assert set(core) <= set(static["paths"])
    for path, ops in doc["paths"].items():
        for method, spec in ops.items():
            assert spec["summary"].strip(), (path, method)
    # Routes the node serves but the static file lacks are described from their handlers.
    status, _ = _call(node, "GET", "/v1/health")
    assert status == 200


def test_api_binds_loopback_only(tmp_path: Path) -> None:
    d = Daemon("x", tmp_path / "home", free_port(), "valuemesh-test")
    d.cli("init")
    res = d.cli("daemon", "--api", "0.0.0.0:0", "--no-mdns", check=False, timeout=30)
    assert res.returncode == 1 and "loopback" in res.stderr


def test_batch_submit_is_all_or_nothing(node: Daemon) -> None:
    cid = _call(node, "POST", "/v1/constellations", b'{"name": "batch"}')[1]["id"]
    rec = {"type": "contribution", "body": {"op": "record", "action": "work", "quantity": "1", "unit": "h"}}
    bad = {"type": "contribution", "body": {"op": "record", "action": "work", "quantity": "-1", "unit": "h"}}
    status, doc = _call(node, "POST", f"/v1/constellations/{cid}/records",
                        json.dumps({"records": [rec, bad, rec]}).encode())
    assert status == 400, doc
    assert _call(node, "GET", f"/v1/constellations/{cid}/ledger")[1]["pending"] == []
    status, doc = _call(node, "POST", f"/v1/constellations/{cid}/records",
                        json.dumps({"records": [rec, rec, rec]}).encode())
    assert status == 202
    seqs = [r["seq"] for r in doc["records"]]
    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]
    for too_many in ([], [rec] * 257):
        status, _ = _call(node, "POST", f"/v1/constellations/{cid}/records",
                          json.dumps({"records": too_many}).encode())
        assert status == 400


def test_the_ledger_says_when_each_record_became_final_on_this_node(node: Daemon) -> None:
    import time

    cid = _call(node, "POST", "/v1/constellations", b'{"name": "final-at"}')[1]["id"]
    before_ms = int(time.time() * 1000)
    body = {"type": "contribution", "body": {"op": "record", "action": "work", "quantity": "1", "unit": "h"}}
    rid = _call(node, "POST", f"/v1/constellations/{cid}/records", json.dumps(body).encode())[1]["id"]
    ledger: dict = {}
    for _ in range(100):  # bounded: a single core member finalises at once
        ledger = _call(node, "GET", f"/v1/constellations/{cid}/ledger")[1]
        if any(e["id"] == rid for e in ledger["final"]):
            break
        time.sleep(0.05)
    ids = [e["id"] for e in ledger["final"]]
    assert rid in ids
    # Node-local times, kept beside `final` (which every agreeing node prints alike).
    assert len(ledger["final_at"]) == len(ledger["final"])
    assert all(isinstance(t, int) for t in ledger["final_at"])
    assert ledger["final_at"] == sorted(ledger["final_at"])
    assert ledger["final_at"][ids.index(rid)] >= before_ms
    assert ledger["final_at"][-1] <= int(time.time() * 1000) + 1
    assert all("final_at" not in e for e in ledger["final"])


def test_concurrent_submits_get_consecutive_seqs_and_a_refused_one_leaves_no_gap(node: Daemon) -> None:
    from concurrent.futures import ThreadPoolExecutor

    cid = _call(node, "POST", "/v1/constellations", b'{"name": "many"}')[1]["id"]
    good = {"type": "contribution", "body": {"op": "record", "action": "work", "quantity": "1", "unit": "h"}}
    bad = {"type": "contribution", "body": {"op": "ack", "target": "0" * 64}}  # no such contribution
    docs = [bad if i % 4 == 1 else good for i in range(16)]
    with ThreadPoolExecutor(16) as pool:  # requests queue up and are signed together
        answers = list(pool.map(
            lambda d: _call(node, "POST", f"/v1/constellations/{cid}/records", json.dumps(d).encode()), docs))
    ok = [doc for status, doc in answers if status in (200, 202)]
    refused = [doc for status, doc in answers if status == 400]
    assert len(ok) == 12 and len(refused) == 4
    assert all(doc["error"].endswith(".") for doc in refused)
    seqs = sorted(doc["seq"] for doc in ok)
    assert seqs == list(range(seqs[0], seqs[0] + 12))  # no seq twice, none skipped
    ledger = _call(node, "GET", f"/v1/constellations/{cid}/ledger")[1]
    held = {e["id"] for e in ledger["final"]} | {e["id"] for e in ledger["pending"]}
    assert {doc["id"] for doc in ok} <= held
