"""What the simulator's parts share: its options, the simulated hosts, guests and arrays as
data, and :class:`World`, the interface of the simulated world that the parts call back
(vmcluster.sim.world.SimWorld implements it)."""

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from vmcluster.agent.config import Timings
from vmcluster.agent.watchdog import Verdict, verdict
from vmcluster.arrays.driver import export_name
from vmcluster.clusterstate.fake import FakeStore
from vmcluster.clusterstate.handover import DeadAgentTerms
from vmcluster.clusterstate.vmrecords import ClusteredVm
from vmcluster.errors import InvalidState, NotFound
from vmcluster.sim.loop import SimLoop

if TYPE_CHECKING:
    from vmcluster.agent.agent import Agent

EPOCH = 1_800_000_000.0  # the simulated wall clock's zero
PLANTED_BUGS = ("no-fence", "no-self-fence")
Key = tuple[str, int]


class LeaseHolder(Protocol):
    """An agent's connection to etcd, as the checks see it."""

    def holds_live_lease(self) -> bool: ...


SIM_RESTART_GRACE_S = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class SimOptions:
    nodes: int = 3
    vms: int = 4
    arrays: int = 1
    witness: bool = False
    duration_s: float = 60.0  # faults come during this time (after the warm-up)
    settle_s: float = 30.0  # then everything is healed and the cluster must converge by then
    warmup_s: float = 5.0
    faults: bool = True
    planted: frozenset[str] = frozenset()  # test-only bugs: PLANTED_BUGS
    failed_ok: bool = False  # a VM the failover threshold gave up on counts as converged
    # The defaults, with a restart grace short enough for an agent that comes back too late
    # (sim fault planned-restart) to be seen failing over within a run.
    timings: Timings = field(default_factory=lambda: Timings(restart_grace_s=SIM_RESTART_GRACE_S))

    def __post_init__(self) -> None:
        unknown = sorted(self.planted - set(PLANTED_BUGS))
        assert not unknown, unknown


@dataclass(slots=True)
class Violation:
    invariant: str  # I1, I2, I3, I4, or "agent" (an agent failed with an exception)
    at: float
    text: str


class GuestState(StrEnum):
    BOOTING = "booting"
    RUNNING = "running"
    PAUSED = "paused"  # stopped on an I/O error
    DEAD = "dead"


@dataclass(slots=True, kw_only=True)
class Guest:
    id: int
    vm: str
    generation: int
    host: str
    array: str
    lun: str
    started_at: float
    state: GuestState = GuestState.BOOTING
    frozen: bool = False
    seq: int = 0  # the last record written
    acked: list[int] = field(default_factory=list)
    powering_off: bool = False
    ended: str = ""  # how it ended

    @property
    def key(self) -> Key:
        return (self.vm, self.generation)

    @property
    def executing(self) -> bool:
        """Running guest code (booting or running, not frozen, not paused, not dead)."""
        return self.state in (GuestState.BOOTING, GuestState.RUNNING) and not self.frozen

    @property
    def alive(self) -> bool:
        return self.state is not GuestState.DEAD


@dataclass(slots=True, kw_only=True)
class Watchdog:
    """The host's watchdog: the deadline (host clock) and what it watches."""

    deadline: float | None = None
    resiliency_s: float = 0.0
    keys: frozenset[Key] = frozenset()
    frozen: set[Key] = field(default_factory=set)
    enabled: bool = True
    # The agent's terms for a hand-over if it dies (agent/watchdog.py HandOver).
    terms: DeadAgentTerms | None = None

    def check(self, now: float) -> tuple[Verdict, frozenset[Key]]:
        if self.deadline is None or not self.keys or not self.enabled:
            return Verdict.KEEP, frozenset()
        return verdict(now, self.deadline, self.resiliency_s), self.keys


@dataclass(slots=True, kw_only=True)
class Host:
    """One simulated machine: a node (agent, etcd member, guests, watchdog) or the witness
    (an etcd member only)."""

    name: str
    index: int
    is_node: bool
    rate: float  # its clock's rate against virtual time (drift)
    offset: float  # its monotonic clock at virtual time 0
    data_dir: Path
    wall_offset: float = 0.0  # steps of its wall clock
    alive: bool = True
    hung: bool = False
    agent: "Agent | None" = None
    loop: SimLoop | None = None
    agent_task: Any = None  # the task that runs the agent in its loop
    watchdog_loop: SimLoop | None = None  # the watchdog handing a dead agent's node over
    store: LeaseHolder | None = None
    vm_host: Any = None  # the agent's SimHost
    guests: dict[tuple[str, int], Guest] = field(default_factory=dict)
    watchdog: Watchdog = field(default_factory=Watchdog)
    watchdog_ticking: bool = False
    watchdog_ticket: int = 0
    watchdog_check_at: float = 0.0
    incarnations: int = 0

    def clock(self, now: float) -> float:
        return self.offset + self.rate * now

    def global_time(self, local: float) -> float:
        return (local - self.offset) / self.rate

    def wall(self, now: float) -> float:
        return EPOCH + now * self.rate + self.wall_offset


@dataclass(slots=True, kw_only=True)
class Lun:
    size_bytes: int
    mark: int = 0
    exports: set[int] = field(default_factory=set)  # live generations
    data: dict[int, int] = field(default_factory=dict)  # seq -> generation that wrote it


@dataclass(slots=True, kw_only=True)
class SimArray:
    name: str
    up: bool = True
    hung: bool = False
    retire_on_fence: bool = True
    luns: dict[str, Lun] = field(default_factory=dict)

    def fence(self, lun: str, generation: int) -> str:
        record = self._lun(lun)
        if generation < record.mark:
            raise InvalidState(f"array {self.name}: LUN {lun} is fenced at generation "
                               f"{record.mark}; generation {generation} is stale")  # fmt: skip
        if self.retire_on_fence:
            record.exports = {generation}
        else:
            record.exports.add(generation)
        record.mark = generation
        return export_name(lun, generation)

    def _lun(self, lun: str) -> Lun:
        record = self.luns.get(lun)
        if record is None:
            raise NotFound(f"array {self.name}: no LUN {lun!r}")
        return record


class World(Protocol):
    """What the simulator's parts ask of the world."""

    options: SimOptions
    now: float
    db: FakeStore
    hosts: dict[str, Host]
    arrays: dict[str, SimArray]
    guests: list[Guest]
    dirty: bool
    guarded_prefixes: tuple[str, ...]
    array_connect_timeout_s: float

    def note(self, who: str, text: str) -> None: ...
    def violated(self, invariant: str, text: str) -> None: ...
    def reaches_etcd(self, host: Host) -> bool: ...
    def reaches_array(self, host: Host, array: SimArray) -> bool: ...
    def store_delay(self) -> float: ...
    def watch_delay(self) -> float: ...
    def array_delay(self) -> float: ...
    def launch_delay(self) -> float: ...
    def qmp_delay(self) -> float: ...
    def send_datagram(self, src: str, dst: str, network: str, data: bytes) -> None: ...
    def launch(self, host: Host, vm: ClusteredVm, generation: int) -> Guest: ...
    def kill(self, guest: Guest, why: str) -> None: ...
    def freeze(self, guest: Guest, why: str) -> None: ...
    def thaw(self, guest: Guest) -> None: ...
    def power_button(self, guest: Guest) -> None: ...
    def watchdog_told(self, host: Host) -> None: ...
    def vm_names(self) -> list[str]: ...
