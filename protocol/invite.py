"""Invite tokens: one signed string that lets a new member find and join a
constellation — its id, the inviter, addresses of members, tier and roles,
expiry and use limit. The ledger re-checks the token when the join is final.
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass

from . import cbor
from .errors import DecodeError, LocalError, RemoteError
from .identity import Identity, MemberId
from .records import blake2b256

INVITE_DOMAIN = b"valuemesh/invite/v1\x00"
TOKEN_PREFIX = "vmi1"
MAX_TOKEN_SIZE = 4096
MAX_ADDRS = 16
ROLES = ("investor", "producer", "customer", "facilitator")
TIERS = ("core", "contributor")
_KEYS = frozenset({"c", "name", "inviter", "tier", "roles", "uses", "expires", "addrs", "approve", "nonce"})


@dataclass(frozen=True, slots=True)
class Invite:
    constellation: bytes
    name: str
    inviter: MemberId
    tier: str
    roles: tuple[str, ...]
    uses: int
    expires: int
    addrs: tuple[tuple[str, int], ...]
    approve: bool
    nonce: bytes
    sig: bytes

    def payload(self) -> dict[str, object]:
        return {
            "c": self.constellation,
            "name": self.name,
            "inviter": self.inviter.key,
            "tier": self.tier,
            "roles": list(self.roles),
            "uses": self.uses,
            "expires": self.expires,
            "addrs": [[h, p] for h, p in self.addrs],
            "approve": self.approve,
            "nonce": self.nonce,
        }

    @property
    def id(self) -> bytes:
        return blake2b256(cbor.encode(self.payload()))

    def raw(self) -> bytes:
        return cbor.encode({"p": self.payload(), "sig": self.sig})

    def text(self) -> str:
        return TOKEN_PREFIX + base64.urlsafe_b64encode(self.raw()).decode().rstrip("=")

    @classmethod
    def create(
        cls,
        identity: Identity,
        *,
        constellation: bytes,
        name: str,
        tier: str,
        roles: tuple[str, ...],
        uses: int,
        expires: int,
        addrs: tuple[tuple[str, int], ...],
        nonce: bytes,
        approve: bool = False,
    ) -> Invite:
        if tier not in TIERS:
            raise LocalError(f"Tier must be one of: {', '.join(TIERS)}.")
        for r in roles:
            if r not in ROLES:
                raise LocalError(f"Role '{r}' is not one of: {', '.join(ROLES)}.")
        if not 1 <= uses <= 10_000:
            raise LocalError("An invite's use limit must be between 1 and 10000.")
        # Refuse here what decode_invite would refuse, so no one signs an unusable token.
        if not isinstance(name, str) or len(name) > 128:
            raise LocalError("An invite's constellation name must be text of at most 128 characters.")
        if not isinstance(constellation, bytes) or len(constellation) != 32:
            raise LocalError("An invite's constellation must be a 32-byte id.")
        if not isinstance(nonce, bytes) or len(nonce) != 16:
            raise LocalError("An invite's nonce must be 16 bytes.")
        if not isinstance(expires, int) or expires < 0:
            raise LocalError("An invite's expiry must be a non-negative time in ms.")
        for host, port in tuple(addrs)[:MAX_ADDRS]:
            if not (isinstance(host, str) and 0 < len(host) <= 255 and isinstance(port, int)
                    and not isinstance(port, bool) and 0 < port < 65536):
                raise LocalError(f"The address {host!r}:{port!r} is not a host and port.")
        unsigned = cls(constellation, name, identity.member, tier, tuple(sorted(set(roles))), uses,
                       expires, tuple(addrs)[:MAX_ADDRS], approve, nonce, b"")
        sig = identity.sign(INVITE_DOMAIN + cbor.encode(unsigned.payload()))
        return dataclasses.replace(unsigned, sig=sig)


def _need(cond: bool) -> None:
    if not cond:
        raise DecodeError("The invite token is malformed.")


def decode_invite(raw: bytes, *, verify: bool = True) -> Invite:
    """Decode and (by default) verify an invite's signature; raise a typed error. A node
    reads an invite unverified first, to refuse one it would refuse anyway for free."""
    m = cbor.decode(raw, max_size=MAX_TOKEN_SIZE)
    if not isinstance(m, dict) or m.keys() != {"p", "sig"}:
        raise DecodeError("The invite token is malformed.")
    p, sig = m["p"], m["sig"]
    if not isinstance(p, dict) or p.keys() != _KEYS or not isinstance(sig, bytes) or len(sig) != 64:
        raise DecodeError("The invite token is malformed.")
    # Explicit checks, not `assert`: under `python -O` asserts vanish and nodes would diverge.
    c, name, roles, addrs = p["c"], p["name"], p["roles"], p["addrs"]
    _need(isinstance(c, bytes) and len(c) == 32)
    _need(isinstance(name, str) and len(name) <= 128)
    _need(p["tier"] in TIERS)
    _need(isinstance(roles, list) and all(r in ROLES for r in roles) and roles == sorted(set(roles)))
    # bool is an int in Python; true/false must not stand in for numbers.
    _need(type(p["uses"]) is int and 1 <= p["uses"] <= 10_000)
    _need(type(p["expires"]) is int and p["expires"] >= 0)
    _need(isinstance(addrs, list) and len(addrs) <= MAX_ADDRS)
    pairs = []
    for a in addrs:
        _need(isinstance(a, list) and len(a) == 2 and isinstance(a[0], str) and 0 < len(a[0]) <= 255
              and type(a[1]) is int and 0 < a[1] < 65536)
        pairs.append((a[0], a[1]))
    _need(isinstance(p["approve"], bool))
    _need(isinstance(p["nonce"], bytes) and len(p["nonce"]) == 16)
    try:
        inviter = MemberId(p["inviter"])
    except (DecodeError, LocalError, TypeError):
        raise DecodeError("The invite token is malformed.") from None
    inv = Invite(c, name, inviter, p["tier"], tuple(roles), p["uses"], p["expires"], tuple(pairs),
                 p["approve"], p["nonce"], sig)
    if verify:
        inviter.verify(INVITE_DOMAIN + cbor.encode(inv.payload()), sig)
    return inv


def parse_token(text: str) -> Invite:
    t = text.strip() if isinstance(text, str) else ""
    if not t.startswith(TOKEN_PREFIX):
        raise LocalError("This is not a valuemesh invite token (it should start with 'vmi1').")
    body = t[len(TOKEN_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        raise LocalError("The invite token is damaged: it is not valid base64.") from None
    try:
        return decode_invite(raw)
    except RemoteError:
        raise LocalError("The invite token is damaged or was altered.") from None
