"""The plugin's read route on the daemon's local API: GET /plugins/sharing/{cid}
returns the plugin's views of one constellation's final ledger state as JSON.

A route of plugin API 2 is a plain function of a `RouteRequest`: the daemon serves it
behind its token guard, only for constellations that use the plugin, and turns a
valuemesh error raised here into its one-sentence JSON error.
"""

from __future__ import annotations

from valuemesh.plugin import Json, MemberId, Route, RouteRequest

from .plugin import PLUGIN

JSON_SHAPE_VERSION = 1
# Fields that hold a member key; every other bytes value is an id shown as hex.
MEMBER_FIELDS = frozenset({"lender", "borrower", "by"})


def to_json(value: object, key: str = "") -> Json:
    """A state value as JSON: member keys as `vm1…` ids, other bytes as hex."""
    if isinstance(value, bytes):
        return str(MemberId(value)) if key in MEMBER_FIELDS and len(value) == 32 else value.hex()
    if isinstance(value, dict):
        return {str(k): to_json(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v, key) for v in value]
    if value is None or isinstance(value, str | int | float):
        return value
    raise TypeError(f"a {type(value).__name__} in the sharing state has no JSON form")


def state(request: RouteRequest) -> Json:
    """The sharing plugin's views of one constellation's final state."""
    c = request.constellation
    doc: dict[str, Json] = {"v": JSON_SHAPE_VERSION, "constellation": c.id, "state_hash": c.state_hash.hex()}
    for name, view in PLUGIN.views().items():
        doc[name] = to_json(view(c.state))
    return doc


ROUTES = [Route("", state)]
