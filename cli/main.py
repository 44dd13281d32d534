"""The `valuemesh` command line: every command a member needs, as a thin
client of the daemon's local API (only `init`, `id` offline, `config`, `service`
and `daemon` itself work without a running daemon).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from valuemesh.cli.common import (
    Ctx,
    Group,
    fail,
    json_option,
    parse_cid,
    parse_duration,
    parse_hex_id,
    parse_quantity,
    pass_ctx,
    submit,
)
from valuemesh.cli.config import config_group, given_flags, settings_options
from valuemesh.cli.service import service_group
from valuemesh.node.home import resolve_home
from valuemesh.protocol.errors import LocalError, ValuemeshError
from valuemesh.protocol.identity import MemberId

EVIDENCE_URI_MAX = 512  # the contribution schema's limit of `evidence.uri`


@click.group(cls=Group)
@click.option("--home", type=click.Path(file_okay=False), envvar="VALUEMESH_HOME",
              help="Node home directory (default: $XDG_DATA_HOME/valuemesh).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.version_option(package_name="valuemesh")
@click.pass_context
def cli(ctx: click.Context, home: str | None, as_json: bool) -> None:
    """valuemesh: a leaderless node for value networks."""
    ctx.obj = Ctx(resolve_home(home), as_json)


@cli.command()
@click.option("--name", default="", help="A name other members see.")
@click.option("--passphrase-prompt", is_flag=True, help="Seal the key file with a passphrase.")
@json_option
@pass_ctx
def init(c: Ctx, name: str, passphrase_prompt: bool) -> None:
    """Create this member's identity and config."""
    pw = click.prompt("Passphrase", hide_input=True, confirmation_prompt=True) if passphrase_prompt else None
    ident = c.home.init(name, pw)
    c.out({"member": str(ident.member), "home": str(c.home.path)},
          f"member {ident.member}\nhome   {c.home.path}")


@cli.command("id")
@json_option
@pass_ctx
def id_(c: Ctx) -> None:
    """Show this member's id, addresses, version and plugins."""
    try:
        doc = c.api.call("GET", "/v1/id")
    except ValuemeshError:
        from valuemesh.node.daemon import installed_registry
        from valuemesh.node.settings import load
        ident = c.home.load_identity()
        reg = installed_registry(load(c.home, {}, os.environ).disable_plugins)
        doc = {"member": str(ident.member), "running": False, "addresses": [],
               "plugins": {n: str(p.version) for n, p in reg.plugins.items()}}
    lines = [f"member   {doc['member']}", f"addresses {', '.join(doc.get('addresses', [])) or '(daemon not running)'}",
             f"plugins  {', '.join(f'{k} {v}' for k, v in sorted(doc['plugins'].items()))}"]
    if "version" in doc:
        lines.insert(1, f"version  {doc['version']}")
    c.out(doc, "\n".join(lines))


@cli.command()
@settings_options
@click.option("--init-if-missing", is_flag=True, help="Create an identity first if there is none.")
@click.option("--recover", is_flag=True,
              help="Start even if node.db holds less than this home followed (lost, emptied or restored).")
@pass_ctx
def daemon(c: Ctx, /, init_if_missing: bool, recover: bool, **flags: Any) -> None:
    """Run the node in the foreground until SIGINT/SIGTERM.

    Each setting comes from its flag, else its VALUEMESH_* variable, else config.json in the
    home, else the default shown; 'valuemesh config list' shows them all.
    """
    from valuemesh.node.run import run_daemon
    from valuemesh.node.settings import load

    settings = load(c.home, given_flags(flags), os.environ)  # every bad value is refused before anything starts
    if init_if_missing and not c.home.initialised:
        ident = c.home.init("")
        click.echo(f"created identity {ident.member} in {c.home.path}", err=True)
    run_daemon(c.home, settings, recover=recover)


@cli.command()
@json_option
@pass_ctx
def status(c: Ctx) -> None:
    """Health, peers and each constellation's finality and catch-up."""
    doc = c.api.call("GET", "/v1/status")
    lines = [f"health   {doc['health']}", f"member   {doc['member']}",
             f"listen   {doc['listen']}",
             f"peers    {sum(1 for p in doc['peers'] if p.get('connected'))} connected, {len(doc['peers'])} known"]
    for p in doc["peers"]:
        lines.append(f"  {p['member'][:16]}…  {p['address']}  found by {p['via']}  {peer_state(p)}")
    for k in doc["constellations"]:
        lines.append(f"{k['name']}  {k['id']}")
        lines.append(f"  members {k['members']} (core {k['core']}), final {k['final']}, pending {k['pending']}, "
                     f"round {k['round']}, catch-up {k['catchup']}")
        lines.append(f"  now: {k['reach']['text']}")
        lines.append(f"  guarantee: {k['guarantee_text']}")
        cp = k.get("checkpoint")
        if cp:
            lines.append(f"  epoch {k['epoch']}; last checkpoint: epoch {cp['epoch']} at round {cp['round']}, "
                         f"signed by {len(cp['signers'])}")
        if k.get("started_from"):
            s = k["started_from"]
            lines.append(f"  started from the checkpoint of epoch {s['epoch']}: holds the state, and the records "
                         f"final after the first {s['final']}")
    c.out(doc, "\n".join(lines))


@cli.group(cls=Group, invoke_without_command=True)
@json_option
@click.pass_context
def peers(ctx: click.Context) -> None:
    """List known peers (liveness, how reached, connected or not), or add one."""
    if ctx.invoked_subcommand is None:
        c: Ctx = ctx.obj
        doc = c.api.call("GET", "/v1/peers")
        c.out(doc, "\n".join(f"{p['member']}  {p['address']}  found by {p['via']}  {peer_state(p)}"
                             for p in doc["peers"]) or "no peers")


def peer_state(p: dict[str, Any]) -> str:
    """Liveness, then for a connected peer its path (the relay's id for a relayed one) and RTT."""
    if not p.get("connected"):
        return f"{p['state']}, not connected"
    path = p.get("path") or "?"
    if p.get("relay"):
        path = f"{path} via {p['relay'][:12]}…"
    rtt = f"rtt {p['rtt_ms']:.1f} ms" if p.get("rtt_ms") is not None else "rtt not measured yet"
    return f"{p['state']}, connected, {path}, {rtt}"


@cli.command()
@click.option("--cached", is_flag=True, help="Show the last check instead of asking members for a new one.")
@click.option("--wait", "wait_s", type=click.FloatRange(0, 20), default=12.0, show_default=True,
              help="Seconds to wait for the members asked to dial this node back.")
@json_option
@pass_ctx
def netcheck(c: Ctx, cached: bool, wait_s: float) -> None:
    """How the internet reaches this node: reachability, NAT, port mapping, relays, IPv6."""
    doc = c.api.call("GET", f"/v1/netcheck?fresh={'false' if cached else 'true'}&wait_s={wait_s:g}")
    c.out(doc, "\n".join(doc["lines"]))


@peers.command("add")
@click.argument("address")
@json_option
@pass_ctx
def peers_add(c: Ctx, address: str) -> None:
    """Dial a peer at HOST:PORT and keep it in the peer table."""
    doc = c.api.call("POST", "/v1/peers", {"address": address})
    c.out(doc, f"dialling {doc['address']}")


@cli.group(cls=Group)
def constellation() -> None:
    """Create, join, inspect, leave or dissolve constellations."""


@constellation.command("create")
@click.argument("name")
@click.option("--purpose", default="", help="What this constellation is for.")
@json_option
@pass_ctx
def c_create(c: Ctx, name: str, purpose: str) -> None:
    """Found a constellation with yourself as its first core member."""
    doc = c.api.call("POST", "/v1/constellations", {"name": name, "purpose": purpose})
    c.out(doc, f"created {doc['name']}\nid {doc['id']}\n{doc['guarantee_text']}")


@constellation.command("list")
@json_option
@pass_ctx
def c_list(c: Ctx) -> None:
    """Constellations this node follows."""
    doc = c.api.call("GET", "/v1/constellations")
    c.out(doc, "\n".join(f"{k['id']}  {k['name']}  ({k['members']} members, {k['status']})"
                         for k in doc["constellations"]) or "no constellations")


@constellation.command("show")
@click.argument("cid")
@json_option
@pass_ctx
def c_show(c: Ctx, cid: str) -> None:
    """Members, roles, tiers and the agreement guarantee of one constellation."""
    doc = c.api.call("GET", f"/v1/constellations/{parse_cid(cid)}")
    lines = [f"{doc['name']}  {doc['id']}", f"purpose  {doc['purpose']}", f"status   {doc['status']}",
             f"guarantee {doc['guarantee_text']}", "members:"]
    for m in doc["member_list"]:
        lines.append(f"  {m['member']}  {m['tier']:<11} {','.join(m['roles']) or '-':<30} {m['status']}")
    c.out(doc, "\n".join(lines))


@constellation.command("invite")
@click.argument("cid")
@click.option("--role", "roles", multiple=True,
              type=click.Choice(["investor", "producer", "customer", "facilitator"]), help="Repeatable.")
@click.option("--tier", type=click.Choice(["core", "contributor"]), default="contributor", show_default=True)
@click.option("--uses", type=click.IntRange(1, 10000), default=1, show_default=True)
@click.option("--ttl", default="7d", show_default=True, help="How long the token is valid, e.g. 30m, 7d.")
@json_option
@pass_ctx
def c_invite(c: Ctx, cid: str, roles: tuple[str, ...], tier: str, uses: int, ttl: str) -> None:
    """Print an invite token for a new member."""
    doc = c.api.call("POST", f"/v1/constellations/{parse_cid(cid)}/invites",
                     {"roles": list(roles), "tier": tier, "uses": uses, "ttl_s": parse_duration(ttl)})
    c.out(doc, doc["token"])


@constellation.command("join")
@click.argument("token")
@json_option
@pass_ctx
def c_join(c: Ctx, token: str) -> None:
    """Join a constellation with an invite token."""
    import time

    from valuemesh.protocol.invite import parse_token
    if parse_token(token).expires < time.time() * 1000:
        fail("The invite token has expired; ask for a new one.")
    doc = c.api.call("POST", "/v1/join", {"token": token})
    c.out(doc, f"joining {doc['name']} ({doc['id']}); the join is {doc['status']}")


@constellation.command("leave")
@click.argument("cid")
@json_option
@pass_ctx
def c_leave(c: Ctx, cid: str) -> None:
    """Leave a constellation (final once agreed)."""
    doc = submit(cid, "membership", {"op": "leave"})
    c.out(doc, f"leave recorded as {doc['id']} ({doc['status']})")


@constellation.command("dissolve")
@click.argument("cid")
@click.option("--reason", default="", help="Why.")
@json_option
@pass_ctx
def c_dissolve(c: Ctx, cid: str, reason: str) -> None:
    """Dissolve a constellation (facilitators only); it accepts no records after."""
    body: dict[str, Any] = {"op": "dissolve"}
    if reason:
        body["reason"] = reason
    doc = submit(cid, "membership", body)
    c.out(doc, f"dissolution recorded as {doc['id']} ({doc['status']})")


def evidence_of(path: Path) -> dict[str, str]:
    """A file as a contribution's evidence: its BLAKE2b-256 hash and its base name as a relative
    URI. Never its directory: the ledger is signed and kept forever (docs/decisions.md, 21)."""
    try:
        digest = hashlib.blake2b(path.read_bytes(), digest_size=32).hexdigest()
    except OSError as exc:
        raise LocalError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    name = path.name
    while len(quote(name)) > EVIDENCE_URI_MAX:  # (shortened by whole characters, never mid-escape)
        name = name[:-1]
    return {"uri": quote(name), "hash": digest}


@cli.command()
@click.argument("cid")
@click.option("--action", required=True,
              type=click.Choice(["work", "use", "consume", "cite", "transfer", "deliver-service", "produce"]))
@click.option("--quantity", required=True, help="A positive number, e.g. 3 or 2.5.")
@click.option("--unit", required=True, help="hour, EUR, kg, …")
@click.option("--note", default="", help="What was done.")
@click.option("--evidence", type=click.Path(exists=True, dir_okay=False),
              help="A file whose hash and base name (never its folder) are recorded.")
@click.option("--payback", type=click.Choice(["once", "debt-like", "equity-like", "gift"]), default=None)
@json_option
@pass_ctx
def contribute(c: Ctx, cid: str, action: str, quantity: str, unit: str, note: str, evidence: str | None,
               payback: str | None) -> None:
    """Record a contribution you made."""
    body: dict[str, Any] = {"op": "record", "action": action, "quantity": parse_quantity(quantity), "unit": unit}
    if note:
        body["note"] = note
    if payback:
        body["payback"] = payback
    if evidence:
        body["evidence"] = evidence_of(Path(evidence))
    doc = submit(cid, "contribution", body)
    c.out(doc, f"contribution {doc['id']} ({doc['status']})")


@cli.command()
@click.argument("cid")
@click.argument("record_id")
@click.option("--dispute", "reason", default=None, help="Dispute instead of acknowledging, with a reason.")
@json_option
@pass_ctx
def ack(c: Ctx, cid: str, record_id: str, reason: str | None) -> None:
    """Acknowledge (or dispute) another member's contribution."""
    body: dict[str, Any] = {"op": "dispute" if reason else "ack", "target": parse_hex_id(record_id)}
    if reason:
        body["reason"] = reason
    doc = submit(cid, "contribution", body)
    c.out(doc, f"{body['op']} {doc['id']} ({doc['status']})")


@cli.command()
@click.argument("cid")
@json_option
@pass_ctx
def ledger(c: Ctx, cid: str) -> None:
    """The ledger: final records in consensus order, then pending ones."""
    doc = c.api.call("GET", f"/v1/constellations/{parse_cid(cid)}/ledger")
    lines = [f"{doc['name']}  {doc['constellation']}", f"state hash {doc['state_hash']}",
             f"final ({len(doc['final'])}):"]
    for r in doc["final"]:
        flag = "" if r["status"] == "applied" else f"  [{r['status']}: {r.get('reason', '')}]"
        lines.append(f"  {r['index']:>5} {r['type']}.{r['body'].get('op')} by {r['author'][:14]}… "
                     f"seq {r['seq']}  {r['id'][:16]}{flag}")
    lines.append(f"pending ({len(doc['pending'])}):")
    for r in doc["pending"]:
        lines.append(f"        {r['type']}.{r['body'].get('op')} by {r['author'][:14]}… seq {r['seq']}  {r['id'][:16]}")
    c.out(doc, "\n".join(lines))


@cli.command("check-id")
@click.argument("member")
def check_id(member: str) -> None:
    """Check that a member id is well-formed (catches typos)."""
    click.echo(str(MemberId.parse(member)))


cli.add_command(config_group)
cli.add_command(service_group)
from valuemesh.cli.plugins import register as _register_plugins; _register_plugins(cli)  # noqa: E402, E702, I001
from valuemesh.cli.accounting import register as _register_accounting; _register_accounting(cli)  # noqa: E402, E702, I001


def main() -> None:
    cli(prog_name="valuemesh")


if __name__ == "__main__":
    main()
