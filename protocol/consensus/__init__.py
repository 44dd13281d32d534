"""Leaderless DAG agreement for one constellation: committees, the consensus state machine,
checkpoints and re-founding. Pure: blocks, records and time come in as arguments.
"""

from .checkpoint import (
    Checkpoint,
    CheckpointAggregator,
    CheckpointCertificate,
    Content,
    Refounding,
    committee_hash,
    decode_committee,
    encode_committee,
    verify_chain,
)
from .committee import Committee
from .machine import (
    GC_DEPTH_ROUNDS,
    ROUND_TIMEOUT_MS,
    Committed,
    Consensus,
    Output,
    Params,
)

__all__ = [
    "GC_DEPTH_ROUNDS",
    "ROUND_TIMEOUT_MS",
    "Checkpoint",
    "CheckpointAggregator",
    "CheckpointCertificate",
    "Committed",
    "Committee",
    "Consensus",
    "Content",
    "Output",
    "Params",
    "Refounding",
    "committee_hash",
    "decode_committee",
    "encode_committee",
    "verify_chain",
]
