"""The plugins every valuemesh node ships: membership and contribution.

`builtin_registry()` gives a registry holding them, without looking at the
installed entry points (the node adds third-party plugins from those).
"""

from __future__ import annotations

from ..plugins import Registry
from . import contribution, membership


def builtin_registry() -> Registry:
    reg = Registry()
    reg.register(membership.PLUGIN)
    reg.register(contribution.PLUGIN)
    return reg
