"""The daemon's local HTTP/JSON API on 127.0.0.1, guarded by a bearer token
kept in the home directory, and against web pages (Host, Origin and Content-Type
checks; docs/security.md). The CLI is its first client; `/v1/openapi.json`
describes every route. Errors are `{"error": "<one sentence>"}`: 404 for a
`NotFoundError`, 400 for any other local error, 422 for bad data from elsewhere.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from valuemesh.node import netview, views
from valuemesh.node.accounting_api import add_accounting_routes
from valuemesh.node.facade import NodeFacade, json_ok, read_json_object
from valuemesh.node.plugin_routes import mount_plugin_routes
from valuemesh.protocol.errors import LocalError, NotFoundError, RemoteError, ValuemeshError

MAX_REQUEST_BYTES = 1024 * 1024
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_BATCH_RECORDS = 256
API_VERSION = "1"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _own_hosts(request: web.Request) -> frozenset[str]:
    """The Host values that name this API: its loopback address and port under each of its names."""
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    port = sock[1] if isinstance(sock, tuple) and len(sock) >= 2 else None
    return frozenset() if port is None else frozenset(f"{h}:{port}" for h in LOOPBACK_NAMES)


def _refusal(request: web.Request) -> web.Response | None:
    """The answer to a request a web page (or a DNS-rebinding name) could have sent, or None."""
    hosts = _own_hosts(request)
    if request.headers.get("Host", "").lower() not in hosts:
        # A page on evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example.
        return _error(421, "The API answers only requests addressed to its own loopback address and port.")
    origin = request.headers.get("Origin")
    if origin is not None and origin.lower() not in {f"http://{h}" for h in hosts}:
        return _error(403, "The API refuses requests from web pages; use the CLI or a local program.")
    return None


def make_app(node: NodeFacade, token: str) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        refused = _refusal(request)
        if refused is not None:
            return refused
        if request.path != "/v1/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "The API token is missing or wrong; the CLI reads it from the home directory.")
        if request.method not in SAFE_METHODS and request.content_type != "application/json":
            # A browser sends a form or text/plain without asking first; JSON it must ask for, and is refused.
            return _error(415, "A request that changes something must have Content-Type application/json.")
        if request.content_length is not None and request.content_length > MAX_REQUEST_BYTES:
            return _error(413, "The request body is too large.")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "The request body is too large.")
        except web.HTTPException:
            raise
        except NotFoundError as exc:
            return _error(404, exc.message)
        except LocalError as exc:
            return _error(400, exc.message)
        except RemoteError as exc:
            return _error(422, exc.message)
        except ValuemeshError as exc:
            return _error(400, exc.message)

    app = web.Application(middlewares=[guard], client_max_size=MAX_REQUEST_BYTES)
    routes = web.RouteTableDef()

    body, ok = read_json_object, json_ok

    @routes.get("/v1/health")
    async def health(request: web.Request) -> web.Response:
        return ok({"ok": True, "api": API_VERSION})

    @routes.get("/v1/id")
    async def ident(request: web.Request) -> web.Response:
        return ok(node.id_info())

    @routes.get("/v1/status")
    async def status(request: web.Request) -> web.Response:
        return ok(node.status())

    @routes.get("/v1/peers")
    async def peers(request: web.Request) -> web.Response:
        return ok({"peers": node.peer_list()})

    @routes.get("/v1/netcheck")
    async def netcheck(request: web.Request) -> web.Response:
        """Public reachability, NAT behaviour, port mapping, relays and IPv6, each as a sentence."""
        fresh, wait_s = netview.parse_params(request.query)
        return ok(await node.netcheck(fresh, wait_s))

    @routes.post("/v1/peers")
    async def add_peer(request: web.Request) -> web.Response:
        doc = await body(request)
        addr = doc.get("address")
        if not isinstance(addr, str):
            raise LocalError("Give the peer's address as HOST:PORT.")
        return ok(await node.add_peer(addr))

    @routes.get("/v1/constellations")
    async def list_c(request: web.Request) -> web.Response:
        return ok({"constellations": node.constellation_list()})

    @routes.post("/v1/constellations")
    async def create_c(request: web.Request) -> web.Response:
        doc = await body(request)
        name, purpose = doc.get("name"), doc.get("purpose", "")
        if not isinstance(name, str) or not name.strip() or not isinstance(purpose, str):
            raise LocalError("A constellation needs a name (text) and optionally a purpose (text).")
        return ok(await node.create_constellation(name.strip(), purpose), 201)

    @routes.post("/v1/join")
    async def join(request: web.Request) -> web.Response:
        doc = await body(request)
        token = doc.get("token")
        if not isinstance(token, str):
            raise LocalError("Give the invite token as text.")
        return ok(await node.join(token), 201)

    def cid_of(request: web.Request) -> bytes:
        return node.engine_for(request.match_info["cid"]).cid

    @routes.get("/v1/constellations/{cid}")
    async def show_c(request: web.Request) -> web.Response:
        return ok(views.summary(node.engine_for(request.match_info["cid"])))

    @routes.get("/v1/constellations/{cid}/ledger")
    async def ledger(request: web.Request) -> web.Response:
        return ok(views.ledger_view(node.engine_for(request.match_info["cid"])))

    @routes.post("/v1/constellations/{cid}/invites")
    async def invite(request: web.Request) -> web.Response:
        doc = await body(request)
        return ok(await node.invite(cid_of(request), doc), 201)

    @routes.post("/v1/constellations/{cid}/records")
    async def submit(request: web.Request) -> web.Response:
        """Sign and submit one record ({type, body}) or many ({records: [{type, body}, …]})."""
        doc = await body(request)
        if "records" in doc:
            items = doc["records"]
            if not isinstance(items, list) or not 0 < len(items) <= MAX_BATCH_RECORDS:
                raise LocalError(f"'records' must be a list of 1 to {MAX_BATCH_RECORDS} records.")
            pairs = []
            for item in items:
                if not isinstance(item, dict) or not isinstance(item.get("type"), str):
                    raise LocalError("Each record needs a type (the plugin name) and a body.")
                pairs.append((item["type"], item.get("body")))
            return ok({"records": await node.submit_json_many(cid_of(request), pairs)}, 202)
        rtype, rbody = doc.get("type"), doc.get("body")
        if not isinstance(rtype, str):
            raise LocalError("A record needs a type (the plugin name).")
        return ok(await node.submit_json(cid_of(request), rtype, rbody), 202)

    @routes.get("/v1/constellations/{cid}/records/{rid}")
    async def get_record(request: web.Request) -> web.Response:
        eng = node.engine_for(request.match_info["cid"])
        return ok(await views.record_view(eng, request.match_info["rid"]))

    @routes.get("/v1/openapi.json")
    async def openapi(request: web.Request) -> web.Response:
        """The OpenAPI document: the core routes as written in openapi.json, plus
        every other route served (plugins, accounting) described from its handler."""
        doc = json.loads((Path(__file__).parent / "openapi.json").read_text())
        for r in request.app.router.routes():
            info = r.resource.get_info() if r.resource is not None else {}
            path = info.get("path") or info.get("formatter")
            method = r.method.lower()
            if not path or method in ("head", "*") or method in doc["paths"].get(path, {}):
                continue
            summary = ((r.handler.__doc__ or "").strip().splitlines() or [f"{method.upper()} {path}"])[0]
            doc["paths"].setdefault(path, {})[method] = {
                "summary": summary, "responses": {"200": {"description": "OK"}, "400": {"description": "error"}}}
        return ok(doc)

    add_accounting_routes(routes, node)
    app.add_routes(routes)
    mount_plugin_routes(app, node.registry, node.engine_for)
    return app
