"""A deterministic simulator for the consensus machine: virtual clock, virtual network,
seeded faults (crash, restart, partition, delay, drop, reorder, duplicate, equivocate).
"""

from .runner import FAULT_KINDS, RunResult, run
from .world import SIM_CONSTELLATION, SIM_PARAMS, Envelope, SimNode, UnsignedIdentity, World

__all__ = [
    "FAULT_KINDS",
    "SIM_CONSTELLATION",
    "SIM_PARAMS",
    "Envelope",
    "RunResult",
    "SimNode",
    "UnsignedIdentity",
    "World",
    "run",
]
