"""The plugin conformance kit and test constellations, for plugin authors and our own tests.

`check_plugin` checks any record-type plugin (encoding round trip, refusal of
malformed bodies, determinism and purity of `apply`); `TestConstellation`
founds a constellation in memory so that a test can sign and apply records.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import cbor
from .builtin import builtin_registry
from .builtin.membership import make_genesis
from .errors import DecodeError, LocalError, ValidationError
from .identity import Identity, MemberId
from .invite import ROLES, Invite
from .ledger import ApplyContext, Ledger, Outcome
from .plugins import Field, Plugin, Registry, Version
from .records import Record, decode_record

__all__ = ["Report", "TestConstellation", "check_plugin", "malformed_bodies"]

# Consensus time of the genesis and the step between applied records: any
# fixed values do; they only need to be the same on every run.
GENESIS_TIME = 1_700_000_000_000
STEP_MS = 1_000
DEFAULT_SEED = b"valuemesh-test-constellation"
UNKNOWN_FIELD = "zz_not_in_schema"
UNKNOWN_OP = "zz_no_such_op"

RegistryFactory = Callable[[], Registry]


def _identity(seed: bytes, index: int) -> Identity:
    return Identity(hashlib.blake2b(seed + index.to_bytes(4, "big"), digest_size=32).digest())


class TestConstellation:
    """A founded constellation in memory: a genesis, `n_members` members, a ledger.

    Member 0 founds it. `roles[i]` gives member i's roles (default: member 0
    holds every role, the others are producers); `tiers[i]` their tier
    (default core). Identities derive from `seed`, so two instances built with
    the same arguments are identical, record for record. Index n_members and
    up (via `identity`) are outsiders with keys but no membership.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        n_members: int = 3,
        *,
        roles: Mapping[int, Sequence[str]] | Sequence[Sequence[str]] | None = None,
        tiers: Mapping[int, str] | Sequence[str] | None = None,
        plugins: Iterable[Plugin] = (),
        registry_factory: RegistryFactory | None = None,
        seed: bytes = DEFAULT_SEED,
        reserve: Mapping[str, list[str]] | None = None,
        name: str = "test constellation",
    ) -> None:
        if not 1 <= n_members <= 64:
            raise LocalError("A test constellation has 1 to 64 members.")
        self.seed = seed
        self.n_members = n_members
        self.registry = _registry_with(registry_factory, list(plugins))
        self.members = [_identity(seed, i) for i in range(n_members)]
        self.now = GENESIS_TIME
        self._seq: dict[bytes, int] = {}
        self._nonces = 0
        entries = []
        for i, ident in enumerate(self.members):
            member_roles = _pick(roles, i, list(ROLES) if i == 0 else ["producer"])
            tier = _pick(tiers, i, "core")
            entries.append({"key": ident.member.key, "roles": sorted(set(member_roles)),
                            "tier": tier, "weight": 1})
        used = {n: str(p.version) for n, p in self.registry.plugins.items() if n != "membership"}
        self.genesis = make_genesis(
            self.members[0], name=name, purpose="", nonce=hashlib.blake2b(seed, digest_size=16).digest(),
            created=GENESIS_TIME, plugins=used, members=entries, reserve=dict(reserve) if reserve else None,
        )
        self._seq[self.members[0].member.key] = 1
        self.ledger = self.fresh_ledger()
        self.log: list[Record] = [self.genesis]

    # -- identities ------------------------------------------------------------
    @property
    def constellation(self) -> bytes:
        return self.genesis.constellation

    def identity(self, index: int) -> Identity:
        """Member `index`, or for index >= n_members an outsider with a fixed key."""
        return self.members[index] if index < self.n_members else _identity(self.seed, index)

    def member(self, index: int) -> MemberId:
        return self.identity(index).member

    # -- records ---------------------------------------------------------------
    def sign(
        self,
        who: int | Identity,
        type: str,
        body: Mapping[str, Any],
        *,
        seq: int | None = None,
        v: int | None = None,
        created: int | None = None,
    ) -> Record:
        """Sign a record by member `who` (an index or an Identity) with its next seq."""
        ident = self.identity(who) if isinstance(who, int) else who
        key = ident.member.key
        if seq is None:
            seq = self._seq.get(key, 0)
        self._seq[key] = max(self._seq.get(key, 0), seq + 1)
        if v is None:
            plugin = self.registry.plugins.get(type)
            v = plugin.version.major if plugin is not None else 1
        return Record.create(ident, type=type, v=v, constellation=self.constellation, seq=seq,
                             body=body, created=self.now if created is None else created)

    def apply(self, record: Record) -> Outcome:
        """Apply one record as final at the next consensus time; return its outcome."""
        return self.apply_all(record)[0]

    def apply_all(self, record: Record) -> list[Outcome]:
        """Apply one record; also return the outcomes of deferred records it released."""
        self.now += STEP_MS
        self.log.append(record)
        return self.ledger.apply(record, self.now)

    def post(self, who: int | Identity, type: str, body: Mapping[str, Any]) -> Outcome:
        """Sign and apply in one step."""
        return self.apply(self.sign(who, type, body))

    def fresh_ledger(self) -> Ledger:
        """A new ledger of this constellation holding only the genesis."""
        ledger = Ledger(self.registry, self.constellation)
        out = ledger.apply(self.genesis, GENESIS_TIME)
        if not out[0].applied:
            raise AssertionError(f"The test genesis did not apply: {out[0].reason}")
        return ledger

    def state_hash(self) -> bytes:
        return self.ledger.state_hash()

    # -- membership helpers ------------------------------------------------------
    def invite(
        self,
        inviter: int,
        *,
        tier: str = "contributor",
        roles: Sequence[str] = ("producer",),
        uses: int = 1,
        expires: int | None = None,
        approve: bool = False,
        publish: bool = True,
    ) -> Invite:
        """An invite token signed by member `inviter`; published on the ledger if `publish`."""
        self._nonces += 1
        nonce = hashlib.blake2b(self.seed + b"invite" + self._nonces.to_bytes(4, "big"),
                                digest_size=16).digest()
        inv = Invite.create(
            self.identity(inviter), constellation=self.constellation, name="test constellation",
            tier=tier, roles=tuple(roles), uses=uses,
            expires=self.now + 3_600_000 if expires is None else expires,
            addrs=(("127.0.0.1", 7300),), nonce=nonce, approve=approve,
        )
        if publish:
            out = self.post(inviter, "membership", {"op": "invite", "token": inv.raw()})
            if not out.applied:
                raise AssertionError(f"Publishing the invite was refused: {out.reason}")
        return inv

    def join(self, who: int | Identity, invite: Invite, name: str = "") -> Record:
        """Sign (not apply) `who`'s join record carrying `invite`."""
        body: dict[str, Any] = {"op": "join", "token": invite.raw()}
        if name:
            body["name"] = name
        return self.sign(who, "membership", body)


def _pick(choice: Mapping[int, Any] | Sequence[Any] | None, i: int, default: Any) -> Any:
    if choice is None:
        return default
    if isinstance(choice, Mapping):
        return choice.get(i, default)
    return choice[i] if i < len(choice) else default


def _registry_with(factory: RegistryFactory | None, plugins: list[Plugin]) -> Registry:
    base = factory() if factory is not None else builtin_registry()
    names = {p.name for p in plugins}
    reg = Registry()
    for name, p in base.plugins.items():
        if name not in names:
            reg.register(p)
    for p in plugins:
        reg.register(p)
    return reg


# -- the conformance kit ---------------------------------------------------------


@dataclass
class Report:
    """The checks `check_plugin` ran, all passed, in order."""

    plugin: str
    checks: list[str] = field(default_factory=list)

    def ok(self, check: str) -> None:
        self.checks.append(check)

    def __str__(self) -> str:
        return f"plugin '{self.plugin}': {len(self.checks)} checks passed"


def _wrong_values(spec: Field, example: object) -> list[tuple[str, object]]:
    """Values that `spec` must refuse, each with what is wrong about it."""
    k = spec.kind
    out: list[tuple[str, object]] = []
    if k == "text":
        out += [("an integer instead of text", 7), ("bytes instead of text", b"x")]
        out.append(("text over its maximum length", "x" * (spec.max_len + 1)))
        if spec.choices is not None:
            bad = "zz"
            while bad in spec.choices:
                bad += "z"
            out.append(("text that is not one of the choices", bad[: max(1, spec.max_len)]))
    elif k == "int":
        out += [("text instead of an integer", "7"), ("a boolean instead of an integer", True)]
        if spec.min is not None:
            out.append(("an integer below the minimum", spec.min - 1))
        if spec.max is not None:
            out.append(("an integer above the maximum", spec.max + 1))
    elif k == "bytes":
        out += [("text instead of bytes", "x"), ("bytes over the maximum length", b"x" * (spec.max_len + 1))]
    elif k in ("hash", "member"):
        out += [("text instead of bytes", "x"), ("31 bytes instead of 32", b"\x00" * 31),
                ("33 bytes instead of 32", b"\x00" * 33)]
    elif k == "bool":
        out += [("an integer instead of a boolean", 1), ("text instead of a boolean", "true")]
    elif k == "decimal":
        out += [("an integer instead of a decimal string", 1), ("a negative decimal", "-1"),
                ("an exponent", "1e3"), ("a leading zero", "01"), ("too many decimals", "1.1234567"),
                ("a trailing newline", "1\n")]
    elif k == "list":
        assert spec.item is not None
        out.append(("a map instead of a list", {}))
        for why, v in _wrong_values(spec.item, None)[:1]:
            out.append((f"a list item that is {why}", [v]))
        if isinstance(example, list) and example:
            limit = spec.max if spec.max is not None else 64
            out.append(("a list with too many items", [example[0]] * (limit + 1)))
    elif k == "map":
        assert spec.fields is not None
        out.append(("a list instead of a map", []))
        if isinstance(example, dict):
            for why, v in _variants(spec.fields, example):
                out.append((f"a nested map with {why}", v))
    return out


def _variants(fields: Mapping[str, Field], body: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Malformed versions of `body` (a valid map for `fields`), each with its fault."""
    out: list[tuple[str, dict[str, Any]]] = []
    for name, spec in fields.items():
        if spec.required and name in body:
            b = copy.deepcopy(dict(body))
            del b[name]
            out.append((f"the required field '{name}' dropped", b))
    b = copy.deepcopy(dict(body))
    b[UNKNOWN_FIELD] = 1
    out.append((f"an unknown field '{UNKNOWN_FIELD}'", b))
    for name, spec in fields.items():
        for why, value in _wrong_values(spec, body.get(name)):
            b = copy.deepcopy(dict(body))
            b[name] = value
            out.append((f"field '{name}' as {why}", b))
    return out


def malformed_bodies(plugin: Plugin, body: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Malformed variants of a valid `body`, derived from its op's declarative fields."""
    op = body.get("op")
    if not isinstance(op, str) or op not in plugin.ops:
        raise LocalError("The body's op is not one of the plugin's ops.")
    out = _variants(plugin.ops[op], {k: v for k, v in body.items() if k != "op"})
    out = [(why, {"op": op, **b}) for why, b in out]
    rest = {k: copy.deepcopy(v) for k, v in body.items() if k != "op"}
    out.append((f"an unknown op '{UNKNOWN_OP}'", {"op": UNKNOWN_OP, **rest}))
    out.append(("no op at all", dict(rest)))
    out.append(("an op that is not text", {"op": 1, **rest}))
    return out


def _reordered(value: Any) -> Any:
    """The same value with every map's insertion order reversed."""
    if isinstance(value, dict):
        return {k: _reordered(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reordered(v) for v in value]
    return value


def _fingerprint(obj: object) -> object:
    """A comparable snapshot of an object's attributes, to detect hidden state."""
    attrs = dict(getattr(obj, "__dict__", {}))
    cls_mutable = {
        k: v for k, v in vars(type(obj)).items() if isinstance(v, (dict, list, set, bytearray))
    }
    try:
        return copy.deepcopy((attrs, cls_mutable))
    except Exception:  # an attribute that cannot be copied is compared by repr
        return repr((attrs, cls_mutable))


class _AfterApplyFailure(Exception):
    pass


class _FailingPlugin(Plugin):
    """Runs the real plugin's validate and apply, then raises: nothing may stick."""

    inner: Plugin
    armed = False  # off while the test constellation's genesis applies

    def check_body(self, body: Mapping[str, Any]) -> str:
        return self.inner.check_body(body)

    def validate(self, ctx: ApplyContext, record: Record) -> None:
        self.inner.validate(ctx, record)

    def apply(self, ctx: ApplyContext, record: Record) -> None:
        self.inner.apply(ctx, record)
        if self.armed:
            raise _AfterApplyFailure("injected by the conformance kit after apply")


def _failing_twin(plugin: Plugin) -> Plugin:
    cls = type(f"Failing_{plugin.name}", (_FailingPlugin,),
               {"name": plugin.name, "version": plugin.version, "ops": plugin.ops})
    twin = cls()
    assert isinstance(twin, _FailingPlugin)
    twin.inner = plugin
    return twin


def _fail(plugin: Plugin, message: str) -> AssertionError:
    return AssertionError(f"Plugin '{plugin.name}': {message}")


def check_plugin(
    plugin: Plugin,
    *,
    registry_factory: RegistryFactory | None = None,
    examples: Sequence[Mapping[str, Any]] | None = None,
    members: int = 3,
) -> Report:
    """Check a plugin against the plugin API; raise AssertionError on the first failure.

    Uses `examples` (default: `plugin.examples()`) as valid bodies. The plugin
    is checked in a registry from `registry_factory` (default: the built-in
    plugins) in which it replaces any plugin of the same name.
    """
    if not isinstance(plugin, Plugin):
        raise AssertionError(f"{plugin!r} is not a valuemesh Plugin.")
    report = Report(plugin.name)
    if not isinstance(plugin.version, Version) or not plugin.ops:
        raise _fail(plugin, "needs a Version and at least one op.")
    Registry().register(plugin)  # name, API version and schema rules, with the registry's messages
    report.ok("registers")
    bodies = [dict(b) for b in (examples if examples is not None else plugin.examples())]
    if not bodies:
        raise _fail(plugin, "gives no example bodies; examples() must return at least one.")

    tc = TestConstellation(members, plugins=[plugin], registry_factory=registry_factory)
    ops_seen: set[str] = set()
    for i, body in enumerate(bodies):
        tag = f"example {i} ({plugin.name}.{body.get('op')})"
        try:
            op = plugin.check_body(body)
        except (DecodeError, ValidationError) as exc:
            raise _fail(plugin, f"{tag} is refused by its own schema: {exc}") from None
        if op != body.get("op"):
            raise _fail(plugin, f"{tag}: check_body returned op '{op}', not the body's op.")
        ops_seen.add(op)
        report.ok(f"{tag}: accepted by check_body")
        _check_round_trip(plugin, tc, body, tag)
        report.ok(f"{tag}: signed record round-trips through CBOR")
        _check_malformed(plugin, tc, body, tag)
        report.ok(f"{tag}: malformed variants refused with typed errors, state unchanged")

    _check_purity(plugin, bodies, members, registry_factory)
    report.ok("apply writes only through ctx and leaves plugin and records unchanged")
    _check_determinism(plugin, bodies, members, registry_factory)
    report.ok("apply is deterministic (two ledgers, reordered maps, same outcomes and hashes)")
    _check_failure_isolation(plugin, bodies, members, registry_factory)
    report.ok("an exception after apply leaves the state hash unchanged")
    _check_views(plugin, tc)
    report.ok("views run on the resulting state")
    missing = set(plugin.ops) - ops_seen
    if missing:
        report.ok(f"(ops without an example, so unchecked: {', '.join(sorted(missing))})")
    return report


def _check_round_trip(plugin: Plugin, tc: TestConstellation, body: dict[str, Any], tag: str) -> None:
    rec = tc.sign(0, plugin.name, body)
    try:
        back = decode_record(rec.raw)
    except (DecodeError, ValidationError) as exc:
        raise _fail(plugin, f"{tag}: its signed record does not decode: {exc}") from None
    if back != rec or back.id != rec.id or back.raw != rec.raw:
        raise _fail(plugin, f"{tag}: the decoded record differs from the signed one.")
    if cbor.encode(back.body) != cbor.encode(body):
        raise _fail(plugin, f"{tag}: the body does not survive encoding unchanged.")
    if plugin.check_body(back.body) != body["op"]:
        raise _fail(plugin, f"{tag}: the decoded body is read as another op.")


def _check_malformed(plugin: Plugin, tc: TestConstellation, body: dict[str, Any], tag: str) -> None:
    for why, bad in malformed_bodies(plugin, body):
        try:
            plugin.check_body(bad)
        except (DecodeError, ValidationError):
            pass
        except Exception as exc:
            raise _fail(plugin, f"{tag} with {why} raised {type(exc).__name__} "
                                "instead of DecodeError or ValidationError.") from None
        else:
            raise _fail(plugin, f"{tag} with {why} was accepted by check_body.")
        before = tc.state_hash()
        out = tc.apply(tc.sign(0, plugin.name, bad))
        if out.applied or tc.state_hash() != before:
            raise _fail(plugin, f"{tag} with {why} changed the ledger.")


def _sequence(plugin: Plugin, tc: TestConstellation, bodies: list[dict[str, Any]]) -> list[Record]:
    """Each example signed by each member in turn: a fixed sequence of records."""
    return [tc.sign(j % tc.n_members, plugin.name, b)
            for j, b in enumerate(body for _ in range(tc.n_members) for body in bodies)]


def _check_determinism(plugin: Plugin, bodies: list[dict[str, Any]], members: int,
                       factory: RegistryFactory | None) -> None:
    a = TestConstellation(members, plugins=[plugin], registry_factory=factory)
    b = TestConstellation(members, plugins=[plugin], registry_factory=factory)
    recs_a = _sequence(plugin, a, bodies)
    recs_b = _sequence(plugin, b, bodies)
    applied = 0
    first_refusal = ""
    for n, (ra, rb) in enumerate(zip(recs_a, recs_b, strict=True)):
        if ra.raw != rb.raw:
            raise _fail(plugin, "two identical test constellations signed different bytes.")
        # Same signed record, but the plugin sees maps built in another order.
        oa = [(o.status, o.reason) for o in a.apply_all(ra)]
        ob = [(o.status, o.reason) for o in b.apply_all(dataclasses.replace(rb, body=_reordered(rb.body)))]
        if oa != ob or a.state_hash() != b.state_hash():
            raise _fail(plugin, f"applying record {n} ({ra.body.get('op')}) gave different "
                                f"results on two ledgers: {oa} vs {ob}.")
        applied += sum(1 for status, _ in oa if status == "applied")
        first_refusal = first_refusal or next((r for st, r in oa if st == "rejected"), "")
    # Determinism of an apply that never runs proves nothing.
    if not applied:
        raise _fail(plugin, "none of its examples applies in a test constellation, so apply "
                            f"cannot be checked; the first refusal was: {first_refusal}")
    replay = a.fresh_ledger()
    now = GENESIS_TIME
    for rec in a.log[1:]:
        now += STEP_MS
        replay.apply(rec, now)
    if replay.state_hash() != a.state_hash():
        raise _fail(plugin, "replaying the same records into a fresh ledger gave another state hash.")


def _check_purity(plugin: Plugin, bodies: list[dict[str, Any]], members: int,
                  factory: RegistryFactory | None) -> None:
    tc = TestConstellation(members, plugins=[plugin], registry_factory=factory)
    for rec in _sequence(plugin, tc, bodies):
        before_plugin = _fingerprint(plugin)
        before_body = cbor.encode(rec.body)
        tc.apply(rec)
        if _fingerprint(plugin) != before_plugin:
            raise _fail(plugin, f"applying a '{rec.body.get('op')}' record changed the plugin object's "
                                "attributes; state must live in the ledger, written through ctx.")
        if cbor.encode(rec.body) != before_body:
            raise _fail(plugin, f"applying a '{rec.body.get('op')}' record changed the record's body.")


def _check_failure_isolation(plugin: Plugin, bodies: list[dict[str, Any]], members: int,
                             factory: RegistryFactory | None) -> None:
    good = TestConstellation(members, plugins=[plugin], registry_factory=factory)
    twin = _failing_twin(plugin)
    bad = TestConstellation(members, plugins=[twin], registry_factory=factory)
    assert isinstance(twin, _FailingPlugin)
    twin.armed = True
    for ra, rb in zip(_sequence(plugin, good, bodies), _sequence(plugin, bad, bodies), strict=True):
        good.apply(ra)
        before = bad.state_hash()
        out = bad.apply(rb)
        if out.applied or bad.state_hash() != before:
            raise _fail(plugin, "a record whose apply raised still changed the ledger state.")


def _check_views(plugin: Plugin, tc: TestConstellation) -> None:
    for name, view in plugin.views().items():
        try:
            view(tc.ledger.reader)
        except Exception as exc:
            raise _fail(plugin, f"view '{name}' raised {type(exc).__name__}: {exc}.") from None
