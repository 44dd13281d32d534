"""The `membership` plugin: genesis, invitations, joins, admission, roles,
tiers, weights, leaving, removal and dissolution of a constellation.

Its state is what the ledger's authorisation rules read: `m/<key hex>` per
member, `meta`, `policy`, `invite/<token id hex>` and `dissolved`.
"""

from __future__ import annotations

from typing import Any

from .. import cbor
from ..errors import AuthorizationError, DecodeError, PluginError, ValidationError
from ..invite import ROLES, TIERS, decode_invite
from ..ledger import ApplyContext
from ..plugins import Field, Plugin, Version, integer, text
from ..records import Record, blake2b256

CONSTELLATION_DOMAIN = b"valuemesh/constellation/v1\x00"
MAX_WEIGHT = 1000
DEFAULT_RESERVE = {
    "membership.remove": ["facilitator"],
    "membership.roles": ["facilitator"],
    "membership.weight": ["facilitator"],
    "membership.dissolve": ["facilitator"],
}

_role = text(16, choices=ROLES)
_member_entry = Field(
    "map",
    fields={
        "key": Field("member"),
        "name": text(64, required=False),
        "roles": Field("list", item=_role, max=4),
        "tier": text(16, choices=TIERS),
        "weight": integer(1, MAX_WEIGHT),
    },
)
_plugin_entry = Field("list", item=text(32), max=2)


def constellation_id(founder_key: bytes, genesis_body: dict[str, Any]) -> bytes:
    """A constellation's id: the hash of its founder and genesis body (incl. a nonce)."""
    return blake2b256(CONSTELLATION_DOMAIN + founder_key + cbor.encode(genesis_body))


class Membership(Plugin):
    name = "membership"
    version = Version(1, 0)
    description = "Who is in a constellation, with which roles and tier, and who may do what."
    ops = {
        "genesis": {
            "name": text(128),
            "purpose": text(1000, required=False),
            "nonce": Field("bytes", max_len=32),
            "members": Field("list", item=_member_entry, max=64),
            "plugins": Field("list", item=_plugin_entry, max=64),
            "policy": Field("map", required=False, fields={
                "reserve": Field("list", required=False, max=64, item=Field("list", item=text(64), max=5)),
            }),
        },
        "invite": {"token": Field("bytes", max_len=4096)},
        "revoke": {"invite": Field("hash")},
        "join": {"token": Field("bytes", max_len=4096), "name": text(64, required=False)},
        "admit": {"member": Field("member")},
        "roles": {"member": Field("member"), "roles": Field("list", item=_role, max=4)},
        "weight": {"member": Field("member"), "weight": integer(1, MAX_WEIGHT)},
        "leave": {"reason": text(500, required=False)},
        "remove": {"member": Field("member"), "reason": text(500)},
        "dissolve": {"reason": text(500, required=False)},
    }

    def validate(self, ctx: ApplyContext, record: Record) -> None:
        getattr(self, f"_check_{ctx.op}")(ctx, record)

    def apply(self, ctx: ApplyContext, record: Record) -> None:
        getattr(self, f"_apply_{ctx.op}")(ctx, record)

    # genesis ---------------------------------------------------------------
    def _check_genesis(self, ctx: ApplyContext, record: Record) -> None:
        b = record.body
        if ctx.get("meta") is not None:
            raise ValidationError("The constellation already has a genesis.")
        if record.seq != 0:
            raise ValidationError("A genesis must be its founder's first record.")
        if constellation_id(record.author.key, dict(b)) != record.constellation:
            raise ValidationError("The genesis does not hash to its constellation id.")
        keys = [m["key"] for m in b["members"]]
        if record.author.key not in keys:
            raise ValidationError("The founder must be among the founding members.")
        if len(set(keys)) != len(keys):
            raise ValidationError("A founding member is listed twice.")
        if not any(m["tier"] == "core" for m in b["members"]):
            raise ValidationError("A constellation needs at least one core member.")
        names = [p[0] for p in b["plugins"]]
        if "membership" not in names or len(set(names)) != len(names):
            raise ValidationError("The genesis must name each plugin once, membership included.")
        for p in b["plugins"]:
            if len(p) != 2:
                raise DecodeError("Each genesis plugin entry is [name, version].")
            try:
                Version.parse(p[1])
            except PluginError:
                # PluginError blames the local node; a bad genesis is the author's fault.
                raise ValidationError(f"The genesis names plugin '{p[0]}' with a bad version.") from None
        for entry in b.get("policy", {}).get("reserve", []):
            if len(entry) < 2:
                raise DecodeError("Each reserve entry is [action, role, …].")
            if any(r not in ROLES for r in entry[1:]):
                raise ValidationError("A reserve entry names an unknown role.")

    def _apply_genesis(self, ctx: ApplyContext, record: Record) -> None:
        b = record.body
        reserve = dict(DEFAULT_RESERVE)
        for entry in b.get("policy", {}).get("reserve", []):
            reserve[entry[0]] = list(entry[1:])
        ctx.put("meta", {
            "name": b["name"],
            "purpose": b.get("purpose", ""),
            "founder": record.author.key,
            "created": ctx.now,
            "plugins": {p[0]: p[1] for p in b["plugins"]},
        })
        ctx.put("policy", {"reserve": reserve})
        for m in b["members"]:
            ctx.put(f"m/{m['key'].hex()}", {
                "name": m.get("name", ""),
                "roles": sorted(set(m["roles"])),
                "tier": m["tier"],
                "weight": m["weight"],
                "status": "active",
                "since": ctx.now,
            })

    # invitations -----------------------------------------------------------
    def _token(self, ctx: ApplyContext, record: Record) -> Any:
        inv = decode_invite(record.body["token"])
        if inv.constellation != record.constellation:
            raise ValidationError("The invite is for another constellation.")
        return inv

    def _may_invite(self, ctx: ApplyContext, key: bytes) -> None:
        m = ctx.member(key)
        if m is None or m.get("status") != "active" or m.get("tier") != "core":
            raise AuthorizationError("Only active core members can invite.")
        reserved = ctx.policy().get("reserve", {}).get("membership.invite")
        if reserved and not any(r in m.get("roles", []) for r in reserved):
            raise AuthorizationError(f"Only members with the role {' or '.join(reserved)} may invite.")

    def _check_invite(self, ctx: ApplyContext, record: Record) -> None:
        inv = self._token(ctx, record)
        if inv.inviter != record.author:
            raise AuthorizationError("Only the inviter can publish their invite.")
        self._may_invite(ctx, record.author.key)

    def _apply_invite(self, ctx: ApplyContext, record: Record) -> None:
        inv = self._token(ctx, record)
        key = f"invite/{inv.id.hex()}"
        cur = ctx.get(key) or {"used": 0, "revoked": False}
        ctx.put(key, {**cur, "inviter": inv.inviter.key, "tier": inv.tier, "uses": inv.uses,
                      "expires": inv.expires})

    def _check_revoke(self, ctx: ApplyContext, record: Record) -> None:
        cur = ctx.get(f"invite/{record.body['invite'].hex()}")
        if cur is None or "inviter" not in cur:
            raise ValidationError("There is no published invite with that id.")
        if cur["inviter"] != record.author.key and not ctx.has_role(record.author.key, "facilitator"):
            raise AuthorizationError("Only the inviter or a facilitator can revoke an invite.")

    def _apply_revoke(self, ctx: ApplyContext, record: Record) -> None:
        key = f"invite/{record.body['invite'].hex()}"
        ctx.put(key, {**ctx.get(key), "revoked": True})

    def _check_join(self, ctx: ApplyContext, record: Record) -> None:
        inv = self._token(ctx, record)
        self._may_invite(ctx, inv.inviter.key)
        used = ctx.get(f"invite/{inv.id.hex()}") or {"used": 0, "revoked": False}
        if used["revoked"]:
            raise ValidationError("The invite was revoked.")
        if used["used"] >= inv.uses:
            raise ValidationError("The invite has no uses left.")
        if ctx.now > inv.expires:
            raise ValidationError("The invite expired before the join became final.")
        m = ctx.member(record.author.key)
        if m is not None and m.get("status") in ("active", "applicant", "removed"):
            raise ValidationError(f"{record.author.short}… cannot join: they are already {m['status']}.")

    def _apply_join(self, ctx: ApplyContext, record: Record) -> None:
        inv = self._token(ctx, record)
        key = f"invite/{inv.id.hex()}"
        used = ctx.get(key) or {"used": 0, "revoked": False}
        ctx.put(key, {**used, "used": used["used"] + 1})
        ctx.put(f"m/{record.author.key.hex()}", {
            "name": record.body.get("name", ""),
            "roles": list(inv.roles),
            "tier": inv.tier,
            "weight": 1,
            "status": "applicant" if inv.approve else "active",
            "since": ctx.now,
            "invited_by": inv.inviter.key,
        })

    def _check_admit(self, ctx: ApplyContext, record: Record) -> None:
        self._may_invite(ctx, record.author.key)
        m = ctx.member(record.body["member"])
        if m is None or m.get("status") != "applicant":
            raise ValidationError("Only an applicant can be admitted.")

    def _apply_admit(self, ctx: ApplyContext, record: Record) -> None:
        key = f"m/{record.body['member'].hex()}"
        ctx.put(key, {**ctx.get(key), "status": "active", "since": ctx.now})

    # roles, weights, leaving ------------------------------------------------
    def _active_target(self, ctx: ApplyContext, record: Record) -> dict[str, Any]:
        m = ctx.member(record.body["member"])
        if m is None or m.get("status") != "active":
            raise ValidationError("That member is not active in this constellation.")
        return m

    def _check_roles(self, ctx: ApplyContext, record: Record) -> None:
        self._active_target(ctx, record)

    def _apply_roles(self, ctx: ApplyContext, record: Record) -> None:
        key = f"m/{record.body['member'].hex()}"
        ctx.put(key, {**ctx.get(key), "roles": sorted(set(record.body["roles"]))})

    def _check_weight(self, ctx: ApplyContext, record: Record) -> None:
        if self._active_target(ctx, record).get("tier") != "core":
            raise ValidationError("Only core members have a weight in agreement.")

    def _apply_weight(self, ctx: ApplyContext, record: Record) -> None:
        key = f"m/{record.body['member'].hex()}"
        ctx.put(key, {**ctx.get(key), "weight": record.body["weight"]})

    def _remaining_core(self, ctx: ApplyContext, leaving: bytes) -> int:
        return sum(
            1 for k, m in ctx.scan(self.name, "m/")
            if m.get("status") == "active" and m.get("tier") == "core" and k[2:] != leaving.hex()
        )

    def _check_leave(self, ctx: ApplyContext, record: Record) -> None:
        m = ctx.member(record.author.key)
        if m and m.get("tier") == "core" and self._remaining_core(ctx, record.author.key) == 0:
            raise ValidationError("The last core member cannot leave; dissolve the constellation instead.")

    def _apply_leave(self, ctx: ApplyContext, record: Record) -> None:
        key = f"m/{record.author.key.hex()}"
        ctx.put(key, {**ctx.get(key), "status": "left", "until": ctx.now})

    def _check_remove(self, ctx: ApplyContext, record: Record) -> None:
        if record.body["member"] == record.author.key:
            raise ValidationError("Use 'leave' to leave; a member cannot remove themselves.")
        m = self._active_target(ctx, record)
        if m.get("tier") == "core" and self._remaining_core(ctx, record.body["member"]) == 0:
            raise ValidationError("The last core member cannot be removed.")

    def _apply_remove(self, ctx: ApplyContext, record: Record) -> None:
        key = f"m/{record.body['member'].hex()}"
        ctx.put(key, {**ctx.get(key), "status": "removed", "until": ctx.now,
                      "reason": record.body["reason"]})

    def _check_dissolve(self, ctx: ApplyContext, record: Record) -> None:
        pass

    def _apply_dissolve(self, ctx: ApplyContext, record: Record) -> None:
        ctx.put("dissolved", True)
        ctx.put("dissolution", {"by": record.author.key, "at": ctx.now,
                                "reason": record.body.get("reason", "")})

    def examples(self) -> list[dict[str, Any]]:
        return [
            {"op": "leave", "reason": "moving on"},
            {"op": "roles", "member": b"\x01" * 32, "roles": ["producer", "investor"]},
            {"op": "remove", "member": b"\x02" * 32, "reason": "asked to"},
            {"op": "weight", "member": b"\x03" * 32, "weight": 2},
            {"op": "dissolve"},
        ]


PLUGIN = Membership()


def make_genesis(
    founder: Any,
    *,
    name: str,
    purpose: str,
    nonce: bytes,
    created: int,
    plugins: dict[str, str],
    members: list[dict[str, Any]] | None = None,
    reserve: dict[str, list[str]] | None = None,
) -> Record:
    """Sign the genesis record of a new constellation; its id follows from it.

    `founder` is an Identity; by default the founder is the only (core)
    member with the facilitator role. `nonce` makes two constellations of the
    same founder and name distinct (the caller passes randomness in).
    """
    if members is None:
        members = [{"key": founder.member.key, "roles": ["facilitator"], "tier": "core", "weight": 1}]
    body: dict[str, Any] = {
        "op": "genesis",
        "name": name,
        "nonce": nonce,
        "members": members,
        "plugins": sorted([[k, v] for k, v in {"membership": str(Membership.version), **plugins}.items()]),
    }
    if purpose:
        body["purpose"] = purpose
    if reserve:
        body["policy"] = {"reserve": sorted([[k, *v] for k, v in reserve.items()])}
    PLUGIN.check_body(body)
    cid = constellation_id(founder.member.key, body)
    return Record.create(founder, type="membership", v=Membership.version.major, constellation=cid,
                         seq=0, body=body, created=created)
