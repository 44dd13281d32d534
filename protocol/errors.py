"""Typed errors of the protocol layer, each saying whose fault it is.

`LocalError` means this node (or its operator) asked for something wrong;
`RemoteError` means bytes or a record from someone else were bad. Every message
is one plain sentence that a user can read without a traceback.
"""

from __future__ import annotations


class ValuemeshError(Exception):
    """Base of every error valuemesh raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class LocalError(ValuemeshError):
    """Raised when the local user or code asked for something invalid."""


class RemoteError(ValuemeshError):
    """Raised when data that came from a peer or another member is invalid."""


class DecodeError(RemoteError):
    """Raised when bytes are not a valid, canonical, size-limited encoding."""


class SignatureError(RemoteError):
    """Raised when a signature does not verify against the claimed author."""


class ValidationError(RemoteError):
    """Raised when a well-formed record or block breaks a protocol rule."""


class AuthorizationError(ValidationError):
    """Raised when the author is not allowed to do what the record says."""


class SequenceError(ValidationError):
    """Raised when a record's per-author sequence number is not the next one."""


class NotFoundError(LocalError):
    """Raised when a constellation, record or other named thing asked for is not held here."""


class MemberIdError(LocalError):
    """Raised when a member id's text form is mistyped or malformed."""


class KeyFileError(LocalError):
    """Raised when a key file cannot be read, unsealed or written safely."""


class PluginError(LocalError):
    """Raised when a plugin is missing, incompatible or collides with another."""
