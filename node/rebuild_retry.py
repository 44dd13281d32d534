"""When the engine tries again to rebuild its memory from the store after failed writes.

A rebuild only reads, so on a disk that is still full it succeeds and the next write fails
again; a rebuild replays the whole store. So the count is of failures since the last write
the store took, rebuilds that failed and writes that failed alike: the first is retried at
once (a passing error), the next after `base_ms`, doubling up to `cap_ms` (a disk that stays
full), and a write that succeeds starts the count again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RebuildRetry:
    base_ms: int
    cap_ms: int
    failures: int = 0  # since the last write the store took
    at: int = 0  # no rebuild before this instant (ms)

    def failed(self, now: int) -> int:
        """Count one failure at `now`; the instant to try rebuilding again."""
        wait = min(self.base_ms << min(self.failures - 1, 16), self.cap_ms) if self.failures else 0
        self.failures += 1
        self.at = now + wait
        return self.at
