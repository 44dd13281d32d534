"""A BLAKE2b-256 Merkle tree over canonical CBOR leaves, with inclusion proofs,
so a distribution commits to exactly the inputs it was computed from.

Leaves and inner nodes are hashed under different prefixes (as in RFC 6962)
so no inner node can pass for a leaf; the tree splits at the largest power of
two below its size, so the root of n leaves is defined for every n.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .. import cbor
from ..errors import ValidationError
from ..records import blake2b256

MERKLE_DOMAIN = b"valuemesh/merkle/v1\x00"
_LEAF = b"\x00"
_NODE = b"\x01"
EMPTY_ROOT = blake2b256(MERKLE_DOMAIN)


def leaf_hash(leaf: Any) -> bytes:
    return blake2b256(MERKLE_DOMAIN + _LEAF + cbor.encode(leaf))


def _node(left: bytes, right: bytes) -> bytes:
    return blake2b256(MERKLE_DOMAIN + _NODE + left + right)


def _split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def root_of_hashes(hashes: Sequence[bytes]) -> bytes:
    if not hashes:
        return EMPTY_ROOT
    if len(hashes) == 1:
        return hashes[0]
    k = _split(len(hashes))
    return _node(root_of_hashes(hashes[:k]), root_of_hashes(hashes[k:]))


def merkle_root(leaves: Sequence[Any]) -> bytes:
    """The root over `leaves` in the order given (callers sort them canonically)."""
    return root_of_hashes([leaf_hash(x) for x in leaves])


def inclusion_proof(leaves: Sequence[Any], index: int) -> list[bytes]:
    """Sibling hashes from leaf `index` up to the root."""
    if not 0 <= index < len(leaves):
        raise ValidationError("The leaf index is outside the tree.")
    hashes = [leaf_hash(x) for x in leaves]
    path: list[bytes] = []

    def walk(lo: int, hi: int) -> None:
        if hi - lo == 1:
            return
        k = lo + _split(hi - lo)
        if index < k:
            walk(lo, k)
            path.append(root_of_hashes(hashes[k:hi]))
        else:
            walk(k, hi)
            path.append(root_of_hashes(hashes[lo:k]))

    walk(0, len(hashes))
    return path


def verify_inclusion(leaf: Any, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """Whether `leaf` sits at `index` of a tree of `size` leaves with `root`."""
    if not 0 <= index < size:
        return False
    # Recompute which side each sibling is on, top-down, then fold bottom-up.
    sides: list[bool] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = lo + _split(hi - lo)
        if index < k:
            sides.append(True)  # our subtree is on the left
            hi = k
        else:
            sides.append(False)
            lo = k
    if len(sides) != len(proof):
        return False
    h = leaf_hash(leaf)
    for left, sibling in zip(reversed(sides), proof, strict=True):
        h = _node(h, sibling) if left else _node(sibling, h)
    return h == root
