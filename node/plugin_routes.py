"""Serves each plugin's read-only routes (plugin API 2) on the local API as GET /plugins/<name>/{cid}…,
handing a handler a `ConstellationView` of that constellation's final state, never the node itself.

The routes sit behind the API's token guard and error middleware; a handler's valuemesh error
becomes its one-sentence JSON error, and any other exception a 500 naming the plugin.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeAlias

from aiohttp import web

from valuemesh.protocol.errors import LocalError, ValuemeshError
from valuemesh.protocol.plugins import ConstellationView, Registry, Route, RouteRequest

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("valuemesh.plugins")

# The node's lookup of a followed constellation by text id; it raises the API's 404 for any other.
EngineLookup: TypeAlias = "Callable[[str], Engine]"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def plugin_routes(registry: Registry) -> dict[str, list[Route]]:
    """Each plugin's routes by plugin name. A plugin whose `api_routes()` raises or returns
    anything but a list of `Route`s is logged and left out: a plugin bug never stops the daemon."""
    out: dict[str, list[Route]] = {}
    for name, plugin in sorted(registry.plugins.items()):
        try:
            routes = plugin.api_routes()
            if not isinstance(routes, list) or not all(isinstance(r, Route) for r in routes):
                raise TypeError(f"api_routes() returned {type(routes).__name__}, not a list of valuemesh Routes")
        except Exception as exc:
            log.error("plugin %s gave no usable API routes: %s", name, exc)
            continue
        if routes:
            out[name] = routes
    return out


def _serve(name: str, route: Route, engine_for: EngineLookup) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        view = ConstellationView.of(engine_for(request.match_info["cid"]).ledger)
        if name not in view.plugins:
            raise LocalError(f"This constellation does not use the {name} plugin.")
        params = {k: v for k, v in request.match_info.items() if k != "cid"}
        query = {k: request.query[k] for k in request.query}
        try:
            # Synchronous on purpose: the state cannot change while the handler reads it.
            doc = route.handler(RouteRequest(view, MappingProxyType(params), MappingProxyType(query)))
            text = json.dumps(doc, sort_keys=True, allow_nan=False)
        except ValuemeshError:
            raise
        except Exception as exc:  # a plugin bug costs this request only
            message = f"Plugin '{name}' failed in its route ({type(exc).__name__}: {exc})."
            log.error("%s", message)
            return web.json_response({"error": message}, status=500)
        return web.Response(text=text, content_type="application/json")

    # The API's OpenAPI document describes a route by its handler's docstring.
    handle.__doc__ = route.handler.__doc__
    return handle


def mount_plugin_routes(app: web.Application, registry: Registry, engine_for: EngineLookup) -> None:
    """Add every plugin's routes to `app`, each plugin as a sub-application at /plugins/<name>;
    a plugin whose routes cannot all be added (two with one path) is logged and has none."""
    for name, routes in plugin_routes(registry).items():
        sub = web.Application()
        try:
            for route in routes:
                sub.router.add_get("/{cid}" + route.path, _serve(name, route, engine_for))
        except (ValueError, RuntimeError) as exc:
            log.error("plugin %s: its API routes could not be mounted: %s", name, exc)
            continue
        app.add_subapp(f"/plugins/{name}", sub)
