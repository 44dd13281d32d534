"""A small synchronous client of the daemon's local API, for the CLI and the test harness.

It reads the API address and token from the home directory and turns every
failure into a LocalError with one plain sentence.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from valuemesh.node.home import Home
from valuemesh.protocol.errors import LocalError

TIMEOUT_S = 30.0


class ApiClient:
    def __init__(self, home: Home) -> None:
        self.home = home

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with self._open(method, path, body) as resp:
            return json.loads(resp.read() or b"{}")

    @contextmanager
    def stream(self, path: str) -> Iterator[IO[bytes]]:
        """GET `path` and hand over the response to read as it arrives (an export)."""
        with self._open("GET", path, None) as resp:
            yield resp

    @contextmanager
    def _open(self, method: str, path: str, body: dict[str, Any] | None) -> Iterator[IO[bytes]]:
        host, port = self.home.api_address()
        token = self.home.api_token()
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"http://{host}:{port}{path}", data=data, method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error")
            except (ValueError, AttributeError):
                message = None
            raise LocalError(message or f"The daemon answered HTTP {exc.code}.") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            raise LocalError(
                f"The daemon is not running at {host}:{port}; start it with 'valuemesh daemon'."
            ) from None
        with resp:
            try:
                yield resp
            except (ConnectionError, TimeoutError, OSError):
                raise LocalError(f"The daemon at {host}:{port} stopped answering halfway.") from None
