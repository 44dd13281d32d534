"""The peer-link security layer, sans I/O: a mutually authenticated handshake over
ephemeral X25519 keys bound to a network id, then per-direction AEAD frames with counters.

Theory of operation (the byte formats are specified in docs/transport.md):

    initiator (client)                              responder (server)
    HELLO   = net_tag, e_i                  ──►     check net_tag; dh = X25519(e_r, e_i)
            ◄──     RESPONSE = e_r, AEAD_k2(R, sig_R(h1 ‖ e_r ‖ R))
    dh = X25519(e_i, e_r); verify R, authorise R
    AUTH    = AEAD_k3(I, sig_I(h2 ‖ R ‖ I))    ──►     verify I, authorise I
            ◄──     VERDICT = AEAD_k4(code, retry_after)
    traffic: k_i2r / k_r2i derived from dh and the whole transcript hash h3.

`h0..h3` is a running BLAKE2b-256 hash over the protocol name, the network id and
every handshake message, so each signature covers both ephemerals, both identities
and the network; each key is derived from the DH secret *and* that transcript, so
a message replayed into another connection (fresh ephemerals) cannot decrypt.
Receiving a valid AEAD under a DH-derived key is the key confirmation; distinct
labels per role and per direction rule out reflection. Frames use the ChaCha20-
Poly1305 IETF AEAD with an implicit 64-bit counter nonce per direction, so a
dropped, replayed, reordered or altered frame fails to open and the link is dead.

Pure: ephemeral secrets come in as arguments; nothing here reads a clock or socket.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

import nacl.bindings as sodium
import nacl.exceptions

from .errors import DecodeError, LocalError, RemoteError
from .identity import KEY_LEN, SIG_LEN, Identity, MemberId

PROTOCOL_NAME = b"valuemesh peer handshake v2"
VERSION = 2
MAGIC = b"vm"
MAX_NETWORK_ID = 64
MAX_RETRY_AFTER = 0xFFFFFFFF

# Message types (the 4th byte of every handshake message).
T_HELLO = 0x01
T_RESPONSE = 0x02
T_AUTH = 0x03
T_VERDICT = 0x04
T_REJECT = 0xFF

_TAG = sodium.crypto_aead_chacha20poly1305_ietf_ABYTES
_HEADER_LEN = 4
HELLO_LEN = _HEADER_LEN + 32 + KEY_LEN
RESPONSE_LEN = _HEADER_LEN + KEY_LEN + KEY_LEN + SIG_LEN + _TAG
AUTH_LEN = _HEADER_LEN + KEY_LEN + SIG_LEN + _TAG
VERDICT_LEN = _HEADER_LEN + 1 + 4 + _TAG
REJECT_LEN = _HEADER_LEN + 1 + 4

# Frame kinds: the first plaintext byte of every encrypted frame.
FRAME_DATA = 0x00
FRAME_PING = 0x01
FRAME_PONG = 0x02
FRAME_CLOSE = 0x03
# Version 2: a relay sub-protocol message (protocol/circuit.py), e.g. one carrier
# message of an end-to-end link travelling through this link's relay.
FRAME_CIRCUIT = 0x04
_FRAME_KINDS = frozenset({FRAME_DATA, FRAME_PING, FRAME_PONG, FRAME_CLOSE, FRAME_CIRCUIT})
FRAME_OVERHEAD = 1 + _TAG
# A CIRCUIT frame's body: op(1) and circuit id(4), then one whole frame of the inner link.
CIRCUIT_HEADER = 5
# The largest carrier message is a CIRCUIT frame carrying an inner frame of max payload.
MAX_FRAME_OVERHEAD = FRAME_OVERHEAD + CIRCUIT_HEADER + FRAME_OVERHEAD
MAX_CLOSE_REASON = 200
_MAX_COUNTER = (1 << 64) - 1


class Refusal(enum.IntEnum):
    """Why a responder refuses a connection (sent in REJECT or VERDICT)."""

    ACCEPTED = 0
    NETWORK_MISMATCH = 1
    UNSUPPORTED_VERSION = 2
    BUSY = 3
    BACKED_OFF = 4
    NOT_AUTHORISED = 5
    SELF_CONNECTION = 6

    @property
    def sentence(self) -> str:
        return _REFUSAL_SENTENCES[self]


_REFUSAL_SENTENCES = {
    Refusal.ACCEPTED: "The peer accepted the connection.",
    Refusal.NETWORK_MISMATCH: "The peer belongs to a different network (network ids differ).",
    Refusal.UNSUPPORTED_VERSION: "The peer does not speak this version of the peer protocol.",
    Refusal.BUSY: "The peer has no room for another connection right now.",
    Refusal.BACKED_OFF: "The peer refuses us for a while after earlier misbehaviour.",
    Refusal.NOT_AUTHORISED: "The peer does not authorise our key to connect.",
    Refusal.SELF_CONNECTION: "The peer has our own key: this node connected to itself.",
}


class HandshakeError(RemoteError):
    """Raised when a peer's handshake message is malformed, forged or out of order."""


class PeerRefusedError(HandshakeError):
    """Raised when the peer refused the connection; `code` says why."""

    def __init__(self, code: Refusal, retry_after: int = 0) -> None:
        text = code.sentence
        if retry_after:
            text = text[:-1] + f" (retry in {retry_after} s)."
        super().__init__(text)
        self.code = code
        self.retry_after = retry_after


class VersionMismatchError(PeerRefusedError):
    """Raised when the other end speaks another version of the peer protocol."""

    def __init__(self, theirs: int) -> None:
        super().__init__(Refusal.UNSUPPORTED_VERSION)
        self.theirs = theirs
        self.message = (
            f"The peer speaks version {theirs} of the peer protocol; "
            f"this node speaks only version {VERSION}."
        )
        self.args = (self.message,)


class NetworkMismatchError(PeerRefusedError):
    """Raised when the two ends were configured with different network ids."""

    def __init__(self) -> None:
        super().__init__(Refusal.NETWORK_MISMATCH)


class FrameError(DecodeError):
    """Raised when an encrypted frame is malformed, altered, replayed or out of order."""


def _h(*parts: bytes) -> bytes:
    return hashlib.blake2b(b"".join(parts), digest_size=32).digest()


def _kdf(secret: bytes, label: bytes, context: bytes) -> bytes:
    # Keyed BLAKE2b is a PRF; the label separates every key's purpose.
    return hashlib.blake2b(label + context, key=secret, digest_size=32).digest()


def _seal(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    return bytes(
        sodium.crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, ad, _nonce(counter), key)
    )


def _open(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes | None:
    try:
        return bytes(
            sodium.crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, ad, _nonce(counter), key)
        )
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        return None


def _nonce(counter: int) -> bytes:
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")


def _u32(value: int) -> bytes:
    return max(0, min(int(value), MAX_RETRY_AFTER)).to_bytes(4, "big")


def _header(kind: int) -> bytes:
    return MAGIC + bytes((VERSION, kind))


def network_tag(network_id: bytes) -> bytes:
    """The 32-byte tag of a network id sent in HELLO so a mismatch is told at once."""
    return _h(b"valuemesh network tag v1", network_id)


def _check_network_id(network_id: bytes) -> None:
    if not isinstance(network_id, bytes) or not 1 <= len(network_id) <= MAX_NETWORK_ID:
        raise LocalError(f"A network id must be 1 to {MAX_NETWORK_ID} bytes.")


def _h0(network_id: bytes) -> bytes:
    return _h(PROTOCOL_NAME, bytes((len(network_id),)), network_id)


def _check_secret(secret: bytes) -> bytes:
    if not isinstance(secret, bytes) or len(secret) != 32:
        raise LocalError("An ephemeral secret must be 32 random bytes.")
    return bytes(sodium.crypto_scalarmult_base(secret))


def _dh(secret: bytes, public: bytes) -> bytes:
    try:
        return bytes(sodium.crypto_scalarmult(secret, public))
    except (nacl.exceptions.RuntimeError, nacl.exceptions.CryptoError):
        # libsodium refuses low-order points (an all-zero shared secret).
        raise HandshakeError("The peer sent an invalid ephemeral key.") from None


def _expect(data: bytes, kind: int, length: int, what: str) -> None:
    if not isinstance(data, bytes):
        raise HandshakeError(f"The peer sent a non-binary {what} message.")
    if len(data) >= _HEADER_LEN and data[:2] == MAGIC and data[3] == T_REJECT:
        _raise_reject(data)
    if len(data) < _HEADER_LEN or data[:2] != MAGIC:
        raise HandshakeError(f"The peer's {what} message is not a valuemesh handshake message.")
    if data[2] != VERSION:
        raise VersionMismatchError(data[2])
    if data[3] != kind:
        raise HandshakeError(f"The peer sent another message where a {what} was due.")
    if len(data) != length:
        raise HandshakeError(f"The peer's {what} message has the wrong length.")


def _raise_reject(data: bytes) -> None:
    if len(data) != REJECT_LEN:
        raise HandshakeError("The peer's refusal message has the wrong length.")
    try:
        code = Refusal(data[4])
    except ValueError:
        raise HandshakeError("The peer refused with an unknown reason.") from None
    if code is Refusal.ACCEPTED:
        raise HandshakeError("The peer sent a refusal that refuses nothing.")
    if code is Refusal.NETWORK_MISMATCH:
        raise NetworkMismatchError()
    if code is Refusal.UNSUPPORTED_VERSION and data[2] != VERSION:
        raise VersionMismatchError(data[2])
    raise PeerRefusedError(code, int.from_bytes(data[5:9], "big"))


def encode_reject(code: Refusal, retry_after: int = 0) -> bytes:
    """A plaintext, unauthenticated refusal a responder sends instead of RESPONSE."""
    if code is Refusal.ACCEPTED:
        raise LocalError("A refusal must name a reason other than acceptance.")
    return _header(T_REJECT) + bytes((code,)) + _u32(retry_after)


def peek_hello_version(data: bytes) -> int | None:
    """The version byte of a would-be HELLO, so a responder can refuse versions it lacks."""
    if isinstance(data, bytes) and len(data) >= _HEADER_LEN and data[:2] == MAGIC:
        return data[2]
    return None


@dataclass(frozen=True, slots=True)
class Frame:
    """One decrypted frame: its kind and body."""

    kind: int
    body: bytes


class SecureChannel:
    """Encrypts outgoing and decrypts incoming frames of one established link.

    Each direction has its own key and counter; a counter is never reused, and the
    channel refuses to send once it would wrap (2^64 frames: unreachable in practice).
    """

    __slots__ = ("_recv_key", "_recv_n", "_send_key", "_send_n", "remote", "session_id")

    def __init__(self, send_key: bytes, recv_key: bytes, remote: MemberId, session_id: bytes):
        self._send_key = send_key
        self._recv_key = recv_key
        self._send_n = 0
        self._recv_n = 0
        self.remote = remote
        self.session_id = session_id

    def seal(self, kind: int, body: bytes) -> bytes:
        if kind not in _FRAME_KINDS:
            raise LocalError("Unknown frame kind.")
        if self._send_n >= _MAX_COUNTER:
            raise LocalError("The link has sent its last possible frame; reconnect.")
        frame = _seal(self._send_key, self._send_n, bytes((kind,)) + body, b"")
        self._send_n += 1
        return frame

    def open(self, frame: bytes) -> Frame:
        if not isinstance(frame, bytes) or len(frame) < FRAME_OVERHEAD:
            raise FrameError("The peer sent a frame too short to be valid.")
        if self._recv_n >= _MAX_COUNTER:
            raise FrameError("The peer sent more frames than a link may carry.")
        plain = _open(self._recv_key, self._recv_n, frame, b"")
        if plain is None:
            raise FrameError("A frame from the peer failed to decrypt: altered, replayed or garbage.")
        self._recv_n += 1
        kind = plain[0]
        if kind not in _FRAME_KINDS:
            raise FrameError("The peer sent a frame of an unknown kind.")
        return Frame(kind, plain[1:])


def _sig_message(label: bytes, transcript: bytes, *keys: bytes) -> bytes:
    return label + transcript + b"".join(keys)


class _Phase(enum.Enum):
    START = "start"
    SENT_HELLO = "sent hello"
    GOT_RESPONSE = "got response"
    SENT_AUTH = "sent auth"
    GOT_HELLO = "got hello"
    GOT_AUTH = "got auth"
    DONE = "done"
    FAILED = "failed"


class _Side:
    """State both ends of a handshake keep: keys, the transcript hash, the phase."""

    def __init__(self, identity: Identity, network_id: bytes, ephemeral_secret: bytes) -> None:
        _check_network_id(network_id)
        self._id = identity
        self._net = network_id
        self._e_sec = ephemeral_secret
        self._e_pub = _check_secret(ephemeral_secret)
        self._phase = _Phase.START
        self._h = _h0(network_id)
        self._dh = b""
        self._remote: MemberId | None = None

    def _step(self, expected: _Phase, nxt: _Phase) -> None:
        if self._phase is not expected:
            raise LocalError(f"Handshake step out of order (state {self._phase.value}).")
        self._phase = nxt


class Initiator(_Side):
    """The client side: start() → HELLO; read_response(RESPONSE) → the responder's key;
    auth() → AUTH; read_verdict(VERDICT) → SecureChannel. Any error is final."""

    def start(self) -> bytes:
        self._step(_Phase.START, _Phase.SENT_HELLO)
        msg = _header(T_HELLO) + network_tag(self._net) + self._e_pub
        self._h = _h(self._h, msg)
        return msg

    def read_response(self, data: bytes) -> MemberId:
        self._step(_Phase.SENT_HELLO, _Phase.FAILED)
        _expect(data, T_RESPONSE, RESPONSE_LEN, "response")
        e_r = data[4:36]
        self._dh = _dh(self._e_sec, e_r)
        k2 = _kdf(self._dh, b"vm2 responder auth", self._h + e_r)
        plain = _open(k2, 0, data[36:], self._h + e_r)
        if plain is None:
            raise HandshakeError("The peer's handshake response failed to decrypt.")
        remote = MemberId(plain[:KEY_LEN])
        remote.verify(_sig_message(b"vm2 responder sig", self._h, e_r, remote.key), plain[KEY_LEN:])
        self._h = _h(self._h, data)
        self._remote = remote
        self._phase = _Phase.GOT_RESPONSE
        return remote

    def auth(self) -> bytes:
        self._step(_Phase.GOT_RESPONSE, _Phase.SENT_AUTH)
        assert self._remote is not None
        me = self._id.member.key
        sig = self._id.sign(_sig_message(b"vm2 initiator sig", self._h, self._remote.key, me))
        k3 = _kdf(self._dh, b"vm2 initiator auth", self._h)
        msg = _header(T_AUTH) + _seal(k3, 0, me + sig, self._h)
        self._h = _h(self._h, msg)
        return msg

    def read_verdict(self, data: bytes) -> SecureChannel:
        self._step(_Phase.SENT_AUTH, _Phase.FAILED)
        assert self._remote is not None
        _expect(data, T_VERDICT, VERDICT_LEN, "verdict")
        k4 = _kdf(self._dh, b"vm2 verdict", self._h)
        plain = _open(k4, 0, data[4:], self._h)
        if plain is None:
            raise HandshakeError("The peer's handshake verdict failed to decrypt.")
        try:
            code = Refusal(plain[0])
        except ValueError:
            raise HandshakeError("The peer's verdict names an unknown reason.") from None
        if code is not Refusal.ACCEPTED:
            raise PeerRefusedError(code, int.from_bytes(plain[1:5], "big"))
        self._phase = _Phase.DONE
        return SecureChannel(
            _kdf(self._dh, b"vm2 traffic i2r", self._h),
            _kdf(self._dh, b"vm2 traffic r2i", self._h),
            self._remote,
            self._h,
        )


class Responder(_Side):
    """The server side: read_hello(HELLO) → RESPONSE; read_auth(AUTH) → the initiator's
    key; verdict(code) → (VERDICT, SecureChannel or None). Any error is final."""

    def read_hello(self, data: bytes) -> bytes:
        """Check HELLO and return RESPONSE; NetworkMismatchError means: send a REJECT."""
        self._step(_Phase.START, _Phase.FAILED)
        _expect(data, T_HELLO, HELLO_LEN, "hello")
        if data[4:36] != network_tag(self._net):
            raise NetworkMismatchError()
        e_i = data[36:68]
        self._dh = _dh(self._e_sec, e_i)
        h1 = _h(self._h, data)
        me = self._id.member.key
        sig = self._id.sign(_sig_message(b"vm2 responder sig", h1, self._e_pub, me))
        k2 = _kdf(self._dh, b"vm2 responder auth", h1 + self._e_pub)
        msg = _header(T_RESPONSE) + self._e_pub + _seal(k2, 0, me + sig, h1 + self._e_pub)
        self._h = _h(h1, msg)
        self._phase = _Phase.GOT_HELLO
        return msg

    def read_auth(self, data: bytes) -> MemberId:
        self._step(_Phase.GOT_HELLO, _Phase.FAILED)
        _expect(data, T_AUTH, AUTH_LEN, "auth")
        k3 = _kdf(self._dh, b"vm2 initiator auth", self._h)
        plain = _open(k3, 0, data[4:], self._h)
        if plain is None:
            raise HandshakeError("The peer's handshake authentication failed to decrypt.")
        remote = MemberId(plain[:KEY_LEN])
        me = self._id.member.key
        remote.verify(_sig_message(b"vm2 initiator sig", self._h, me, remote.key), plain[KEY_LEN:])
        self._h = _h(self._h, data)
        self._remote = remote
        self._phase = _Phase.GOT_AUTH
        return remote

    def verdict(
        self, code: Refusal = Refusal.ACCEPTED, retry_after: int = 0
    ) -> tuple[bytes, SecureChannel | None]:
        """The encrypted VERDICT; with ACCEPTED also the established channel."""
        self._step(_Phase.GOT_AUTH, _Phase.DONE if code is Refusal.ACCEPTED else _Phase.FAILED)
        assert self._remote is not None
        k4 = _kdf(self._dh, b"vm2 verdict", self._h)
        body = bytes((code,)) + _u32(retry_after)
        msg = _header(T_VERDICT) + _seal(k4, 0, body, self._h)
        if code is not Refusal.ACCEPTED:
            return msg, None
        return msg, SecureChannel(
            _kdf(self._dh, b"vm2 traffic r2i", self._h),
            _kdf(self._dh, b"vm2 traffic i2r", self._h),
            self._remote,
            self._h,
        )
