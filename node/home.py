"""A node's home directory: where its key file, config, API token and
database live, and how the CLI and the daemon agree on them.

Resolution order: `--home`, then `$VALUEMESH_HOME`, then the XDG data
directory (`$XDG_DATA_HOME/valuemesh`, default `~/.local/share/valuemesh`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valuemesh.protocol.errors import KeyFileError, LocalError
from valuemesh.protocol.identity import Identity, decode_keyfile, encode_keyfile, keyfile_is_sealed

KEY_FILE = "identity.key"
CONFIG_FILE = "config.json"
TOKEN_FILE = "api.token"
API_FILE = "api.json"
DB_FILE = "node.db"
# What the home followed and how far its own seqs went (node/held.py); init writes it empty.
HELD_FILE = "held.json"


def resolve_home(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("VALUEMESH_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "valuemesh"


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only, atomically: a fresh temporary file beside it
    (a random name, O_EXCL and O_NOFOLLOW, so nothing planted at a guessable name is followed
    or reused), fsync, rename over `path`, fsync the directory (so the rename survives a power cut)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Home:
    path: Path

    @property
    def key_file(self) -> Path:
        return self.path / KEY_FILE

    @property
    def db_file(self) -> Path:
        return self.path / DB_FILE

    @property
    def initialised(self) -> bool:
        return self.key_file.exists()

    def init(self, name: str, passphrase: str | None = None) -> Identity:
        if self.initialised:
            raise LocalError(f"{self.path} already holds an identity; use another --home to make a new one.")
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        ident = Identity.generate(secrets.token_bytes)
        # A new member has followed nothing yet: a later start without a database is a first
        # start. Written before the key, so a home with a key always has it.
        write_private(self.path / HELD_FILE, b'{"v": 1, "constellations": {}}\n')
        write_private(self.key_file, encode_keyfile(ident, passphrase, secrets.token_bytes))
        # Only what the member chose (here or with `config set` before): every other setting
        # keeps its documented default (node/settings.py), so a later default reaches this home.
        cfg = self.config()
        if name:
            cfg["name"] = name
        self.save_config(cfg)
        return ident

    def load_identity(self, passphrase: str | None = None) -> Identity:
        if not self.initialised:
            raise LocalError(f"No identity in {self.path}; run 'valuemesh init' first.")
        mode = self.key_file.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyFileError(f"{self.key_file} is readable by others (mode {mode:o}); run chmod 600 on it.")
        data = self.key_file.read_bytes()
        if passphrase is None and keyfile_is_sealed(data):
            passphrase = os.environ.get("VALUEMESH_PASSPHRASE")
        return decode_keyfile(data, passphrase)

    def config(self) -> dict[str, Any]:
        """The settings config.json sets, unchecked (node/settings.py checks them)."""
        p = self.path / CONFIG_FILE
        if not p.exists():
            return {}
        try:
            cfg = json.loads(p.read_text())
        except (OSError, ValueError):
            raise LocalError(f"{p} is not valid JSON; fix or remove it.") from None
        if not isinstance(cfg, dict):
            raise LocalError(f"{p} must hold a JSON object.")
        return cfg

    def save_config(self, cfg: dict[str, Any]) -> None:
        write_private(self.path / CONFIG_FILE, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())

    def new_api_token(self) -> str:
        token = secrets.token_urlsafe(32)
        write_private(self.path / TOKEN_FILE, token.encode())
        return token

    def api_token(self) -> str:
        try:
            return (self.path / TOKEN_FILE).read_text().strip()
        except OSError:
            raise LocalError("The daemon is not running (no API token); start it with 'valuemesh daemon'.") from None

    def write_api_address(self, host: str, port: int, pid: int) -> None:
        write_private(self.path / API_FILE, json.dumps({"host": host, "port": port, "pid": pid}).encode())

    def api_address(self) -> tuple[str, int]:
        try:
            doc = json.loads((self.path / API_FILE).read_text())
            return str(doc["host"]), int(doc["port"])
        except (OSError, ValueError, KeyError, TypeError):
            raise LocalError("The daemon is not running; start it with 'valuemesh daemon'.") from None

    def clear_api_address(self) -> None:
        for name in (API_FILE, TOKEN_FILE):
            try:
                (self.path / name).unlink()
            except FileNotFoundError:
                pass
