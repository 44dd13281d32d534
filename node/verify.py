"""Signature checks of a large batch spread over the node's cores.

PyNaCl releases the GIL inside `crypto_sign_open`, so while the event loop's thread checks
one slice of a batch, worker threads check the others at the same time: 1.65 to 1.95 times
the checks per second on this project's 2-core host. A check is almost all C, so the threads
barely wait for each other on the GIL. The event loop's thread blocks
until the batch is done, exactly as it did while checking every signature itself, only for
a shorter time.

Small batches (a live block of a few records) stay on the calling thread: handing a slice
to a worker and waking it costs tens of microseconds, a quarter of one check.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from valuemesh.protocol.identity import SignatureCheck, first_invalid

# Below this many checks a batch is checked on the calling thread alone.
PARALLEL_MIN_CHECKS = 24
# Threads checking at once, the caller's included, unless configured (`verify_threads`).
MAX_AUTO_THREADS = 4


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class ParallelVerifier:
    """A `BatchVerifier` (valuemesh.protocol.identity) using `threads` threads, the caller's
    included; `threads=1` checks everything on the calling thread. It returns the index of the
    first failing check, as `first_invalid` does, whatever order the slices finish in."""

    def __init__(self, threads: int | None = None) -> None:
        if threads is None:
            threads = min(usable_cores(), MAX_AUTO_THREADS)
        if threads < 1:
            raise ValueError("A verifier needs at least one thread.")
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __call__(self, checks: Sequence[SignatureCheck]) -> int | None:
        bounds = self._slices(len(checks))
        if bounds is None:
            return first_invalid(checks)
        pool = self._workers()
        futures = [pool.submit(first_invalid, checks, lo, hi) for lo, hi in bounds[1:]]
        # The first slice here, on the caller's thread, while the workers check the others.
        results = [first_invalid(checks, *bounds[0])]
        results.extend(f.result() for f in futures)
        return next((r for r in results if r is not None), None)

    async def check(self, checks: Sequence[SignatureCheck]) -> int | None:
        """The index of the first failing check, or None; a large batch is checked on the
        worker threads while the event loop goes on."""
        bounds = self._slices(len(checks))
        if bounds is None:
            return first_invalid(checks)
        pool = self._workers()
        results = await asyncio.gather(*(asyncio.wrap_future(pool.submit(first_invalid, checks, lo, hi))
                                         for lo, hi in bounds))
        return next((r for r in results if r is not None), None)

    def _slices(self, n: int) -> list[tuple[int, int]] | None:
        """Contiguous slices of a batch of n checks, one per thread; None: check it in place."""
        if self.threads == 1 or n < PARALLEL_MIN_CHECKS:
            return None
        parts = min(self.threads, n // (PARALLEL_MIN_CHECKS // 2))
        return [(n * k // parts, n * (k + 1) // parts) for k in range(parts)]

    def _workers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                # As many workers as threads: `check` hands every slice to them.
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="verify")
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


class InHand:
    """Raw blocks being decoded and verified by some batch, by digest, so that a second copy
    (a restarted node gets its gap from every peer at once) is not verified again while the
    first is: the second batch skips it and waits for the first batch to be done."""

    def __init__(self) -> None:
        self._futures: dict[bytes, asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._futures)

    def claim(self, raws: Sequence[bytes], skip: Callable[[bytes], bool],
              digest: Callable[[bytes], bytes]) -> Claim:
        """Take the raws that are neither `skip`ped nor in hand (each once); the claim
        names the batches in hand holding the others. Release the claim when done."""
        claim = Claim(self)
        loop = asyncio.get_running_loop()
        for raw in raws:
            if skip(raw):
                continue
            d = digest(raw)
            other = self._futures.get(d)
            if other is not None:
                claim.earlier.add(other)
            elif d not in claim.mine:
                claim.mine[d] = loop.create_future()
                claim.fresh.append(raw)
        self._futures.update(claim.mine)
        return claim

    def _release(self, claim: Claim) -> None:
        for d, fut in claim.mine.items():
            if self._futures.get(d) is fut:
                del self._futures[d]
            if not fut.done():
                fut.set_result(None)


class Claim:
    """What one batch took (`fresh`, in order) and the earlier batches it should let in first."""

    def __init__(self, owner: InHand) -> None:
        self._owner = owner
        self.fresh: list[bytes] = []
        self.mine: dict[bytes, asyncio.Future[None]] = {}
        self.earlier: set[asyncio.Future[None]] = set()

    async def wait_earlier(self) -> None:
        if self.earlier:
            await asyncio.wait(self.earlier)

    def release(self) -> None:
        self._owner._release(self)
