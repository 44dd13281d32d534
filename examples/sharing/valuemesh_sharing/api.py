"""The plugin's read route on the daemon's local API: GET /plugins/sharing/{cid}
returns the plugin's views of one constellation's final ledger state as JSON.

The daemon mounts these routes behind its own token guard and error middleware,
so a handler may raise valuemesh errors and they become one-sentence JSON errors.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import MemberId

from .plugin import NAME, PLUGIN

JSON_SHAPE_VERSION = 1
# Fields that hold a member key; every other bytes value is an id shown as hex.
MEMBER_FIELDS = frozenset({"lender", "borrower", "by"})


def to_json(value: Any, key: str = "") -> Any:
    if isinstance(value, bytes):
        return str(MemberId(value)) if key in MEMBER_FIELDS and len(value) == 32 else value.hex()
    if isinstance(value, dict):
        return {str(k): to_json(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v, key) for v in value]
    return value


async def state(request: web.Request) -> web.Response:
    node = request.app["node"]
    eng = node.engine_for(request.match_info["cid"])
    meta = eng.ledger.reader.read("membership", "meta") or {}
    if NAME not in meta.get("plugins", {}):
        raise LocalError(f"This constellation does not use the {NAME} plugin.")
    reader = eng.ledger.reader
    doc: dict[str, Any] = {"v": JSON_SHAPE_VERSION, "constellation": eng.text_id,
                           "state_hash": eng.ledger.state_hash().hex()}
    for name, view in PLUGIN.views().items():
        doc[name] = to_json(view(reader))
    return web.json_response(doc)


def routes() -> list[web.RouteDef]:
    return [web.get("/{cid}", state)]
