"""The one module a valuemesh plugin imports from (plugin API 2): the Plugin class and its
field schema, the ledger context, errors, the route and command contracts, and both test kits.

Everything here is documented in docs/plugins.md with the plugin API version it appeared in;
names not exported here are valuemesh's internals and may change without a new API version.
"""

from __future__ import annotations

from valuemesh.cli.plugins import Submitted, api, emit, fail, json_option, submit
from valuemesh.node.client import ApiClient
from valuemesh.node.testing import Cluster, Daemon, cluster, wait_until
from valuemesh.protocol.errors import (
    AuthorizationError,
    DecodeError,
    LocalError,
    NotFoundError,
    PluginError,
    ValidationError,
    ValuemeshError,
)
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.ledger import ApplyContext, Outcome, StateReader
from valuemesh.protocol.plugins import (
    ENTRY_POINT_GROUP,
    PLUGIN_API_VERSION,
    ConstellationView,
    Field,
    Json,
    Plugin,
    Route,
    RouteHandler,
    RouteRequest,
    Version,
    integer,
    text,
)
from valuemesh.protocol.records import Record
from valuemesh.protocol.testing import Report, TestConstellation, check_plugin, malformed_bodies

__all__ = [
    "ENTRY_POINT_GROUP",
    "PLUGIN_API_VERSION",
    "ApiClient",
    "ApplyContext",
    "AuthorizationError",
    "Cluster",
    "ConstellationView",
    "Daemon",
    "DecodeError",
    "Field",
    "Json",
    "LocalError",
    "MemberId",
    "NotFoundError",
    "Outcome",
    "Plugin",
    "PluginError",
    "Record",
    "Report",
    "Route",
    "RouteHandler",
    "RouteRequest",
    "StateReader",
    "Submitted",
    "TestConstellation",
    "ValidationError",
    "ValuemeshError",
    "Version",
    "api",
    "check_plugin",
    "cluster",
    "emit",
    "fail",
    "integer",
    "json_option",
    "malformed_bodies",
    "submit",
    "text",
    "wait_until",
]
