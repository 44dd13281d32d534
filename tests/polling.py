"""Waiting in tests on things that happen over real sockets: poll a condition until it holds
or a deadline passes, without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_for(pred: Callable[[], object], timeout: float) -> bool:
    """True as soon as `pred()` is true; False if it is still false after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        if pred():
            return True
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return bool(pred())
