"""What the local API's route modules need from the node (`NodeFacade`, which the daemon
satisfies), and the JSON in/out helpers they share: typed against this, not the daemon.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from valuemesh.node.jsonbody import check_json_depth
from valuemesh.protocol.errors import LocalError

if TYPE_CHECKING:
    from valuemesh.node.engine import Engine
    from valuemesh.node.store import Store
    from valuemesh.protocol.plugins import Registry


class NodeFacade(Protocol):
    """The node as the API sees it: its constellations, peers and the calls that sign records."""

    @property
    def store(self) -> Store | None: ...

    @property
    def registry(self) -> Registry: ...

    def engine_for(self, text: str) -> Engine:
        """The engine of a constellation named by its text id; NotFoundError if not followed."""
        ...

    def id_info(self) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...

    def peer_list(self) -> list[dict[str, Any]]: ...

    async def add_peer(self, address: str) -> dict[str, Any]: ...

    async def netcheck(self, fresh: bool, wait_s: float) -> dict[str, Any]:
        """Reachability, NAT behaviour, port mapping, relays and IPv6 (node/netview.py)."""
        ...

    def constellation_list(self) -> list[dict[str, Any]]: ...

    async def create_constellation(self, name: str, purpose: str) -> dict[str, Any]: ...

    async def join(self, token: str) -> dict[str, Any]: ...

    async def invite(self, cid: bytes, doc: dict[str, Any]) -> dict[str, Any]: ...

    async def submit(self, eng: Engine, rtype: str, body: dict[str, Any]) -> dict[str, Any]: ...

    async def submit_json(self, cid: bytes, rtype: str, body: Any) -> dict[str, Any]: ...

    async def submit_json_many(self, cid: bytes, items: list[tuple[str, Any]]) -> list[dict[str, Any]]: ...


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON body, which must be an object (empty body: {})."""
    if not request.can_read_body:
        return {}
    raw = await request.read()
    check_json_depth(raw)  # before the parser recurses into it
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise LocalError("The request body is not valid JSON.") from None
    if not isinstance(doc, dict):
        raise LocalError("The request body must be a JSON object.")
    return doc


def json_ok(doc: Any, status: int = 200) -> web.Response:
    """A JSON response with sorted keys, so equal documents are equal bytes."""
    return web.json_response(doc, status=status, dumps=lambda d: json.dumps(d, sort_keys=True))
