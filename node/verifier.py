"""Signature checks in a helper process, for catch-up streams.

A catching-up node spends about two fifths of its event loop's time checking Ed25519
signatures. A thread does not take that off the loop: PyNaCl lets go of the GIL for each
check, but the checking thread must take it back after every one (tens of microseconds of
work), and while the loop runs Python it gets it only at the loop's next switch interval
(5 ms), so the checks crawl and the two threads mostly wait for each other. A helper process
has its own interpreter: the loop decodes and applies batches while the helper checks the
next one's signatures on the other core.

The helper is started on the first batch that needs it and stopped once it has been idle
for VERIFIER_IDLE_S, so a quiescent daemon has no extra process. If it dies, checks fall
back to the calling thread and the next batch starts a new helper.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from valuemesh.protocol.errors import SignatureError
from valuemesh.protocol.identity import MemberId
from valuemesh.protocol.records import SignatureCheck, verify_checks

log = logging.getLogger("valuemesh.verifier")
VERIFIER_IDLE_S = 30.0


def first_bad(checks: list[tuple[bytes, bytes, bytes]]) -> int:
    """The index of the first (member key, message, signature) that does not verify, or -1.
    Runs in the helper process."""
    for i, (key, message, sig) in enumerate(checks):
        try:
            MemberId(key).verify(message, sig)
        except SignatureError:
            return i
    return -1


class Verifier:
    """A one-process pool for signature checks, started on demand and stopped when idle.

    The helper takes a while to start (a fresh interpreter: 0.3 s on an idle host, over a
    second on a loaded one), so `start` only launches it, and until it has answered once,
    checks run on the calling thread: a short catch-up never waits for the helper."""

    def __init__(self, idle_s: float = VERIFIER_IDLE_S) -> None:
        self._idle_s = idle_s
        self._pool: ProcessPoolExecutor | None = None
        self._ready = False
        self._busy = 0
        self._last = 0.0

    @property
    def running(self) -> bool:
        return self._pool is not None

    @property
    def ready(self) -> bool:
        return self._ready

    def start(self) -> None:
        """Launch the helper if it is not running (returns at once)."""
        self._last = time.monotonic()
        if self._pool is not None:
            return
        # spawn, not fork: the daemon has threads (SQLite's), and a fork copies their locks.
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        self._pool = pool

        def answered(f: Future[int]) -> None:
            if self._pool is pool and not f.cancelled() and f.exception() is None:
                self._ready = True

        try:
            pool.submit(first_bad, []).add_done_callback(answered)
        except (BrokenProcessPool, OSError, RuntimeError) as exc:
            log.warning("the signature helper process did not start (%s)", type(exc).__name__)
            self._stop()

    async def check(self, checks: list[SignatureCheck]) -> None:
        """Raise SignatureError for the first check that fails, as `verify_checks` would."""
        self._last = time.monotonic()
        pool = self._pool
        if not checks or pool is None or not self._ready:
            verify_checks(checks)
            return
        self._busy += 1
        try:
            bad = await asyncio.wrap_future(pool.submit(first_bad, [(c.author.key, c.message, c.sig) for c in checks]))
        except (BrokenProcessPool, OSError, RuntimeError) as exc:
            log.warning("the signature helper process failed (%s); checking on the loop", type(exc).__name__)
            if self._pool is pool:
                self._stop()
            verify_checks(checks)
            return
        finally:
            self._busy -= 1
            self._last = time.monotonic()
        if bad >= 0:
            checks[bad].verify()  # raises its SignatureError, with its message
            raise SignatureError("A signature does not verify.")  # the helper and we disagree: refuse

    def stop_if_idle(self) -> None:
        if self._pool is not None and not self._busy and time.monotonic() - self._last >= self._idle_s:
            self._stop()

    def close(self) -> None:
        self._stop()

    def _stop(self) -> None:
        pool, self._pool, self._ready = self._pool, None, False
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.shutdown(wait=False, cancel_futures=True)
