"""Signature checks of a large batch spread over the node's cores.

PyNaCl releases the GIL inside `crypto_sign_open`, so while the event loop's thread checks
one slice of a batch, worker threads check the others at the same time: 1.65 to 1.95 times
the checks per second on this project's 2-core host, because every thread is in C almost all
the time. The loop's thread blocks until the batch is done, as it did while checking every
signature itself, only for a shorter time. It must not run Python meanwhile: a worker needs
the GIL back after every check, and a loop thread busy in Python hands it over only at the
switch interval, so both slow down (measured: docs/decisions.md 18).

Small batches (a live block of a few records) stay on the calling thread: handing a slice
to a worker and waking it costs tens of microseconds, a quarter of one check.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
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

    def _slices(self, n: int) -> list[tuple[int, int]] | None:
        """Contiguous slices of a batch of n checks, one per thread; None: check it in place."""
        if self.threads == 1 or n < PARALLEL_MIN_CHECKS:
            return None
        parts = min(self.threads, n // (PARALLEL_MIN_CHECKS // 2))
        return [(n * k // parts, n * (k + 1) // parts) for k in range(parts)]

    def _workers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="verify")
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

