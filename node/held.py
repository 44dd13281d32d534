"""What a home remembers beside its database: the constellations it followed and how far this
member's own seqs went in each (`held.json`), so a lost, emptied or older database can never
start as a new node that signs a seq a second time (docs/storage.md, Sequence numbers).

`open_home_store` is how the daemon opens its store: it refuses a database that holds less
than the home remembers, unless the operator chose recovery, and hands the home's floors to
the store, which never gives out a seq below them.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from valuemesh.node.home import HELD_FILE, Home, write_private
from valuemesh.node.store import Store
from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.identity import MemberId

# What to do when the database holds less than the home remembers (cli/main.py's daemon).
RECOVER_HINT = ("restore node.db from a backup, load archives with 'valuemesh import FILE', or start with "
                "'valuemesh daemon --recover' to go on with what the database holds")


@dataclass
class Held:
    """Per constellation, the seq after the last record of ours this home is known to have signed."""

    path: Path
    floors: dict[bytes, int] = field(default_factory=dict)
    dirty: bool = False
    # Constellations whose last own seq this start cannot vouch for (`open_home_store`):
    # node/seqcheck.py asks peers before the signer signs there again.
    doubt: set[bytes] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, home: Home) -> Held | None:
        """The home's record, or None when it has none (a home made before valuemesh kept one)."""
        path = home.path / HELD_FILE
        try:
            doc = json.loads(path.read_bytes())
            floors = {bytes.fromhex(k): int(v) for k, v in doc["constellations"].items()}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise LocalError(f"{path} is damaged; restore it from a backup of this home, or remove it and "
                             f"start with 'valuemesh daemon --recover'.") from None
        if any(len(k) != 32 or v < 0 for k, v in floors.items()):
            raise LocalError(f"{path} is damaged; restore it from a backup of this home, or remove it and "
                             f"start with 'valuemesh daemon --recover'.")
        return cls(path, floors)

    def raise_to(self, cid: bytes, next_seq: int) -> bool:
        """Remember that our seqs in `cid` reached `next_seq`; whether that is news."""
        if next_seq <= self.floors.get(cid, -1):
            return False
        self.floors[cid] = next_seq
        self.dirty = True
        return True

    def save(self) -> None:
        """Write the file (blocking: call it on a thread from the event loop). Floors only grow,
        and the snapshot is taken under the lock, so the last write holds the newest floors."""
        with self._lock:
            self.dirty = False
            doc = {"v": 1, "constellations": {k.hex(): v for k, v in sorted(self.floors.items())}}
            write_private(self.path, (json.dumps(doc, indent=1) + "\n").encode())


async def open_home_store(home: Home, member: MemberId, *, recover: bool = False) -> tuple[Store, Held]:
    """Open the home's store, refusing one that holds less than the home remembers.

    Refused (one sentence, nothing written) unless `recover`: the home has an identity and its
    database is missing or empty while the home followed constellations (or keeps no record at
    all: a home from before `held.json`); or the database lacks a constellation the home
    followed. Otherwise the home's floors are pushed into the store and the record is updated
    with what the store holds.
    """
    held = Held.load(home)
    db = home.db_file
    empty = not db.exists() or db.stat().st_size == 0
    if home.initialised and empty and not recover:
        if held is None:
            raise LocalError(f"This home holds an identity but its database {db} is missing or empty and nothing "
                             f"records what it held; {RECOVER_HINT}.")
        if held.floors:
            raise LocalError(f"This home followed {len(held.floors)} constellation(s) but its database {db} is "
                             f"missing or empty, and starting afresh could sign a seq twice; {RECOVER_HINT}.")
    store = await Store.open(db)
    try:
        followed = {c.id for c in await store.constellations()}
        doubt = set(followed) if held is None or recover else set()
        if held is None:
            held = Held(home.path / HELD_FILE, dirty=True)
        missing = set(held.floors) - followed
        if missing and not recover:
            raise LocalError(f"This home followed {len(missing)} constellation(s) that its database {db} does not "
                             f"hold (it is older than the home), and starting could sign a seq twice; "
                             f"{RECOVER_HINT}.")
        for cid, floor in held.floors.items():
            if floor > await store.next_seq(cid, member):
                doubt.add(cid)  # the database is older than the home: the floor itself may lag a write
                await store.raise_seq_floor(cid, member, floor)
        for cid in followed:
            held.raise_to(cid, await store.next_seq(cid, member))
        held.doubt = doubt & followed
        if held.dirty:
            await asyncio.to_thread(held.save)
    except BaseException:
        await store.close()
        raise
    return store, held
