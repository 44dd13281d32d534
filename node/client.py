"""A small synchronous client of the daemon's local API, for the CLI and the test harness.

It reads the API address and token from the home directory and turns every
failure into a LocalError with one plain sentence.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from valuemesh.node.home import Home
from valuemesh.protocol.errors import LocalError

TIMEOUT_S = 30.0


class ApiClient:
    def __init__(self, home: Home) -> None:
        self.home = home

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        host, port = self.home.api_address()
        token = self.home.api_token()
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"http://{host}:{port}{path}", data=data, method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                return json.loads(resp.read() or b"{}")
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
