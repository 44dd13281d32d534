"""The node's wall clock in the unit the protocol takes time in (ms since the epoch).

`protocol/` never reads the clock; every collaborator of the node that feeds it time reads it here.
"""

from __future__ import annotations

import time


def now_ms() -> int:
    return int(time.time() * 1000)
