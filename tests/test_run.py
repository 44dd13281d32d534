"""Running the daemon: one JSON object per log line (with the constellation and epoch when
a line names them, the traceback of an internal error). The settings it runs with are checked
in node/settings.py (tests/test_settings.py)."""

from __future__ import annotations

import json
import logging
import sys

from valuemesh.node.run import _JsonFormatter


def _record(msg: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("valuemesh.daemon", logging.WARNING, __file__, 1, msg, (), None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_a_log_line_is_one_json_object_with_its_context() -> None:
    doc = json.loads(_JsonFormatter().format(_record("skipped ahead", c="vmc1abc", epoch=3, other="x")))
    assert {k: doc[k] for k in ("level", "logger", "msg", "c", "epoch")} == {
        "level": "warning", "logger": "valuemesh.daemon", "msg": "skipped ahead", "c": "vmc1abc", "epoch": 3}
    assert "other" not in doc and "exc" not in doc
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        rec = _record("internal error")
        rec.exc_info = sys.exc_info()
    assert "RuntimeError: a bug" in json.loads(_JsonFormatter().format(rec))["exc"]
