"""The split policy: how a constellation divides revenue, as a float-free map
that members vote on, parsed into a frozen `SplitPolicy` with a stable hash.

Fixed claims come first in the policy's `order`; the pool left over is shared
by score = weight * quantity * ack factor * dispute factor * payback factor * decay.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .. import cbor
from ..builtin.contribution import ACTIONS, PAYBACK
from ..errors import ValidationError
from ..invite import ROLES
from ..records import blake2b256
from .money import format_fraction, parse_decimal

POLICY_FORMAT_VERSION = 1
POLICY_HASH_DOMAIN = b"valuemesh/split-policy/v1\x00"
CLAIM_KINDS = ("debt", "reimbursement", "investor_return", "fee", "levy", "rebate")
BPS = 10_000
MAX_WEIGHTS = 64
MAX_WEIGHT = 1_000_000
MAX_WEIGHT_DECIMALS = 6
MAX_ACKS_REQUIRED = 64
MAX_HALF_LIFE_DAYS = 36_500
DAY_MS = 86_400_000
_WEIGHT_KEY_RE = re.compile(r"^[a-z][a-z-]{0,31}(:[^\s:]{1,32})?$")
_KEYS = frozenset(
    {
        "v",
        "order",
        "levy_bps",
        "weights",
        "default_weight",
        "acks",
        "disputes",
        "payback",
        "debts",
        "half_life_days",
        "cap_bps",
        "ratify",
    }
)


def _fail(message: str) -> None:
    raise ValidationError(message)


def _ratio(value: object, what: str, *, at_most: Fraction | None = None) -> Fraction:
    """A non-negative exact number from an integer or a decimal string (never a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValidationError(f"{what} must be an integer or a decimal string like '0.5'.")
    if isinstance(value, int):
        if value < 0:
            raise ValidationError(f"{what} must not be negative.")
        result = Fraction(value)
    else:
        if len(value.partition(".")[2]) > MAX_WEIGHT_DECIMALS:
            raise ValidationError(f"{what} has more than {MAX_WEIGHT_DECIMALS} decimals.")
        result = parse_decimal(value, what)
    limit = at_most if at_most is not None else Fraction(MAX_WEIGHT)
    if result > limit:
        raise ValidationError(f"{what} must be at most {format_fraction(limit)}.")
    return result


def _int(value: object, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValidationError(f"{what} must be an integer from {lo} to {hi}.")
    return value


def _text_ratio(value: Fraction) -> str:
    # Every policy ratio has at most 6 decimals, so this is exact.
    return format_fraction(value, MAX_WEIGHT_DECIMALS)


@dataclass(frozen=True, slots=True)
class Ratification:
    """Whose signatures make a distribution final."""

    customer: bool = True
    recipients: bool = False
    roles: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SplitPolicy:
    """A parsed, validated split policy; `to_map()` is its canonical form."""

    order: tuple[str, ...] = CLAIM_KINDS
    levy_bps: int = 0
    weights: tuple[tuple[str, Fraction], ...] = tuple((a, Fraction(1)) for a in sorted(ACTIONS))
    default_weight: Fraction = Fraction(0)
    acks_required: int = 0
    below_acks_factor: Fraction = Fraction(0)
    disputes_threshold: int = 1
    disputed_factor: Fraction = Fraction(0)
    payback: tuple[tuple[str, Fraction], ...] = (
        ("debt-like", Fraction(1)),
        ("equity-like", Fraction(1)),
        ("gift", Fraction(0)),
        ("once", Fraction(1)),
    )
    debts: bool = True
    half_life_days: int = 0
    cap_bps: int = 0
    ratify: Ratification = Ratification()

    def weight(self, action: str, unit: str) -> Fraction:
        """The weight of one unit of `action` in `unit`: 'action:unit' beats 'action'."""
        table = dict(self.weights)
        specific = table.get(f"{action}:{unit}")
        if specific is not None:
            return specific
        return table.get(action, self.default_weight)

    def payback_factor(self, kind: str) -> Fraction:
        return dict(self.payback).get(kind, Fraction(0))

    @property
    def half_life_ms(self) -> int:
        return self.half_life_days * DAY_MS

    def to_map(self) -> dict[str, Any]:
        return {
            "v": POLICY_FORMAT_VERSION,
            "order": list(self.order),
            "levy_bps": self.levy_bps,
            "weights": {k: _text_ratio(w) for k, w in self.weights},
            "default_weight": _text_ratio(self.default_weight),
            "acks": {"required": self.acks_required, "below": _text_ratio(self.below_acks_factor)},
            "disputes": {
                "threshold": self.disputes_threshold,
                "factor": _text_ratio(self.disputed_factor),
            },
            "payback": {k: _text_ratio(f) for k, f in self.payback},
            "debts": self.debts,
            "half_life_days": self.half_life_days,
            "cap_bps": self.cap_bps,
            "ratify": {
                "customer": self.ratify.customer,
                "recipients": self.ratify.recipients,
                "roles": list(self.ratify.roles),
            },
        }

    @property
    def hash(self) -> bytes:
        return policy_hash(self)


DEFAULT_POLICY = SplitPolicy()


def policy_hash(policy: SplitPolicy) -> bytes:
    """BLAKE2b-256 of the canonical map, so equal policies hash equally however written."""
    return blake2b256(POLICY_HASH_DOMAIN + cbor.encode(policy.to_map()))


def _submap(m: Mapping[str, Any], key: str, allowed: set[str]) -> Mapping[str, Any]:
    value = m.get(key, {})
    if not isinstance(value, dict):
        raise ValidationError(f"The policy's '{key}' must be a map.")
    unknown = set(value) - allowed
    if unknown:
        raise ValidationError(
            f"The policy's '{key}' has an unknown entry '{sorted(map(str, unknown))[0]}'."
        )
    return value


def parse_policy(m: object) -> SplitPolicy:
    """Validate a policy map (from a record, a file or JSON); missing entries take defaults."""
    if not isinstance(m, dict):
        raise ValidationError("A split policy must be a map.")
    unknown = set(m) - _KEYS
    if unknown:
        raise ValidationError(
            f"The split policy has an unknown entry '{sorted(map(str, unknown))[0]}'."
        )
    d = DEFAULT_POLICY
    if m.get("v", POLICY_FORMAT_VERSION) != POLICY_FORMAT_VERSION:
        raise ValidationError(
            f"This valuemesh reads split policy format {POLICY_FORMAT_VERSION} only."
        )
    order = m.get("order", list(d.order))
    if (
        not isinstance(order, list)
        or sorted(map(str, order)) != sorted(CLAIM_KINDS)
        or len(order) != len(CLAIM_KINDS)
    ):
        raise ValidationError(
            f"The policy's 'order' must list each of {', '.join(CLAIM_KINDS)} once."
        )
    weights_in = m.get("weights", {k: 1 for k, _ in d.weights})
    if not isinstance(weights_in, dict) or len(weights_in) > MAX_WEIGHTS:
        raise ValidationError(
            f"The policy's 'weights' must be a map of at most {MAX_WEIGHTS} entries."
        )
    weights = []
    for key, value in weights_in.items():
        if (
            not isinstance(key, str)
            or not _WEIGHT_KEY_RE.match(key)
            or key.split(":")[0] not in ACTIONS
        ):
            raise ValidationError(
                f"The weight key '{key}' must be an action ({', '.join(ACTIONS)}), "
                "optionally followed by ':unit'."
            )
        weights.append((key, _ratio(value, f"The weight of '{key}'")))
    acks = _submap(m, "acks", {"required", "below"})
    disputes = _submap(m, "disputes", {"threshold", "factor"})
    payback_in = _submap(m, "payback", set(PAYBACK))
    payback = dict(d.payback)
    for kind, value in payback_in.items():
        payback[kind] = _ratio(value, f"The payback factor of '{kind}'", at_most=Fraction(1))
    ratify = _submap(m, "ratify", {"customer", "recipients", "roles"})
    roles = ratify.get("roles", [])
    if (
        not isinstance(roles, list)
        or any(r not in ROLES for r in roles)
        or len(set(roles)) != len(roles)
    ):
        raise ValidationError(
            f"The policy's ratifying roles must be distinct roles from: {', '.join(ROLES)}."
        )
    for flag in ("customer", "recipients"):
        if not isinstance(ratify.get(flag, False), bool):
            raise ValidationError(f"The policy's ratify.{flag} must be true or false.")
    if not (ratify.get("customer", d.ratify.customer) or ratify.get("recipients") or roles):
        raise ValidationError("A policy must require at least one ratifying signature.")
    debts = m.get("debts", d.debts)
    if not isinstance(debts, bool):
        raise ValidationError("The policy's 'debts' must be true or false.")
    return SplitPolicy(
        order=tuple(order),
        levy_bps=_int(m.get("levy_bps", d.levy_bps), "The policy's 'levy_bps'", 0, BPS),
        weights=tuple(sorted(weights)),
        default_weight=_ratio(m.get("default_weight", "0"), "The policy's 'default_weight'"),
        acks_required=_int(
            acks.get("required", d.acks_required),
            "The policy's acks.required",
            0,
            MAX_ACKS_REQUIRED,
        ),
        below_acks_factor=_ratio(
            acks.get("below", "0"), "The policy's acks.below", at_most=Fraction(1)
        ),
        disputes_threshold=_int(
            disputes.get("threshold", d.disputes_threshold),
            "The policy's disputes.threshold",
            1,
            MAX_ACKS_REQUIRED,
        ),
        disputed_factor=_ratio(
            disputes.get("factor", "0"), "The policy's disputes.factor", at_most=Fraction(1)
        ),
        payback=tuple(sorted(payback.items())),
        debts=debts,
        half_life_days=_int(
            m.get("half_life_days", d.half_life_days),
            "The policy's 'half_life_days'",
            0,
            MAX_HALF_LIFE_DAYS,
        ),
        cap_bps=_int(m.get("cap_bps", d.cap_bps), "The policy's 'cap_bps'", 0, BPS),
        ratify=Ratification(
            customer=bool(ratify.get("customer", d.ratify.customer)),
            recipients=bool(ratify.get("recipients", d.ratify.recipients)),
            roles=tuple(sorted(roles)),
        ),
    )
