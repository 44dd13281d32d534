"""The local API against web pages and hostile bodies (#16 finding 9, docs/security.md):
only a Host naming its own loopback address and port, no foreign Origin, state changes only
as application/json, and bodies bounded in depth and size; each refusal is one sentence
in JSON and changes nothing. Against a real daemon on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from valuemesh.node.home import Home
from valuemesh.node.jsonbody import MAX_JSON_DEPTH, json_depth
from valuemesh.node.testing import Daemon, free_port


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon("hardening", tmp_path_factory.mktemp("hardening") / "home", free_port(), "valuemesh-test")
    d.start()
    try:
        yield d
    finally:
        d.stop()


def _send(node: Daemon, method: str, path: str, body: bytes | None = None, *, host: str | None = "own",
          content_type: str | None = "application/json", token: bool = True,
          extra: dict[str, str] | None = None, chunked: bool = False) -> tuple[int, dict]:
    """One request with exactly the headers given (host "own": the API's own 127.0.0.1:port)."""
    home = Home(node.home)
    addr, port = home.api_address()
    conn = http.client.HTTPConnection(addr, port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", f"{addr}:{port}" if host == "own" else host.replace("PORT", str(port)))
        if token:
            conn.putheader("Authorization", f"Bearer {home.api_token()}")
        if content_type is not None:
            conn.putheader("Content-Type", content_type)
        for k, v in (extra or {}).items():
            conn.putheader(k, v)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        elif body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body is not None and chunked:
            for i in range(0, len(body), 65536):
                piece = body[i:i + 65536]
                conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            conn.send(b"0\r\n\r\n")
        elif body is not None:
            conn.send(body)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, {"error": raw.decode()}  # (aiohttp's own plain-text answer)
    finally:
        conn.close()


def _one_sentence(doc: dict) -> str:
    err = doc["error"]
    assert isinstance(err, str) and err.endswith(".") and "\n" not in err, doc
    return err


def _names(node: Daemon) -> list[str]:
    return sorted(c["name"] for c in _send(node, "GET", "/v1/constellations")[1]["constellations"])


def test_only_a_host_naming_the_api_itself_is_answered(node: Daemon) -> None:
    for host in ("127.0.0.1:PORT", "localhost:PORT", "LOCALHOST:PORT", "[::1]:PORT"):
        assert _send(node, "GET", "/v1/status", host=host)[0] == 200, host
    # DNS rebinding: a page's own name resolved to 127.0.0.1; or another port, or no Host at all.
    for host in ("evil.example:PORT", "evil.example", "127.0.0.1", "127.0.0.1:1", "localhost.evil.example:PORT"):
        for path in ("/v1/health", "/v1/status"):
            status, doc = _send(node, "GET", path, host=host)
            assert status == 421 and "own loopback address" in _one_sentence(doc), (host, path)
    # (Without any Host, aiohttp itself answers 400 before the API sees the request.)
    assert _send(node, "GET", "/v1/status", host=None)[0] == 400
    before = _names(node)
    status, _ = _send(node, "POST", "/v1/constellations", b'{"name": "rebound"}', host="evil.example:PORT")
    assert status == 421 and _names(node) == before


def test_a_foreign_origin_is_refused_even_with_the_token(node: Daemon) -> None:
    own = f"http://127.0.0.1:{Home(node.home).api_address()[1]}"
    assert _send(node, "GET", "/v1/status", extra={"Origin": own})[0] == 200
    before = _names(node)
    for origin in ("http://evil.example", "null", "https://127.0.0.1", own + "0", own.replace("http", "https")):
        for method, path, body in (("GET", "/v1/health", None), ("GET", "/v1/status", None),
                                   ("POST", "/v1/constellations", b'{"name": "csrf"}')):
            status, doc = _send(node, method, path, body, extra={"Origin": origin})
            assert status == 403 and "web pages" in _one_sentence(doc), (origin, path)
    assert _names(node) == before


def test_a_state_change_must_be_sent_as_json(node: Daemon) -> None:
    before = _names(node)
    # What a form or a no-cors fetch can send without asking the API first.
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        status, doc = _send(node, "POST", "/v1/constellations", b'{"name": "form"}', content_type=ctype)
        assert status == 415 and "application/json" in _one_sentence(doc), ctype
    assert _names(node) == before
    assert _send(node, "GET", "/v1/status", content_type=None)[0] == 200
    status, doc = _send(node, "POST", "/v1/constellations", b'{"name": "sent as json"}',
                        content_type="application/json; charset=utf-8")
    assert status == 201 and _names(node) == sorted([*before, "sent as json"])


def test_deep_and_large_bodies_are_one_sentence_and_change_nothing(node: Daemon) -> None:
    before = _names(node)
    deep = b"[" * 200_000 + b"]" * 200_000
    nested_value = b'{"name": "x", "purpose": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}"
    for body in (deep, nested_value, b'{"records": ' + deep + b"}"):
        for path in ("/v1/constellations", "/v1/peers", "/v1/join"):
            status, doc = _send(node, "POST", path, body)
            assert status == 400 and "nests deeper" in _one_sentence(doc), (path, status, doc)
    # Brackets inside strings are text, not depth.
    status, _ = _send(node, "POST", "/v1/constellations", b'{"name": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"["}')
    assert status == 201
    # Too large, with a length given or sent in chunks without one.
    big = b'{"name": "' + b"x" * 1_200_000 + b'"}'
    for chunked in (False, True):
        status, doc = _send(node, "POST", "/v1/constellations", big, chunked=chunked)
        assert status == 413 and "too large" in _one_sentence(doc), chunked
    assert len(_names(node)) == len(before) + 1


def test_json_depth_is_counted_without_recursion() -> None:
    assert json_depth(b"{}") == 1 and json_depth(b"[[1], {\"a\": [2]}]") == 3 and json_depth(b"5") == 0
    assert json_depth(b'{"a": "[[[[\\"[[[", "b": ["}}}"]}') == 2
    assert json_depth(b"[" * 5_000_000) == 5_000_000  # far past any recursion limit, in bounded stack
