"""Log lines that a stranger can cause, kept to one per interval: `LogLimiter` writes the first
line of a burst and then at most one per interval saying how many were left out, and
`limit_accept_errors` does that for the event loop's "out of file descriptors" accept errors.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

# One line per this many seconds for each kind of repeating event.
LOG_INTERVAL = 10.0
# The accept errors asyncio reports through the loop's exception handler, one per failed
# accept() (Python 3.11 reports up to the listen backlog of them per readiness event).
_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class LogLimiter:
    """One kind of repeating log line, written at most once per `interval` seconds."""

    __slots__ = ("_clock", "_interval", "_last", "_log", "suppressed", "total")

    def __init__(self, log: logging.Logger, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self.suppressed = 0  # left out since the last line written
        self.total = 0

    def log(self, level: int, msg: str, *args: object) -> bool:
        """Write the line unless one was written less than `interval` ago; True if written."""
        self.total += 1
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self.suppressed += 1
            return False
        if self.suppressed:
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, self.suppressed, now - self._last if self._last is not None else 0.0)
        self._last = now
        self.suppressed = 0
        self._log.log(level, msg, *args)
        return True


_accept_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LogLimiter] = (
    weakref.WeakKeyDictionary()
)


def limit_accept_errors(loop: asyncio.AbstractEventLoop, log: logging.Logger) -> LogLimiter:
    """Make `loop` log running out of file descriptors on accept() as one line per interval,
    without a traceback; every other exception goes to the handler it had before. Idempotent."""
    limiter = _accept_limiters.get(loop)
    if limiter is not None:
        return limiter
    limiter = _accept_limiters[loop] = LogLimiter(log)
    previous = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS and "accept" in str(context.get("message")):
            limiter.log(logging.ERROR, "cannot accept connections: %s", exc.strerror or exc)
        elif "_start_serving" in repr(context.get("handle")):
            # A retry each failed accept scheduled, firing after its listener closed.
            limiter.log(logging.ERROR, "cannot accept connections: %s", exc)
        elif previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return limiter


class LogKinds:
    """One `LogLimiter` per kind of event (any hashable name), made on first use: each kind of
    refusal gets its own line per interval, and one kind's flood cannot hide another."""

    __slots__ = ("_level", "_limiters", "_log")

    def __init__(self, log: logging.Logger, level: int = logging.INFO) -> None:
        self._log = log
        self._level = level
        self._limiters: dict[object, LogLimiter] = {}

    def log(self, kind: object, msg: str, *args: object) -> bool:
        limiter = self._limiters.get(kind)
        if limiter is None:
            limiter = self._limiters[kind] = LogLimiter(self._log)
        return limiter.log(self._level, msg, *args)
