"""Every CLI error path gives one plain sentence on stderr and exit status 1."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from valuemesh.node.home import Home
from valuemesh.node.testing import Daemon, free_port
from valuemesh.protocol.invite import Invite


def _one_sentence_error(res: object) -> str:
    assert res.returncode == 1, res  # type: ignore[attr-defined]
    err = res.stderr.strip()  # type: ignore[attr-defined]
    assert err.startswith("error: "), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = Daemon("solo", tmp_path_factory.mktemp("solo") / "home", free_port(), "valuemesh-test")
    d.start()
    try:
        yield d
    finally:
        d.stop()


def test_daemon_not_running_is_one_sentence(tmp_path: Path) -> None:
    d = Daemon("off", tmp_path / "home", free_port(), "valuemesh-test")
    d.cli("init")
    for args in (["status"], ["constellation", "list"], ["peers"]):
        err = _one_sentence_error(d.cli(*args, check=False))
        assert "not running" in err


def test_init_twice_and_id_offline(tmp_path: Path) -> None:
    d = Daemon("off", tmp_path / "home", free_port(), "valuemesh-test")
    created = d.cli_json("init", "--name", "ana")
    assert created["member"].startswith("vm1")
    assert (tmp_path / "home" / "identity.key").stat().st_mode & 0o777 == 0o600
    assert "already holds an identity" in _one_sentence_error(d.cli("init", check=False))
    offline = d.cli_json("id")
    assert offline["member"] == created["member"] and offline["running"] is False
    assert "membership" in offline["plugins"]


def test_constellation_lifecycle_and_errors(node: Daemon) -> None:
    made = node.cli_json("constellation", "create", "Repair café", "--purpose", "fix things")
    cid = made["id"]
    assert made["guarantee"] == "single-node"
    assert "add a core member" in node.cli("constellation", "create", "Second").stdout
    listed = node.cli_json("constellation", "list")["constellations"]
    assert cid in {c["id"] for c in listed}

    # Unknown or mistyped constellation ids.
    other = "vc1" + "a" * 58
    assert "constellation id" in _one_sentence_error(node.cli("ledger", other, check=False))
    typo = cid[:-1] + ("a" if cid[-1] != "a" else "b")
    assert "mistyped" in _one_sentence_error(node.cli("ledger", typo, check=False))
    from valuemesh.protocol.records import constellation_text
    unknown = constellation_text(secrets.token_bytes(32))
    assert "does not follow" in _one_sentence_error(node.cli("ledger", unknown, check=False))

    # Malformed quantities and actions never reach the ledger.
    for q in ("abc", "-3", "0", "1e400", "1.1234567"):
        res = node.cli("contribute", cid, "--action", "work", "--quantity", q, "--unit", "hour", check=False)
        _one_sentence_error(res)
    assert node.cli("contribute", cid, "--action", "dance", "--quantity", "1", "--unit", "h",
                    check=False).returncode != 0
    assert node.cli_json("ledger", cid)["pending"] == []

    # A record that cannot apply is refused before it is signed.
    res = node.cli("ack", cid, "00" * 32, check=False)
    assert "no final contribution" in _one_sentence_error(res)
    res = node.cli("ack", cid, "xyz", check=False)
    assert "not a record id" in _one_sentence_error(res)

    rec = node.cli_json("contribute", cid, "--action", "work", "--quantity", "2.5", "--unit", "hour")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and node.cli_json("ledger", cid)["pending"]:
        time.sleep(0.2)
    ledger = node.cli_json("ledger", cid)
    assert [r["id"] for r in ledger["final"]][-1] == rec["id"]
    assert ledger["final"][-1]["body"]["quantity"] == "2.5"
    assert "cannot acknowledge or dispute their own" in _one_sentence_error(
        node.cli("ack", cid, rec["id"], check=False))


def test_bad_and_expired_tokens(node: Daemon) -> None:
    cid = node.cli_json("constellation", "create", "Tokens")["id"]
    assert "not a valuemesh invite token" in _one_sentence_error(
        node.cli("constellation", "join", "hello", check=False))
    good = node.cli("constellation", "invite", cid, "--ttl", "1h").stdout.strip()
    tampered = good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB")
    assert "damaged or was altered" in _one_sentence_error(
        node.cli("constellation", "join", tampered, check=False))
    assert "not a duration" in _one_sentence_error(
        node.cli("constellation", "invite", cid, "--ttl", "forever", check=False))
    founder = Home(node.home).load_identity()
    from valuemesh.protocol.records import parse_constellation
    expired = Invite.create(founder, constellation=parse_constellation(cid), name="Tokens", tier="core",
                            roles=(), uses=1, expires=int(time.time() * 1000) - 1000,
                            addrs=(("127.0.0.1", node.port),), nonce=secrets.token_bytes(16))
    assert "expired" in _one_sentence_error(node.cli("constellation", "join", expired.text(), check=False))
    # Our own node already follows it: a clear sentence, not a hang.
    assert "already follows" in _one_sentence_error(node.cli("constellation", "join", good, check=False))


def test_mistyped_member_id(node: Daemon) -> None:
    me = node.cli_json("id")["member"]
    assert node.cli("check-id", me).stdout.strip() == me
    typo = me[:10] + ("a" if me[10] != "a" else "b") + me[11:]
    assert "mistyped" in _one_sentence_error(node.cli("check-id", typo, check=False))
    assert "start with 'vm1'" in _one_sentence_error(node.cli("check-id", "alice", check=False))


def _valuemesh(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("VALUEMESH_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "valuemesh.cli.main", "--home", str(home), *args],
                          capture_output=True, text=True, env=full, timeout=60)


def test_config_set_get_list(tmp_path: Path) -> None:
    d = Daemon("cfg", tmp_path / "home", free_port(), "valuemesh-test")
    d.cli("init", "--name", "ana")
    assert d.cli("config", "set", "bootstrap", "a.example:7470,10.0.0.5:7470").returncode == 0
    assert d.cli_json("config", "set", "mdns", "off")["value"] is False
    assert d.cli("config", "get", "bootstrap").stdout == "a.example:7470,10.0.0.5:7470\n"
    assert json.loads((d.home / "config.json").read_text()) == {
        "name": "ana", "bootstrap": ["a.example:7470", "10.0.0.5:7470"], "mdns": False}
    assert (d.home / "config.json").stat().st_mode & 0o777 == 0o600
    rows = {r["key"]: r for r in d.cli_json("config", "list")["settings"]}
    assert (rows["mdns"]["value"], rows["mdns"]["source"]) == ("false", "file")
    assert (rows["listen"]["value"], rows["listen"]["source"]) == ("[::]:7470", "default")
    listed = _valuemesh(d.home, "--json", "config", "list", env={"VALUEMESH_LOG": "debug"})
    assert {r["key"]: r["source"] for r in json.loads(listed.stdout)["settings"]}["log_level"] == "env"


def test_config_refuses_bad_input_and_changes_nothing(tmp_path: Path) -> None:
    d = Daemon("cfg", tmp_path / "home", free_port(), "valuemesh-test")
    d.cli("init")
    before = (d.home / "config.json").read_bytes()
    for args, match in ((["set", "verify_thread", "2"], "did you mean 'verify_threads'?"),
                        (["set", "api", "0.0.0.0:7471"], "must be a loopback address"),
                        (["set", "retain_epochs", "-1"], "must be a whole number"),
                        (["get", "listn"], "did you mean 'listen'?")):
        assert match in _one_sentence_error(d.cli("config", *args, check=False))
    assert (d.home / "config.json").read_bytes() == before


def test_daemon_refuses_bad_settings_at_start(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Home(home).init("")
    (home / "config.json").write_text(json.dumps({"verify_thread": 2}))
    err = _one_sentence_error(_valuemesh(home, "daemon", "--no-mdns"))
    assert err.startswith("error: Unknown setting 'verify_thread' in ") and \
        err.endswith("(did you mean 'verify_threads'?); 'valuemesh config list' shows every setting.")
    (home / "config.json").write_text("{}")
    assert _one_sentence_error(_valuemesh(home, "daemon", env={"VALUEMESH_LOG": "verbose"})) == \
        'error: VALUEMESH_LOG must be one of debug, info, warning, error, not "verbose".'
    assert "--listen must be an address" in _one_sentence_error(_valuemesh(home, "daemon", "--listen", "x"))
    assert not (home / "api.json").exists()


def test_daemon_help_shows_every_default(tmp_path: Path) -> None:
    from valuemesh.node.settings import SETTINGS
    out = " ".join(_valuemesh(tmp_path, "daemon", "--help").stdout.split())
    for s in SETTINGS:
        assert s.flag.split("/")[0] in out and s.env in out, s.key
    for default in ("[default: [::]:7470]", "[default: 127.0.0.1:7471]", "[default: no-mdns]",
                    "[default: info]", "[default: 10000]"):
        assert default in out, default


def test_evidence_records_the_hash_and_base_name_never_the_folder(node: Daemon, tmp_path: Path) -> None:
    """#16 finding 9: the signed ledger is kept forever, so a local path in it (a user name, a
    folder layout) could never be erased; only the file's hash and base name go in."""
    import hashlib

    folder = tmp_path / "alice-private" / "tax 2026"
    folder.mkdir(parents=True)
    receipt = folder / "receipt march.pdf"
    receipt.write_bytes(b"%PDF-1.7 a receipt")
    cid = node.cli_json("constellation", "create", "Evidence")["id"]
    rec = node.cli_json("contribute", cid, "--action", "work", "--quantity", "1", "--unit", "hour",
                        "--evidence", str(receipt))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and node.cli_json("ledger", cid)["pending"]:
        time.sleep(0.2)
    shown = node.api("GET", f"/v1/constellations/{cid}/records/{rec['id']}")
    assert shown["body"]["evidence"] == {"uri": "receipt%20march.pdf",
                                         "hash": hashlib.blake2b(receipt.read_bytes(), digest_size=32).hexdigest()}
    ledger = json.dumps(node.cli_json("ledger", cid))
    assert "alice-private" not in ledger and "tax" not in ledger and str(tmp_path) not in ledger
    # A file that cannot be read is one sentence, and nothing is signed.
    unreadable = folder / "locked.pdf"
    unreadable.write_bytes(b"x")
    unreadable.chmod(0)
    try:
        if os.geteuid() != 0:  # (root reads any file)
            res = node.cli("contribute", cid, "--action", "work", "--quantity", "1", "--unit", "hour",
                           "--evidence", str(unreadable), check=False)
            assert "Cannot read" in _one_sentence_error(res)
    finally:
        unreadable.chmod(0o600)
    assert node.cli_json("ledger", cid)["pending"] == []
