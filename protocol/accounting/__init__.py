"""Open-book value accounting: agreements, revenue, voted split policies and
proof-carrying distributions that every member can recompute and verify.

`register(registry)` adds the four accounting plugins; the split itself is the
pure `compute_split(policy, inputs)` with `verify` and `try_policy` beside it.
"""

from __future__ import annotations

from ..plugins import Plugin, Registry
from . import agreement, distribution, policy, revenue
from .distribution import current_split, find_policy, ratifiers, verify_recorded
from .inputs import (
    ContributionInput,
    RevenueInput,
    SplitInputs,
    TermInput,
    current_policy,
    gather_inputs,
)
from .merkle import inclusion_proof, merkle_root, verify_inclusion
from .money import currency_exponent, format_minor, parse_amount
from .split import COMMONS, Distribution, Line, compute_split, pool_scores, try_policy, verify
from .splitpolicy import DEFAULT_POLICY, SplitPolicy, parse_policy, policy_hash

PLUGINS: tuple[Plugin, ...] = (agreement.PLUGIN, revenue.PLUGIN, policy.PLUGIN, distribution.PLUGIN)


def register(registry: Registry) -> Registry:
    """Add the accounting plugins to `registry` and return it."""
    for p in PLUGINS:
        registry.register(p)
    return registry


__all__ = [
    "COMMONS",
    "DEFAULT_POLICY",
    "PLUGINS",
    "ContributionInput",
    "Distribution",
    "Line",
    "RevenueInput",
    "SplitInputs",
    "SplitPolicy",
    "TermInput",
    "compute_split",
    "currency_exponent",
    "current_policy",
    "current_split",
    "find_policy",
    "format_minor",
    "gather_inputs",
    "inclusion_proof",
    "merkle_root",
    "parse_amount",
    "parse_policy",
    "policy_hash",
    "pool_scores",
    "ratifiers",
    "register",
    "try_policy",
    "verify",
    "verify_inclusion",
    "verify_recorded",
]
