"""Member identities: Ed25519 keys, the checksummed `vm1…` text form of a
member id, and passphrase sealing of a secret key for key files and backups.

Pure: randomness for salts and nonces is passed in by the caller, and files are
written by `valuemesh.node.home` (`Home`, `write_private`), not here.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.signing

from . import cbor
from .errors import DecodeError, KeyFileError, MemberIdError, SignatureError

ID_PREFIX = "vm1"
KEY_LEN = 32
SIG_LEN = 64
_CHECKSUM_LEN = 4
_B32_ALPHABET = set("abcdefghijklmnopqrstuvwxyz234567")
# Member id texts remembered: every ledger view entry, member list and log line prints
# one, and base32 in pure Python cost more than the rest of a ledger view entry.
ID_TEXT_CACHE = 4096

RandomBytes = Callable[[int], bytes]

SignatureCheck = tuple["MemberId", bytes, bytes]
"""One Ed25519 check: the signer, the signed message (domain tag included), the signature."""

BatchVerifier = Callable[[Sequence[SignatureCheck]], "int | None"]
"""Checks every signature of a batch and returns the index of the first one that does not
verify, or None. `first_invalid` is the sequential one; a node may pass one that spreads a
large batch over several cores (valuemesh.node.verify), which must return the same index."""


def _checksum(key: bytes) -> bytes:
    return hashlib.blake2b(b"valuemesh-member-id" + key, digest_size=_CHECKSUM_LEN).digest()


@functools.lru_cache(maxsize=ID_TEXT_CACHE)
def _id_text(key: bytes) -> str:
    raw = key + _checksum(key)
    return ID_PREFIX + base64.b32encode(raw).decode("ascii").rstrip("=").lower()


@dataclass(frozen=True, slots=True, order=True)
class MemberId:
    """A member's public Ed25519 key; `str()` gives the `vm1…` text form."""

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEY_LEN:
            raise DecodeError("A member id must be a 32-byte Ed25519 public key.")

    def __str__(self) -> str:
        return _id_text(self.key)

    def __repr__(self) -> str:
        return f"MemberId({self!s})"

    @property
    def short(self) -> str:
        return str(self)[:12]

    @classmethod
    def parse(cls, text: str) -> MemberId:
        """Parse a `vm1…` member id, rejecting typos with a clear message."""
        if not isinstance(text, str):
            raise MemberIdError("A member id must be text starting with 'vm1'.")
        # ASCII first: str.lower() maps some non-ASCII letters (the Kelvin sign) to 'k'.
        t = text.strip().lower() if text.isascii() else ""
        if not t.startswith(ID_PREFIX):
            raise MemberIdError(f"'{text}' is not a member id: member ids start with 'vm1'.")
        body = t[len(ID_PREFIX) :]
        if len(body) != 58 or not set(body) <= _B32_ALPHABET:
            raise MemberIdError(
                f"'{text}' is not a member id: it should be 'vm1' followed by 58 letters and digits."
            )
        raw = base64.b32decode(body.upper() + "======")
        key, check = raw[:KEY_LEN], raw[KEY_LEN:]
        if _checksum(key) != check:
            raise MemberIdError(f"'{text}' has a wrong checksum: the member id is mistyped.")
        member = cls(key)
        # The last character carries 2 padding bits; only the form with zero bits is
        # valid, so a typo there cannot pass and every id has exactly one text form.
        if str(member) != t:
            raise MemberIdError(f"'{text}' has a wrong last character: the member id is mistyped.")
        return member

    def verify(self, message: bytes, signature: bytes) -> None:
        """Raise SignatureError unless `signature` is this member's over `message`."""
        if not isinstance(signature, bytes) or len(signature) != SIG_LEN:
            raise SignatureError(f"The signature of {self.short}… is not 64 bytes.")
        try:
            # The binding directly: VerifyKey.verify adds an object and a copy per call,
            # and this runs once per record received.
            nacl.bindings.crypto_sign_open(signature + message, self.key)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            raise SignatureError(f"The signature of {self.short}… does not verify.") from None


def first_invalid(checks: Sequence[SignatureCheck], start: int = 0, stop: int | None = None) -> int | None:
    """The index of the first of `checks[start:stop]` whose signature does not verify, or None.

    The binding directly, as in `MemberId.verify`: this is the loop every received record
    and block goes through. PyNaCl releases the GIL inside the call, so slices of one batch
    can run on several threads at once."""
    open_signed = nacl.bindings.crypto_sign_open
    for i in range(start, len(checks) if stop is None else stop):
        signer, message, sig = checks[i]
        if not isinstance(sig, bytes) or len(sig) != SIG_LEN:
            return i
        try:
            open_signed(sig + message, signer.key)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return i
    return None


class Identity:
    """A member's secret signing key. Never serialised except sealed."""

    __slots__ = ("_sk", "member")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise KeyFileError("A secret key seed must be 32 bytes.")
        self._sk = nacl.signing.SigningKey(seed)
        self.member = MemberId(bytes(self._sk.verify_key))

    @classmethod
    def generate(cls, random_bytes: RandomBytes) -> Identity:
        return cls(random_bytes(32))

    @property
    def seed(self) -> bytes:
        return bytes(self._sk)

    def sign(self, message: bytes) -> bytes:
        return self._sk.sign(message).signature

    def to_curve25519_private(self) -> bytes:
        return bytes(self._sk.to_curve25519_private_key())

    def __repr__(self) -> str:
        return f"Identity({self.member})"


# Argon2id limits used for sealing. "Moderate" is libsodium's choice for
# secrets at rest; tests may pass the interactive limits to run faster.
SEAL_OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_MODERATE
SEAL_MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_MODERATE
FAST_OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
FAST_MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE
_MAX_OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE
_MAX_MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE
KEYFILE_VERSION = 1


def encode_keyfile(
    identity: Identity,
    passphrase: str | None,
    random_bytes: RandomBytes,
    *,
    opslimit: int = SEAL_OPSLIMIT,
    memlimit: int = SEAL_MEMLIMIT,
) -> bytes:
    """Serialise an identity, sealed with Argon2id + SecretBox if a passphrase is given."""
    if passphrase is None:
        doc = {"v": KEYFILE_VERSION, "kind": "plain", "seed": identity.seed}
    else:
        if not passphrase:
            raise KeyFileError("The passphrase is empty; give one or none at all.")
        salt = random_bytes(nacl.pwhash.argon2id.SALTBYTES)
        key = nacl.pwhash.argon2id.kdf(
            nacl.secret.SecretBox.KEY_SIZE,
            _passphrase_bytes(passphrase),
            salt,
            opslimit=opslimit,
            memlimit=memlimit,
        )
        nonce = random_bytes(nacl.secret.SecretBox.NONCE_SIZE)
        box = nacl.secret.SecretBox(key).encrypt(identity.seed, nonce)
        doc = {
            "v": KEYFILE_VERSION,
            "kind": "sealed",
            "kdf": "argon2id",
            "ops": opslimit,
            "mem": memlimit,
            "salt": salt,
            "box": bytes(box),
        }
    return cbor.encode(doc)


def _passphrase_bytes(passphrase: str) -> bytes:
    try:
        return passphrase.encode("utf-8")
    except (UnicodeEncodeError, AttributeError):
        raise KeyFileError("The passphrase must be text (valid Unicode).") from None


def keyfile_is_sealed(data: bytes) -> bool:
    doc = _keyfile_doc(data)
    return doc.get("kind") == "sealed"


def _keyfile_doc(data: bytes) -> dict[str, object]:
    try:
        doc = cbor.decode(data, max_size=4096)
    except DecodeError:
        raise KeyFileError("The key file is damaged or not a valuemesh key file.") from None
    if not isinstance(doc, dict) or doc.get("v") != KEYFILE_VERSION:
        raise KeyFileError("The key file is not a valuemesh key file of a known version.")
    return doc


def decode_keyfile(data: bytes, passphrase: str | None) -> Identity:
    """Load an identity; a sealed file needs the right passphrase."""
    doc = _keyfile_doc(data)
    kind = doc.get("kind")
    if kind == "plain":
        seed = doc.get("seed")
        if not isinstance(seed, bytes) or len(seed) != 32:
            raise KeyFileError("The key file is damaged: its secret key has the wrong size.")
        return Identity(seed)
    if kind != "sealed":
        raise KeyFileError("The key file is of an unknown kind.")
    if passphrase is None:
        raise KeyFileError("The key file is sealed; a passphrase is needed to open it.")
    salt, box, ops, mem = doc.get("salt"), doc.get("box"), doc.get("ops"), doc.get("mem")
    if not (
        isinstance(salt, bytes)
        and len(salt) == nacl.pwhash.argon2id.SALTBYTES
        and isinstance(box, bytes)
        and isinstance(ops, int)
        and isinstance(mem, int)
        and 0 < ops <= _MAX_OPSLIMIT
        and 0 < mem <= _MAX_MEMLIMIT
    ):
        raise KeyFileError("The key file is damaged: its sealing parameters are invalid.")
    try:
        key = nacl.pwhash.argon2id.kdf(
            nacl.secret.SecretBox.KEY_SIZE, _passphrase_bytes(passphrase), salt, opslimit=ops, memlimit=mem
        )
        seed = nacl.secret.SecretBox(key).decrypt(box)
    except (nacl.exceptions.CryptoError, ValueError):
        raise KeyFileError("The passphrase is wrong or the key file was altered.") from None
    if len(seed) != 32:
        raise KeyFileError("The key file is damaged: its secret key has the wrong size.")
    return Identity(seed)


_EXPORT_PREFIX = "vmkey1:"


def export_identity(
    identity: Identity,
    passphrase: str,
    random_bytes: RandomBytes,
    *,
    opslimit: int = SEAL_OPSLIMIT,
    memlimit: int = SEAL_MEMLIMIT,
) -> str:
    """A text backup of an identity, always sealed with a passphrase."""
    sealed = encode_keyfile(identity, passphrase, random_bytes, opslimit=opslimit, memlimit=memlimit)
    return _EXPORT_PREFIX + base64.urlsafe_b64encode(sealed).decode("ascii").rstrip("=")


def import_identity(text: str, passphrase: str) -> Identity:
    t = text.strip()
    if not t.startswith(_EXPORT_PREFIX):
        raise KeyFileError("This is not a valuemesh identity backup (it should start with 'vmkey1:').")
    body = t[len(_EXPORT_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError:
        raise KeyFileError("The identity backup is damaged.") from None
    return decode_keyfile(raw, passphrase)
