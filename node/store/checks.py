"""Argument checks and page limits shared by the store's writes and reads.

A bad argument raises `LocalError` at the call, before anything touches the database.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Final

from valuemesh.protocol.errors import LocalError
from valuemesh.protocol.records import HASH_LEN, Block, Record

MAX_PAGE: Final = 10_000
# Raw bytes one page of blocks may hold (iter_blocks), whatever the blocks' sizes.
MAX_PAGE_BYTES: Final = 32 * 1024 * 1024
# Rows per multi-row VALUES statement: 5 parameters each stays far below SQLite's variable limit.
CHUNK: Final = 200


def need(cond: bool, message: str) -> None:
    if not cond:
        raise LocalError(message)


def is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_hash(value: object, what: str) -> bytes:
    need(isinstance(value, bytes) and len(value) == HASH_LEN, f"{what} must be a 32-byte hash.")
    assert isinstance(value, bytes)
    return value


def check_time(value: object, what: str) -> int:
    need(is_uint(value), f"{what} must be a non-negative integer of milliseconds.")
    assert isinstance(value, int)
    return value


def check_limit(limit: int) -> None:
    need(is_uint(limit) and 0 < limit <= MAX_PAGE, f"A page holds 1 to {MAX_PAGE} rows.")


def check_ids(ids: Sequence[bytes]) -> list[bytes]:
    # Lookups by id often come straight from a peer's request, so bound them here as well.
    need(len(ids) <= MAX_PAGE, f"At most {MAX_PAGE} ids can be looked up at once.")
    return list(ids)


def check_position(*values: int | None) -> None:
    need(all(v is None or is_uint(v) for v in values), "Rounds and indexes must be non-negative integers.")


def check_block(block: object) -> Block:
    need(isinstance(block, Block), "Only decoded and verified Block objects can be stored.")
    assert isinstance(block, Block)
    need(len(block.id) == HASH_LEN and len(block.raw) > 0, "A block to store must carry its id and raw bytes.")
    return block


def check_record(record: object) -> Record:
    need(isinstance(record, Record), "Only decoded and verified Record objects can be stored.")
    assert isinstance(record, Record)
    need(len(record.id) == HASH_LEN and len(record.raw) > 0, "A record to store must carry its id and raw bytes.")
    return record


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
