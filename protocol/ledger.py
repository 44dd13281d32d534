"""The ledger state machine: applies finalised records, in consensus order,
through their plugins, and exposes a deterministic state hash.

State is a flat map from `namespace/key` to canonical CBOR bytes, so every
value is immutable, float-free and hashes the same on every node. Each
record's changes are staged in an overlay and merged only if its plugin's
`validate` and `apply` both succeed: a failing or crashing plugin rejects that
record and leaves the state exactly as it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from . import cbor
from .errors import AuthorizationError, SequenceError, ValidationError, ValuemeshError
from .identity import MemberId
from .plugins import Plugin, Registry
from .records import Record

MAX_DEFERRED_PER_AUTHOR = 256
# Across all authors: keys are free to make, so a per-author bound alone would
# let records from endless fresh keys (seq > 0, never filled) grow memory.
MAX_DEFERRED_TOTAL = 65_536
STATE_HASH_DOMAIN = b"valuemesh/state/v1\x00"
MEMBERSHIP = "membership"
# Decoded state values the ledger keeps for its own authorisation checks (member entries,
# the policy); past this many it starts again, so fresh keys cannot grow it without bound.
MAX_DECODED = 4096


@dataclass(frozen=True, slots=True)
class Outcome:
    """What applying one final record did: applied, rejected, deferred or duplicate."""

    status: str
    record: Record
    reason: str = ""

    @property
    def applied(self) -> bool:
        return self.status == "applied"


@dataclass(frozen=True, slots=True)
class LedgerParts:
    """What `Ledger.parts` copies out: the state entries, each author's record ids by seq,
    the deferred records with their consensus times, and the applied-record count."""

    constellation: bytes
    data: dict[str, bytes]
    applied: dict[bytes, list[bytes]]
    deferred: list[tuple[Record, int]]
    applied_count: int


class StateReader:
    """Read-only access to ledger state, namespaced by plugin name."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, bytes]) -> None:
        self._data = data

    def read(self, namespace: str, key: str) -> Any:
        raw = self._data.get(f"{namespace}/{key}")
        return None if raw is None else cbor.decode(raw)

    def scan(self, namespace: str, prefix: str = "") -> Iterator[tuple[str, Any]]:
        """Yield (key, value) of `namespace` whose key starts with `prefix`, sorted."""
        full = f"{namespace}/{prefix}"
        cut = len(namespace) + 1
        for k in sorted(k for k in self._data if k.startswith(full)):
            yield k[cut:], cbor.decode(self._data[k])

    def member(self, key: bytes) -> dict[str, Any] | None:
        m = self.read(MEMBERSHIP, f"m/{key.hex()}")
        return m if isinstance(m, dict) else None

    def is_active(self, key: bytes) -> bool:
        m = self.member(key)
        return m is not None and m.get("status") == "active"

    def has_role(self, key: bytes, role: str) -> bool:
        m = self.member(key)
        return m is not None and m.get("status") == "active" and role in m.get("roles", [])

    def policy(self) -> dict[str, Any]:
        p = self.read(MEMBERSHIP, "policy")
        return p if isinstance(p, dict) else {}


class ApplyContext(StateReader):
    """What a plugin sees while validating or applying one record.

    Reads see the committed state plus this record's own staged writes; writes
    go to the plugin's own namespace only and land only if the record applies.
    """

    __slots__ = ("_overlay", "namespace", "now", "op")

    def __init__(self, data: Mapping[str, bytes], namespace: str, op: str, now: int) -> None:
        super().__init__(data)
        self._overlay: dict[str, bytes | None] = {}
        self.namespace = namespace
        self.op = op
        self.now = now

    def read(self, namespace: str, key: str) -> Any:
        full = f"{namespace}/{key}"
        if full in self._overlay:
            raw = self._overlay[full]
        else:
            raw = self._data.get(full)
        return None if raw is None else cbor.decode(raw)

    def scan(self, namespace: str, prefix: str = "") -> Iterator[tuple[str, Any]]:
        full = f"{namespace}/{prefix}"
        cut = len(namespace) + 1
        keys = {k for k in self._data if k.startswith(full)}
        keys |= {k for k in self._overlay if k.startswith(full)}
        for k in sorted(keys):
            raw = self._overlay[k] if k in self._overlay else self._data.get(k)
            if raw is not None:
                yield k[cut:], cbor.decode(raw)

    def get(self, key: str) -> Any:
        return self.read(self.namespace, key)

    def put(self, key: str, value: Any) -> None:
        self._overlay[f"{self.namespace}/{key}"] = cbor.encode(value)

    def delete(self, key: str) -> None:
        self._overlay[f"{self.namespace}/{key}"] = None

    def writes(self) -> dict[str, bytes | None]:
        return self._overlay


class Ledger:
    """One constellation's ledger, rebuilt identically by every node.

    Feed it final records in consensus order with `apply`; `now` is the
    consensus time of the block that carried the record (the same everywhere).
    """

    def __init__(self, registry: Registry, constellation: bytes) -> None:
        self.registry = registry
        self.constellation = constellation
        self._data: dict[str, bytes] = {}
        self._next_seq: dict[bytes, int] = {}
        self._applied_ids: dict[tuple[bytes, int], bytes] = {}
        self._deferred: dict[bytes, dict[int, tuple[Record, int]]] = {}
        self._deferred_total = 0
        self._hash: bytes | None = None
        # key -> (the bytes object in _data it was decoded from, the decoded value): every
        # record's authorisation reads its author's member entry and the policy, and
        # decoding them again each time was a fifth of applying a record. State values
        # are immutable bytes, so `is` against the current value proves the entry current.
        # These values never leave the ledger: a plugin could change one in place.
        self._decoded: dict[str, tuple[bytes, Any]] = {}
        self.applied_count = 0
        self.committee_version = 0

    # -- reading -------------------------------------------------------------
    @property
    def reader(self) -> StateReader:
        return StateReader(self._data)

    @property
    def founded(self) -> bool:
        return f"{MEMBERSHIP}/meta" in self._data

    @property
    def dissolved(self) -> bool:
        return self.reader.read(MEMBERSHIP, "dissolved") is True

    def next_seq(self, author: MemberId) -> int:
        return self._next_seq.get(author.key, 0)

    def member_status(self, key: bytes) -> str | None:
        """Member `key`'s status ("active", "applicant", "left", …) or None if not a member;
        as `reader.member(key)["status"]`, without decoding the entry again while it is
        unchanged (nodes ask this for every message and every peer they send to)."""
        m = self._read_own(f"{MEMBERSHIP}/m/{key.hex()}")
        status = m.get("status") if isinstance(m, dict) else None
        return status if isinstance(status, str) else None

    def state_hash(self) -> bytes:
        if self._hash is None:
            h = hashlib.blake2b(STATE_HASH_DOMAIN, digest_size=32)
            for k in sorted(self._data):
                kb = k.encode()
                v = self._data[k]
                h.update(len(kb).to_bytes(4, "big") + kb + len(v).to_bytes(4, "big") + v)
            self._hash = h.digest()
        return self._hash

    def committee(self) -> tuple[tuple[MemberId, int], ...]:
        """Active core members and their weights, sorted by key."""
        out = []
        for key, m in self.reader.scan(MEMBERSHIP, "m/"):
            if m.get("status") == "active" and m.get("tier") == "core":
                out.append((MemberId(bytes.fromhex(key[2:])), int(m.get("weight", 1))))
        return tuple(sorted(out, key=lambda mw: mw[0].key))

    # -- snapshots (see protocol/snapshot.py) --------------------------------
    def parts(self) -> LedgerParts:
        """A copy of everything a snapshot holds, cheap enough to take between two records
        (the encoding can then run elsewhere while the ledger goes on)."""
        # Every used seq slot has its id (seq 0 to next - 1), so place them without sorting.
        applied: dict[bytes, list[bytes]] = {a: [b""] * n for a, n in self._next_seq.items()}
        for (author, seq), rid in self._applied_ids.items():
            applied[author][seq] = rid
        return LedgerParts(self.constellation, dict(self._data), applied, list(self.deferred()), self.applied_count)

    def entries(self) -> Iterator[tuple[str, bytes]]:
        """Every state entry, sorted by key."""
        for k in sorted(self._data):
            yield k, self._data[k]

    def deferred(self) -> Iterator[tuple[Record, int]]:
        """Records waiting for an earlier seq of their author, by (author, seq)."""
        for author in sorted(self._deferred):
            for seq in sorted(self._deferred[author]):
                yield self._deferred[author][seq]

    @classmethod
    def restore(
        cls,
        registry: Registry,
        constellation: bytes,
        data: dict[str, bytes],
        applied: dict[bytes, list[bytes]],
        deferred: list[tuple[Record, int]],
        applied_count: int,
    ) -> Ledger:
        """Rebuild a ledger from what `entries`, `applied_ids` and `deferred` gave out.

        Raises ValidationError if the parts do not fit together (a seq counter that
        disagrees with the applied ids, a deferred record that is not ahead of its author).
        """
        led = cls(registry, constellation)
        led._data = data
        # Every used seq slot has its id (a rejected record uses its slot too, without
        # writing the state's seq entry), so the ids, not the state, give the next seq.
        for author, ids in applied.items():
            if len(author) != 32 or not ids:
                raise ValidationError("A snapshot's applied record ids are malformed.")
            led._next_seq[author] = len(ids)
            for seq, rid in enumerate(ids):
                led._applied_ids[(author, seq)] = rid
        prefix = "ledger/seq/"
        for k, v in data.items():
            if k.startswith(prefix):
                nxt = cbor.decode(v)
                try:
                    author = bytes.fromhex(k[len(prefix):])
                except ValueError:
                    raise ValidationError("A snapshot's seq entry names no author key.") from None
                if not isinstance(nxt, int) or isinstance(nxt, bool) or not 0 < nxt <= led._next_seq.get(author, 0):
                    raise ValidationError("A snapshot's applied record ids do not match its seq counters.")
        if len(deferred) > MAX_DEFERRED_TOTAL:
            raise ValidationError("A snapshot holds too many records out of sequence.")
        for rec, now in deferred:
            waiting = led._deferred.setdefault(rec.author.key, {})
            if rec.constellation != constellation or rec.seq <= led._next_seq.get(rec.author.key, 0) \
                    or rec.seq in waiting or len(waiting) >= MAX_DEFERRED_PER_AUTHOR:
                raise ValidationError("A snapshot's deferred record is not one the ledger could hold.")
            waiting[rec.seq] = (rec, now)
        led._deferred_total = len(deferred)
        led.applied_count = applied_count
        return led

    # -- applying ------------------------------------------------------------
    def check(self, record: Record, now: int) -> None:
        """Raise a typed error if `record` would not apply now; change nothing.

        Core nodes use this to refuse invalid records before proposing them.
        """
        if record.constellation != self.constellation:
            raise ValidationError("The record belongs to another constellation.")
        if record.seq != self.next_seq(record.author):
            raise SequenceError(
                f"Record seq {record.seq} is not the author's next ({self.next_seq(record.author)})."
            )
        self._stage(record, now)

    def precheck(self, record: Record, now: int) -> None:
        """Like `check` but without the seq rule: for records that will queue
        behind the author's other pending ones."""
        self._stage(record, now)

    def apply(self, record: Record, now: int) -> list[Outcome]:
        """Apply one final record; return outcomes (a gap-filling record may
        release deferred ones, which are applied right after it)."""
        if record.constellation != self.constellation:
            return [Outcome("rejected", record, "The record belongs to another constellation.")]
        author = record.author.key
        nxt = self._next_seq.get(author, 0)
        if record.seq < nxt:
            if self._applied_ids.get((author, record.seq)) == record.id:
                return [Outcome("duplicate", record)]
            return [Outcome("rejected", record, "The record reuses a seq its author already used.")]
        if record.seq > nxt:
            waiting = self._deferred.setdefault(author, {})
            if record.seq in waiting:
                same = waiting[record.seq][0].id == record.id
                return [Outcome("duplicate" if same else "rejected", record,
                                "" if same else "The record reuses a seq its author already used.")]
            if len(waiting) >= MAX_DEFERRED_PER_AUTHOR:
                return [Outcome("rejected", record, "The author has too many records out of sequence.")]
            if self._deferred_total >= MAX_DEFERRED_TOTAL:
                if not waiting:
                    del self._deferred[author]
                return [Outcome("rejected", record, "The ledger holds too many records out of sequence.")]
            waiting[record.seq] = (record, now)
            self._deferred_total += 1
            return [Outcome("deferred", record)]
        outcomes = [self._apply_in_sequence(record, now)]
        pending = self._deferred.get(author)
        while pending and self._next_seq.get(author, 0) in pending:
            rec, t = pending.pop(self._next_seq[author])
            self._deferred_total -= 1
            outcomes.append(self._apply_in_sequence(rec, t))
        if pending is not None and not pending:
            del self._deferred[author]
        return outcomes

    def _apply_in_sequence(self, record: Record, now: int) -> Outcome:
        author = record.author.key
        # The seq slot is used whatever happens next, so a rejected record
        # never blocks its author's later ones.
        self._next_seq[author] = record.seq + 1
        self._applied_ids[(author, record.seq)] = record.id
        try:
            writes = self._stage(record, now)
        except ValuemeshError as exc:
            return Outcome("rejected", record, exc.message)
        for k, v in writes.items():
            if v is None:
                self._data.pop(k, None)
            else:
                self._data[k] = v
        self._data[f"ledger/seq/{author.hex()}"] = cbor.encode(record.seq + 1)
        if any(k.startswith(f"{MEMBERSHIP}/m/") for k in writes):
            self.committee_version += 1
        self._hash = None
        self.applied_count += 1
        return Outcome("applied", record)

    def _stage(self, record: Record, now: int) -> dict[str, bytes | None]:
        # Everything that runs plugin code is inside the try: a plugin's own
        # check_body may raise anything too, and the seq slot is already taken.
        plugin_name = record.type
        try:
            plugin, op = self.registry.check(record)
            plugin_name = plugin.name
            self._authorize(plugin, op, record)
            # A read-only view: a plugin can change state only through ctx.put/delete.
            ctx = ApplyContext(MappingProxyType(self._data), plugin.name, op, now)
            plugin.validate(ctx, record)
            plugin.apply(ctx, record)
        except ValuemeshError:
            raise
        except Exception as exc:  # a plugin bug must never break the node
            raise ValidationError(
                f"Plugin '{plugin_name}' failed on this record ({type(exc).__name__}: {exc})."
            ) from None
        return ctx.writes()

    def _read_own(self, key: str) -> Any:
        """The decoded state value at `key` for the ledger's own checks (see `_decoded`)."""
        raw = self._data.get(key)
        if raw is None:
            return None
        hit = self._decoded.get(key)
        if hit is not None and hit[0] is raw:
            return hit[1]
        value = cbor.decode(raw)
        if len(self._decoded) >= MAX_DECODED:
            self._decoded.clear()
        self._decoded[key] = (raw, value)
        return value

    def _authorize(self, plugin: Plugin, op: str, record: Record) -> None:
        # The same rules as StateReader.is_active / has_role / policy on the committed state
        # (the record has staged nothing yet), read through `_read_own`.
        if not self.founded:
            if not (plugin.name == MEMBERSHIP and op == "genesis"):
                raise ValidationError("The constellation has no genesis yet.")
            return
        if self.dissolved:
            raise AuthorizationError("The constellation is dissolved; it accepts no more records.")
        is_join = plugin.name == MEMBERSHIP and op == "join"
        m = self._read_own(f"{MEMBERSHIP}/m/{record.author.key.hex()}")
        active = isinstance(m, dict) and m.get("status") == "active"
        if not is_join and not active:
            raise AuthorizationError(f"{record.author.short}… is not an active member.")
        policy = self._read_own(f"{MEMBERSHIP}/policy")
        reserved = (policy if isinstance(policy, dict) else {}).get("reserve", {}).get(f"{plugin.name}.{op}")
        if reserved and not any(active and r in m.get("roles", []) for r in reserved):
            raise AuthorizationError(
                f"Only members with the role {' or '.join(reserved)} may do '{plugin.name}.{op}'."
            )
