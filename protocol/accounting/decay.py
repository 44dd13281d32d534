"""Exponential decay 2^(-age/half_life) as an exact rational computed with
integer arithmetic only, so every node derives bit-identical scores.

The exponent is truncated to DECAY_EXPONENT_BITS binary places; each set bit
multiplies in a precomputed fixed-point root 2^(-1/2^i) from `math.isqrt`.
"""

from __future__ import annotations

import math
from fractions import Fraction

DECAY_EXPONENT_BITS = 32
DECAY_FRACTION_BITS = 64
# Past this many half-lives the weight is below 2^-128: call it nothing, so
# denominators stay small and ancient contributions cost no arithmetic.
MAX_HALVINGS = 128

_SCALE = 1 << DECAY_FRACTION_BITS


def _roots() -> tuple[int, ...]:
    # roots[i] ≈ 2^(-1/2^(i+1)) * SCALE, each the integer square root of the last.
    out = [math.isqrt(_SCALE * _SCALE // 2)]
    for _ in range(DECAY_EXPONENT_BITS - 1):
        out.append(math.isqrt(out[-1] * _SCALE))
    return tuple(out)


_ROOTS = _roots()


def decay(age: int, half_life: int) -> Fraction:
    """2^(-age/half_life) to DECAY_FRACTION_BITS bits; 1 if half_life is 0 (no decay).

    A negative age (a contribution dated after the revenue) does not grow: it is 1.
    """
    if half_life <= 0 or age <= 0:
        return Fraction(1)
    whole, rest = divmod(age, half_life)
    if whole >= MAX_HALVINGS:
        return Fraction(0)
    bits = (rest << DECAY_EXPONENT_BITS) // half_life
    value = _SCALE
    for i in range(DECAY_EXPONENT_BITS):
        if bits & (1 << (DECAY_EXPONENT_BITS - 1 - i)):
            value = value * _ROOTS[i] // _SCALE
    return Fraction(value, _SCALE << whole)
