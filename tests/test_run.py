"""Running the daemon: one JSON object per log line (with the constellation and epoch when
a line names them, the traceback of an internal error), and config counts checked."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from valuemesh.node.run import _config_count, _JsonFormatter
from valuemesh.protocol.errors import LocalError


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


def test_config_counts_are_whole_numbers_of_zero_or_more() -> None:
    assert _config_count({}, "retain_epochs", 0) == 0
    assert _config_count({"retain_epochs": 4}, "retain_epochs", 0) == 4
    for bad in (-1, True, "3", 2.5):
        with pytest.raises(LocalError, match="retain_epochs"):
            _config_count({"retain_epochs": bad}, "retain_epochs", 0)
