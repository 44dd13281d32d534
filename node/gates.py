"""The checks a peer's records, proofs, join requests and history requests pass before this
node does any costly work for them: membership, constellation and budgets (node/budgets.py)
first, signatures only after, so what a stranger or a flooding member sends costs a cheap check.

Each gate answers with a `Refusal` (one plain sentence, and whether the data was invalid or
only over a budget, which sets the sender's penalty); nothing a gate refuses changes state.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from valuemesh.node.budgets import Attempts, Budgets, ByteWindows
from valuemesh.node.engine import Engine
from valuemesh.protocol.errors import ValuemeshError
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.invite import Invite, decode_invite
from valuemesh.protocol.records import EquivocationProof, Record


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a peer's data was refused; `invalid` if no honest node would have sent it."""

    reason: str
    invalid: bool


def is_join(r: Record) -> bool:
    return r.type == "membership" and r.body.get("op") == "join"


def invite_refusal(eng: Engine, inv: Invite, joiner: MemberId, now_ms: int) -> str | None:
    """Why the ledger would refuse a join by `joiner` with `inv` today, from what this node
    holds and without checking a signature; None if it may be worth verifying."""
    if inv.constellation != eng.cid:
        return "The invite is for another constellation."
    if now_ms > inv.expires:
        return "The invite has expired."
    inviter = eng.ledger.reader.member(inv.inviter.key)
    if inviter is None or inviter.get("status") != "active" or inviter.get("tier") != "core":
        return "The invite's inviter is not an active core member."
    used = eng.ledger.reader.read("membership", f"invite/{inv.id.hex()}") or {}
    if used.get("revoked"):
        return "The invite was revoked."
    if used.get("used", 0) >= inv.uses:
        return "The invite has no uses left."
    if eng.ledger.member_status(joiner.key) in ("active", "applicant", "removed"):
        return "The joiner is a member already."
    return None


class RecordGate:
    """Which of a peer's records are worth verifying: the constellation's, by members (or a
    stranger's own join), within the seq window, and inside their author's budgets."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets
        self.stored = ByteWindows(budgets.stored_bytes_per_s, budgets.stored_burst_bytes)

    def screen(self, eng: Engine, sender: MemberId, recs: Sequence[Record], now: float,
               now_ms: int) -> tuple[list[Record], list[Refusal]]:
        """The records new to this node that pass; the refusals of the others. Records held
        already (pending here, or their seq final) are neither: they cost nothing more."""
        b = self.budgets
        stranger = not eng.may_receive(sender)
        if stranger:
            if len(recs) > b.join_batch or not all(r.author == sender and is_join(r) for r in recs):
                return [], [Refusal("A peer that is not a member may send only its own join record.", True)]
        keep: list[Record] = []
        refused: list[Refusal] = []
        taken: Counter[bytes] = Counter()
        taken_bytes: Counter[bytes] = Counter()
        highest: dict[bytes, int] = {}
        for r in recs:
            a = r.author.key
            if r.constellation != eng.cid:
                refused.append(Refusal("The record is for another constellation.", True))
                continue
            final_next = eng.ledger.next_seq(r.author)
            if r.seq < final_next or (r.id in eng.pending and not stranger):
                continue  # (a stranger's join pending here still makes it an applicant again)
            if is_join(r):
                why = self._join_refusal(eng, r, now_ms)
                if why is not None:
                    refused.append(Refusal(why, True))
                    continue
            elif eng.ledger.member_status(a) is None:
                refused.append(Refusal("The record's author is not a member.", True))
                continue
            if a not in highest:
                highest[a] = max(final_next - 1, eng.pending.highest_seq(a))
            if r.seq > highest[a] + b.seq_window:
                refused.append(Refusal(f"The record's seq is more than {b.seq_window} ahead of its author's "
                                       "latest.", True))
                continue
            if (eng.pending.records_of(a) + taken[a] >= b.pending_share_records
                    or eng.pending.bytes_of(a) + taken_bytes[a] + len(r.raw) > b.pending_share_bytes):
                refused.append(Refusal("The author has its share of pending records already; "
                                       "try again once some are final.", False))
                continue
            if taken_bytes[a] + len(r.raw) > self.stored.room((eng.cid, a), now):
                refused.append(Refusal("The author has stored its budget of bytes for now; try again later.", False))
                continue
            taken[a] += 1
            taken_bytes[a] += len(r.raw)
            highest[a] = max(highest[a], r.seq)
            keep.append(r)
        return keep, refused

    @staticmethod
    def _join_refusal(eng: Engine, r: Record, now_ms: int) -> str | None:
        token = r.body.get("token")
        if not isinstance(token, bytes):
            return "The join record carries no invite."
        try:
            inv = decode_invite(token, verify=False)
        except ValuemeshError as exc:
            return exc.message
        return invite_refusal(eng, inv, r.author, now_ms)

    def charge(self, eng: Engine, records: Sequence[Record], now: float) -> None:
        """Count stored records against their authors' byte budgets (once verified)."""
        for r in records:
            self.stored.spend((eng.cid, r.author.key), len(r.raw), now)


class ProofGate:
    """Equivocation proofs: from an active member, about this constellation, naming a member,
    and at most `proofs_per_author` kept per author."""

    def __init__(self, budgets: Budgets, count: Callable[[bytes, MemberId], Awaitable[int]]) -> None:
        self.budgets = budgets
        self._count_stored = count
        self._kept: dict[tuple[bytes, bytes], int] = {}

    async def screen(self, eng: Engine, sender: MemberId, proof: EquivocationProof) -> Refusal | None:
        """A refusal, or None if the proof is worth verifying and keeping."""
        if eng.ledger.member_status(sender.key) != "active":
            return Refusal("Only an active member may send equivocation proofs.", True)
        try:
            cid, author = proof.slot()
        except ValuemeshError as exc:
            return Refusal(exc.message, True)
        if cid != eng.cid:
            return Refusal("The equivocation proof is about another constellation.", True)
        if eng.ledger.member_status(author.key) is None:
            return Refusal("The equivocation proof names someone who is not a member.", True)
        if await self.kept(eng.cid, author) >= self.budgets.proofs_per_author:
            return Refusal("This node keeps enough proofs of that author already.", False)
        return None

    async def kept(self, cid: bytes, author: MemberId) -> int:
        key = (cid, author.key)
        if key not in self._kept:
            self._kept[key] = await self._count_stored(cid, author)
        return self._kept[key]

    def stored(self, cid: bytes, author: MemberId) -> None:
        key = (cid, author.key)
        self._kept[key] = self._kept.get(key, 0) + 1


class JoinGate:
    """Join attempts outstanding per peer and per invite (welcomed, not a member yet)."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets
        self.attempts = Attempts(budgets.join_attempt_ttl_s)

    def refusal(self, eng: Engine, peer: MemberId, inv: Invite) -> Refusal | None:
        b = self.budgets
        if self.attempts.holds(peer.key, inv.id):
            return None
        a = self.attempts
        if a.per_peer(peer.key) >= b.join_attempts_per_peer or a.per_invite(inv.id) >= b.join_attempts_per_invite:
            # Joins that became final are attempts no longer (looked for only at the bound).
            a.forget_peers(lambda key: eng.ledger.member_status(key) is not None)  # type: ignore[arg-type]
        if self.attempts.per_peer(peer.key) >= b.join_attempts_per_peer:
            return Refusal("This peer has too many join attempts under way.", False)
        if self.attempts.per_invite(inv.id) >= b.join_attempts_per_invite:
            return Refusal("This invite has too many join attempts under way; try again later.", False)
        return None

    def start(self, eng: Engine, peer: MemberId, inv: Invite, now: float) -> None:
        self.attempts.start(peer.key, inv.id, now)
        eng.applicants.add(peer.key)

    def expire(self, engines: Sequence[Engine], now: float) -> None:
        """Forget attempts past their time; a peer left with none is no applicant any more."""
        for key in self.attempts.expire(now):
            for eng in engines:
                eng.applicants.discard(key)


class HistoryGate:
    """Bytes of history served per peer (a token bucket: a request waits for its budget, at
    most `history_max_wait_s`) and gap streams running per peer at once."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets
        self.served = ByteWindows(budgets.history_bytes_per_s, budgets.history_burst_bytes)
        self._streams: dict[bytes, tuple[asyncio.Semaphore, int]] = {}

    def wait_for(self, peer: MemberId, nbytes: int, now: float) -> float:
        """Seconds until `peer` may be sent `nbytes` more (0: now)."""
        short = nbytes - self.served.room(peer.key, now)
        return 0.0 if short <= 0 else short / self.served.rate

    def spend(self, peer: MemberId, nbytes: int, now: float) -> float:
        """Count `nbytes` served to `peer`; return how long to wait before sending them."""
        return self.served.spend(peer.key, nbytes, now)

    @asynccontextmanager
    async def stream_slot(self, peer: MemberId) -> AsyncIterator[None]:
        """Hold one of the peer's stream slots while a gap streams (the others wait)."""
        sem, users = self._streams.get(peer.key, (asyncio.Semaphore(self.budgets.history_streams_per_peer), 0))
        self._streams[peer.key] = (sem, users + 1)
        try:
            async with sem:
                yield
        finally:
            sem, users = self._streams[peer.key]
            if users <= 1:
                del self._streams[peer.key]
            else:
                self._streams[peer.key] = (sem, users - 1)


class Gates:
    """One node's gates, sharing its budgets: gossip, joining and catch-up each use theirs."""

    def __init__(self, budgets: Budgets, count_proofs: Callable[[bytes, MemberId], Awaitable[int]]) -> None:
        self.budgets = budgets
        self.records = RecordGate(budgets)
        self.proofs = ProofGate(budgets, count_proofs)
        self.joins = JoinGate(budgets)
        self.history = HistoryGate(budgets)
