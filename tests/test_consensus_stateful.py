"""Hypothesis stateful test: generated schedules of delivery, loss, duplication, timers,
proposals, crash/restart, membership changes (epoch ends) and one equivocator; safety after
every step, liveness at the end.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from valuemesh.protocol.sim import World
from valuemesh.protocol.sim.runner import scale_weights

NODES = 4
BYZANTINE = 3
HONEST = st.integers(0, NODES - 2)


class ConsensusSchedules(RuleBasedStateMachine):
    """The adversary owns the network: it picks which message arrives, is lost or doubled."""

    def __init__(self) -> None:
        super().__init__()
        self.world = World(NODES, byzantine=[BYZANTINE], crypto=False, reconfigure=scale_weights)
        self.world.twin_split[BYZANTINE] = {0, 1}
        self.down: set[int] = set()

    @rule(i=st.integers(0, NODES - 1))
    def propose(self, i: int) -> None:
        self.world.propose(i)

    @precondition(lambda self: bool(self.world.outbox))
    @rule(k=st.integers(0, 1_000))
    def deliver(self, k: int) -> None:
        box = self.world.outbox
        self.world.deliver(box.pop(k % len(box)))

    @precondition(lambda self: bool(self.world.outbox))
    @rule(k=st.integers(0, 1_000))
    def lose(self, k: int) -> None:
        box = self.world.outbox
        box.pop(k % len(box))

    @precondition(lambda self: bool(self.world.outbox))
    @rule(k=st.integers(0, 1_000))
    def duplicate(self, k: int) -> None:
        box = self.world.outbox
        self.world.deliver(box[k % len(box)])

    @rule(i=HONEST)
    def change_membership(self, i: int) -> None:
        self.world.propose(i, type="membership", data={"scale": 2})

    @rule(i=st.integers(0, NODES), dt=st.integers(0, 600))
    def tick(self, i: int, dt: int) -> None:
        self.world.now += dt
        self.world.tick(i)

    @precondition(lambda self: not self.down)
    @rule(i=HONEST)
    def crash(self, i: int) -> None:
        self.world.crash(i)
        self.down.add(i)

    @precondition(lambda self: bool(self.down))
    @rule()
    def restart(self) -> None:
        for i in sorted(self.down):
            self.world.restart(i)
        self.down.clear()

    @invariant()
    def safe(self) -> None:
        assert self.world.check_safety() == []

    def teardown(self) -> None:
        for i in sorted(self.down):
            self.world.restart(i)
        self.world.heal()
        assert self.world.settle(30_000), "the world did not settle: livelock"
        assert self.world.check_safety() == []
        assert self.world.check_liveness() == []


ConsensusSchedules.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
TestConsensusSchedules = ConsensusSchedules.TestCase
