"""The helpers every command shares (cli/common.py): parsers, `--json`, one-sentence errors and
record submission with `--wait`; that plugins get the same objects; that cli/ defines each once."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from valuemesh.cli import common, plugins
from valuemesh.cli.common import (
    Ctx,
    Group,
    emit,
    json_option,
    parse_cid,
    parse_duration,
    parse_hex_id,
    parse_member,
    parse_quantity,
    submit,
    wait_option,
)
from valuemesh.protocol.errors import LocalError, ValuemeshError
from valuemesh.protocol.identity import Identity
from valuemesh.protocol.records import constellation_text

CLI_DIR = Path(common.__file__).parent
CID = constellation_text(bytes(32))
RID = "ab" * 32


def test_parsers_give_canonical_forms() -> None:
    assert [parse_duration(t) for t in ("45s", "30m", " 2h", "7d", "1w")] == [45, 1800, 7200, 604800, 604800]
    assert [parse_quantity(t) for t in ("3", "2.50", "0.000001", "1E2")] == ["3", "2.5", "0.000001", "100"]
    assert parse_hex_id(RID.upper()) == RID
    assert parse_cid(" " + CID.upper() + " ") == CID
    member = str(Identity.generate(lambda n: bytes(range(n))).member)
    assert parse_member(member) == member


@pytest.mark.parametrize(("parse", "text", "match"), [
    (parse_duration, "7 days", "is not a duration"), (parse_duration, "9999999s", "is not a duration"),
    (parse_quantity, "three", "is not a quantity"), (parse_quantity, "-1", "not a positive quantity"),
    (parse_quantity, "NaN", "not a positive quantity"), (parse_quantity, "0.0000001", "more than 6 decimals"),
    (parse_hex_id, "abc", "is not a record id"),
])
def test_parsers_refuse_with_one_sentence(parse: Any, text: str, match: str) -> None:
    with pytest.raises(LocalError, match=match):
        parse(text)


def test_bad_ids_are_valuemesh_errors() -> None:
    for parse, text in ((parse_cid, "vc1nope"), (parse_member, "vm1nope")):
        with pytest.raises(ValuemeshError):
            parse(text)


class FakeApi:
    """Answers like the daemon: a submitted record is pending, then final (or rejected)."""

    calls: list[tuple[str, str, Any]] = []
    polls_until_final = 2
    status = "applied"

    def __init__(self, home: Any) -> None:
        pass

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        FakeApi.calls.append((method, path, body))
        if method == "POST":
            return {"id": RID, "seq": 1, "status": "pending"}
        polls = sum(1 for m, _, _ in FakeApi.calls if m == "GET")
        final = polls >= FakeApi.polls_until_final
        return {"final": final, "status": FakeApi.status if final else "pending", "reason": "Voted twice."}


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> type[FakeApi]:
    FakeApi.calls = []
    FakeApi.status = "applied"
    monkeypatch.setattr(common, "ApiClient", FakeApi)
    monkeypatch.setattr(common, "WAIT_POLL_S", 0.0)
    return FakeApi


def _app() -> click.Group:
    @click.group(cls=Group)
    @click.option("--json", "as_json", is_flag=True)
    @click.pass_context
    def app(ctx: click.Context, as_json: bool) -> None:
        ctx.obj = Ctx(Path("/nonexistent"), as_json)

    @app.command()
    @click.argument("cid")
    @wait_option
    @json_option
    def record(cid: str, wait: bool) -> None:
        doc = submit(cid, "contribution", {"op": "ack", "target": RID})
        emit(doc, f"record {doc['id'][:8]} ({doc['status']})")

    @app.command()
    @click.argument("text")
    def duration(text: str) -> None:
        click.echo(parse_duration(text))

    return app


def test_submit_posts_to_the_canonical_constellation(fake_api: type[FakeApi]) -> None:
    res = CliRunner().invoke(_app(), ["record", CID.upper()])
    assert res.exit_code == 0 and res.output == "record abababab (pending)\n"
    assert fake_api.calls == [("POST", f"/v1/constellations/{CID}/records",
                               {"type": "contribution", "body": {"op": "ack", "target": RID}})]


def test_wait_returns_once_final(fake_api: type[FakeApi]) -> None:
    res = CliRunner().invoke(_app(), ["record", CID, "--wait", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["status"] == "final"
    assert [m for m, _, _ in fake_api.calls] == ["POST", "GET", "GET"]


def test_waiting_keeps_what_else_the_answer_carried(fake_api: type[FakeApi]) -> None:
    # A ratification's answer carries its hash; the CLI prints it after --wait.
    answer = {"id": RID, "seq": 3, "status": "pending", "hash": "cd" * 32}
    with click.Context(_app()):
        done = common.wait_final(CID, answer)  # type: ignore[arg-type]
    assert done == {**answer, "status": "final"} and answer["status"] == "pending"


def test_wait_on_a_rejected_record_is_the_ledgers_sentence(fake_api: type[FakeApi]) -> None:
    fake_api.status = "rejected"
    res = CliRunner().invoke(_app(), ["record", CID, "--wait"])
    assert res.exit_code == 1 and res.stderr == "error: Voted twice.\n" and res.stdout == ""


def test_json_before_or_after_the_command(fake_api: type[FakeApi]) -> None:
    for args in (["--json", "record", CID], ["record", CID, "--json"]):
        res = CliRunner().invoke(_app(), args)
        assert json.loads(res.output)["id"] == RID


def test_errors_are_one_sentence_and_exit_1() -> None:
    res = CliRunner().invoke(_app(), ["duration", "soon"])
    assert res.exit_code == 1 and res.stdout == ""
    assert res.stderr == "error: 'soon' is not a duration; use a number and s, m, h, d or w, like 7d.\n"


def test_plugins_get_the_same_helpers() -> None:
    for name in ("api", "emit", "fail", "json_option", "submit"):
        assert getattr(plugins, name) is getattr(common, name), name
        assert name in plugins.__all__


def test_no_helper_is_defined_twice_in_cli() -> None:
    where: dict[str, list[str]] = {}
    for path in sorted(CLI_DIR.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                where.setdefault(node.name, []).append(path.name)
            if isinstance(node, ast.Assign | ast.AnnAssign) and path.name != "common.py":
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = {t.id for t in targets if isinstance(t, ast.Name)}
                assert not names & {"_DURATION", "_UNITS", "WAIT_S", "WAIT_POLL_S"}, (path.name, names)
    # `register` is each command module's own entry point: the same name on purpose.
    twice = {name: files for name, files in where.items() if len(files) > 1 and name != "register"}
    assert not twice, twice
