"""The store's errors: what the database refused or could not do, one class per kind.

Every one is a `LocalError` carrying one sentence for the user.
"""

from __future__ import annotations

import sqlite3

from valuemesh.protocol.errors import LocalError


class StoreError(LocalError):
    """Raised when the database cannot be opened, read or written as asked."""


class StoreInUseError(StoreError):
    """Raised when another process (a running daemon, usually) holds the database's lock."""


class SchemaTooNewError(StoreError):
    """Raised when the database was written by a newer valuemesh with a newer schema."""


class NotOurDatabaseError(StoreError):
    """Raised when the file is another program's SQLite database (refused before anything is written)."""


class StoreDamagedError(StoreError):
    """Raised when SQLite's quick check finds the database damaged (refused before anything is written)."""


class FinalOrderError(StoreError):
    """Raised when a commit would leave a gap in, or rewrite, a constellation's final order."""


def store_error(e: BaseException) -> BaseException:
    """What a batch's caller is told when its batch failed: SQLite's refusals as store errors."""
    text = str(e)
    if isinstance(e, sqlite3.IntegrityError) and text.startswith("final order: "):
        return FinalOrderError(f"The store refused the batch and changed nothing: {text[13:]}.")
    if isinstance(e, sqlite3.IntegrityError) and "commits.constellation, commits.block_id" in text:
        return FinalOrderError("The store refused the batch and changed nothing: a block cannot be committed twice.")
    if isinstance(e, sqlite3.Error):
        return StoreError(f"The store refused the batch and changed nothing: {plain_sqlite_error(e)}.")
    return e


def plain_sqlite_error(e: sqlite3.Error) -> str:
    """SQLite's message, with a foreign-key failure said in the store's terms."""
    text = str(e).rstrip(".")
    if "FOREIGN KEY" in text:
        return "a row refers to a constellation, block or record that is not stored"
    return text
