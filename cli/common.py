"""What every `valuemesh` command shares: the context object, `--json`, one-sentence errors,
record submission (optionally waiting until final) and the parsers of durations, amounts and ids.

`cli/plugins.py` re-exports the public ones for plugin authors (plugin API 1).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NoReturn, TypedDict, TypeVar

import click

from valuemesh.node.client import ApiClient
from valuemesh.node.home import Home, resolve_home
from valuemesh.protocol.errors import LocalError, ValuemeshError
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.plugins import Json

F = TypeVar("F", bound=Callable[..., Any])

_DURATION = re.compile(r"^(\d{1,6})([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_HEX_ID = re.compile(r"[0-9a-f]{64}")
MAX_DECIMALS = 6  # of a contribution's quantity
# `--wait` polls the daemon this often, for at most this long.
WAIT_POLL_S = 0.2
WAIT_S = 60.0


class Ctx:
    """The root context object: which home, and whether to print JSON."""

    def __init__(self, home: Path, as_json: bool) -> None:
        self.home = Home(home)
        self.as_json = as_json

    @property
    def api(self) -> ApiClient:
        return ApiClient(self.home)

    def out(self, doc: Any, text: str) -> None:
        """Print `doc` as JSON under --json, else `text`."""
        if self.as_json:
            click.echo(json.dumps(doc, indent=2, sort_keys=True))
        else:
            click.echo(text)


pass_ctx = click.make_pass_decorator(Ctx)


def current() -> Ctx:
    """The running command's Ctx; outside `valuemesh` (a plugin's own tests), the default home's."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    if not isinstance(obj, Ctx):
        obj = Ctx(resolve_home(None), False)
        if ctx is not None:
            ctx.find_root().obj = obj
    return obj


def fail(message: str) -> NoReturn:
    """One sentence on stderr and exit status 1, like every valuemesh error."""
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


class Group(click.Group):
    """Turns any valuemesh error into one sentence on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ValuemeshError as exc:
            fail(exc.message)
        except KeyboardInterrupt:
            fail("Interrupted.")


def json_option(f: F) -> F:
    """A `--json` flag on a command, same as `valuemesh --json` before it."""
    def cb(ctx: click.Context, _p: Any, value: bool) -> None:
        if value:
            current().as_json = True
    return click.option("--json", "as_json", is_flag=True, expose_value=False, callback=cb,
                        help="Print machine-readable JSON.")(f)


def wants_json() -> bool:
    return current().as_json


def emit(doc: object, text: str) -> None:
    """Print `doc` (anything JSON can hold) as JSON when --json was given, else `text`."""
    current().out(doc, text)


def api() -> ApiClient:
    """A client of the local daemon named by `valuemesh --home` (or $VALUEMESH_HOME)."""
    return current().api


# -- parsers: each returns the canonical form or raises one sentence ------------------------------


def parse_cid(text: str) -> str:
    """A constellation id (vc1…), checksum checked, in canonical lower case."""
    from valuemesh.protocol.records import parse_constellation

    parse_constellation(text)
    return text.strip().lower()


def parse_member(text: str) -> str:
    """A member id (vm1…), checksum checked."""
    return str(MemberId.parse(text))


def parse_hex_id(text: str, what: str = "a record id") -> str:
    """A 64-hex-character id (record, agreement, proposal, …) in lower case."""
    t = text.strip().lower()
    if not _HEX_ID.fullmatch(t):
        raise LocalError(f"'{text}' is not {what} (64 hex characters).")
    return t


def parse_duration(text: str) -> int:
    """`30m`, `7d`, … in seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise LocalError(f"'{text}' is not a duration; use a number and s, m, h, d or w, like 7d.")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_quantity(text: str) -> str:
    """A positive decimal with at most MAX_DECIMALS decimals, normalised (`2.50` -> `2.5`)."""
    try:
        q = Decimal(text)
    except InvalidOperation:
        raise LocalError(f"'{text}' is not a quantity; use a number like 3 or 2.5.") from None
    if not q.is_finite() or q <= 0:
        raise LocalError(f"'{text}' is not a positive quantity.")
    s = format(q.normalize(), "f")
    if "." in s and len(s.split(".")[1]) > MAX_DECIMALS:
        raise LocalError(f"'{text}' has more than {MAX_DECIMALS} decimals.")
    return s


# -- submitting records --------------------------------------------------------------------------


class Submitted(TypedDict):
    """What `submit` answers: the new record's id (hex), its sequence number, and whether it
    is "pending" (acknowledged: stored by this node) or, after `--wait`, "final" (ordered)."""

    id: str
    seq: int
    status: str


def submit(cid: str, record_type: str, body: Mapping[str, Json]) -> Submitted:
    """Have the daemon sign and submit a record; returns {"id", "seq", "status": "pending"}.

    When the running command has a true `--wait` (see `wait_option`), returns only once the
    record is final, with "status": "final", or raises the ledger's sentence if it was rejected.
    """
    answer = api().call("POST", f"/v1/constellations/{parse_cid(cid)}/records",
                        {"type": record_type, "body": dict(body)})
    doc = Submitted(id=str(answer["id"]), seq=int(answer["seq"]), status=str(answer["status"]))
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.params.get("wait"):
        return wait_final(cid, doc)
    return doc


def wait_final(cid: str, doc: Submitted) -> Submitted:
    """Poll until the record is ordered; the ledger's own sentence if it was rejected then.

    Submission checks a record against the final state only; the ledger decides for good
    when the record is ordered, after records others sent meanwhile (a vote cast twice from
    two devices, a distribution whose inputs moved on).
    """
    deadline = time.monotonic() + WAIT_S
    while True:
        rec = api().call("GET", f"/v1/constellations/{parse_cid(cid)}/records/{doc['id']}")
        if rec.get("final"):
            if rec["status"] != "applied":
                raise LocalError(rec.get("reason") or f"The ledger {rec['status']} the record.")
            done = doc.copy()  # keeps whatever else the answer carried (a hash, ratifiers)
            done["status"] = "final"
            return done
        if time.monotonic() >= deadline:
            raise LocalError(f"The record {doc['id'][:16]}… is still pending after {WAIT_S:.0f} s; "
                             "check later with 'valuemesh ledger'.")
        time.sleep(WAIT_POLL_S)


def wait_option(f: F) -> F:
    """A `--wait` flag: `submit` then returns only once the record is final."""
    return click.option("--wait", is_flag=True, help="Wait until the record is final; exit 1 with the "
                                                     "ledger's reason if it is rejected.")(f)
