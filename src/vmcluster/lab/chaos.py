"""``vmcluster lab chaos``: random faults and admin operations on a lab that is up, for a while;
then everything healed, the cluster waited for, and the probe checker run.

Two halves:

- **The plan**, pure (:func:`make_plan`): a seed, the duration, the lab's nodes, arrays and
  witness and the VMs' names in, a tuple of :class:`Step` out; the same inputs give the same
  plan. A step is one fault of the lab's fault set (:mod:`vmcluster.lab.faults`) or one admin
  operation, held for a drawn while and then undone; the next step starts a drawn gap after
  that. Steps never overlap: one disruptive thing at a time, so that a 3-node lab keeps its
  quorum. Kinds are dealt from a shuffled deck (each kind once per round), so that a short run
  tries them all. ``Step.at_s`` is where a step would start if faults and operations took no time
  of their own; a run starts each step ``gap_s`` after the previous one was undone, so it drifts
  later and runs fewer steps than planned when operations take long (a drain, a restart).
- **The run** (:class:`ChaosRun`, asyncio, the lab's blocking fault calls in threads): the HA
  policy that takes VMs out on purpose is relaxed for the run (failover threshold and restart
  limit 1000; the unclean exits that would quarantine a node are forgotten before each step,
  as bench/failover.py does) and restored at the end; the steps are carried out while a poller
  records the VMs every 0.5 s and the cluster's events; at the end of the duration (or when
  interrupted) everything is healed; then the run waits, bounded, until the cluster converged
  (every node Up, one leader, every VM that should run running exactly once, on its owner at
  its generation, and writing; every other VM stopped with no QEMU left) and runs the checker
  (:mod:`vmcluster.lab.probecheck`). The report says per step when it was done, what it was,
  and how the cluster reacted: its events, the VMs that went down or moved, and when each ran
  again (:func:`vm_reactions`, pure).
"""

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from vmcluster.api.client import ApiClient, ApiUnreachable
from vmcluster.clusterstate.keys import Keys
from vmcluster.core.model import DEFAULT_IMAGE
from vmcluster.core.units import MIB, parse_duration
from vmcluster.errors import InvalidInput, InvalidState, MissingDependency, VmclusterError
from vmcluster.guest.record import acked_sequences
from vmcluster.lab import faults, netns
from vmcluster.lab.lab import NODE_VM_MEMORY_MIB, Lab
from vmcluster.lab.plan import CLUSTER_NETWORKS, STORAGE_NETWORKS, Network, Role
from vmcluster.lab.probecheck import check_lab
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

MIN_DURATION_S, MAX_DURATION_S = 10.0, 24 * 3600.0
DEFAULT_VMS = 3
VM_MEMORY_MIB = 128
VM_DISK_BYTES = 16 * MIB
DEFAULT_CONVERGE_TIMEOUT_S = 120.0

# ----- the plan (pure) -----


class StepKind(StrEnum):
    CRASH = "crash"  # a node: power cut, then restart
    LINK = "link"  # a node's or an array's link on one network: down, then up
    PARTITION = "partition"  # a node from the others (or from one other node), then healed
    FREEZE = "freeze"  # a node's agent: SIGSTOP, then SIGCONT
    ARRAY_CRASH = "array-crash"  # an array host: power cut, then restart
    SLOW = "slow"  # a link limited to a rate both ways (tbf), then unlimited
    VM_STOP = "vm-stop"  # admin: vm stop (waits until stopped), then vm start
    DRAIN = "drain"  # admin: node drain --wait, then node resume


FIRST_GAP_S = (1.0, 5.0)
GAP_S = (2.0, 10.0)  # after the previous step was undone
HOLD_S = {
    StepKind.CRASH: (4.0, 20.0),
    StepKind.LINK: (3.0, 20.0),
    StepKind.PARTITION: (4.0, 20.0),
    StepKind.FREEZE: (3.0, 15.0),
    StepKind.ARRAY_CRASH: (4.0, 15.0),
    StepKind.SLOW: (5.0, 20.0),
    StepKind.VM_STOP: (2.0, 10.0),
    StepKind.DRAIN: (3.0, 12.0),
}
RATES = ("100kbit", "1mbit", "10mbit")
PARTIAL_PARTITION_CHANCE = 0.25  # a node cut from one other node only (the rest hears both)
NODE_NETWORKS = (*CLUSTER_NETWORKS, *STORAGE_NETWORKS)  # the vm network carries no traffic yet
ARRAY_NETWORKS = STORAGE_NETWORKS


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One fault or admin operation of a plan. ``host``: the node or array it acts on (for a
    partition, the node cut off: group A); ``others``: a partition's group B."""

    index: int  # 1, 2, ...
    kind: StepKind
    at_s: float  # planned start: the gaps and holds before it, summed
    gap_s: float  # after the previous step was undone (from the run's start for the first)
    hold_s: float  # from when the fault is in place (an operation done) until it is undone
    host: str = ""
    network: str = ""  # link, slow
    rate: str = ""  # slow
    others: tuple[str, ...] = ()  # partition
    vm: str = ""  # vm-stop

    def describe(self) -> str:
        """What is done: ``crash n2``, ``partition n1 / n2 n3``, ``node drain n3``, ..."""
        match self.kind:
            case StepKind.CRASH:
                return f"crash {self.host}"
            case StepKind.LINK:
                return f"link {self.host} {self.network} down"
            case StepKind.PARTITION:
                return f"partition {self.host} / {' '.join(self.others)}"
            case StepKind.FREEZE:
                return f"freeze {self.host} agent"
            case StepKind.ARRAY_CRASH:
                return f"crash array {self.host}"
            case StepKind.SLOW:
                return f"slow {self.host} {self.network} {self.rate}"
            case StepKind.VM_STOP:
                return f"vm stop {self.vm}"
            case StepKind.DRAIN:
                return f"node drain {self.host} --wait"

    def describe_undo(self) -> str:
        match self.kind:
            case StepKind.CRASH | StepKind.ARRAY_CRASH:
                return f"restart {self.host}"
            case StepKind.LINK:
                return f"link {self.host} {self.network} up"
            case StepKind.PARTITION:
                return "heal the partition"
            case StepKind.FREEZE:
                return f"thaw {self.host} agent"
            case StepKind.SLOW:
                return f"unlimit {self.host} {self.network}"
            case StepKind.VM_STOP:
                return f"vm start {self.vm}"
            case StepKind.DRAIN:
                return f"node resume {self.host}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "kind": str(self.kind),
                               "what": self.describe(), "undo": self.describe_undo(),
                               "planned_at_s": self.at_s, "gap_s": self.gap_s,
                               "hold_s": self.hold_s}  # fmt: skip
        for name in ("host", "network", "rate", "vm"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.others:
            out["others"] = list(self.others)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ChaosPlan:
    seed: int
    duration_s: float
    steps: tuple[Step, ...]

    def kinds(self) -> list[str]:
        return [str(s.kind) for s in self.steps]


def parse_chaos_duration(text: str) -> float:
    """``--duration``: 90, 90s, 10m, 1.5h; from 10 s to 24 h."""
    seconds = parse_duration(text, what="--duration")
    if not MIN_DURATION_S <= seconds <= MAX_DURATION_S:
        raise InvalidInput(f"invalid --duration {text!r}: use 10 s to 24 h (e.g. 90s, 10m, 1h)")
    return seconds


def possible_kinds(*, arrays: Sequence[str], vms: Sequence[str]) -> tuple[StepKind, ...]:
    """The kinds a lab with these arrays and VMs can take (in StepKind's order)."""
    unusable = {StepKind.ARRAY_CRASH: not arrays, StepKind.VM_STOP: not vms}
    return tuple(k for k in StepKind if not unusable.get(k, False))


def _draw(rng: random.Random, bounds: tuple[float, float]) -> float:
    return round(rng.uniform(*bounds), 1)


def _targets(
    rng: random.Random, kind: StepKind, nodes: Sequence[str], arrays: Sequence[str],
    vms: Sequence[str], witness: str | None,
) -> dict[str, Any]:  # fmt: skip
    match kind:
        case StepKind.CRASH | StepKind.FREEZE | StepKind.DRAIN:
            return {"host": rng.choice(nodes)}
        case StepKind.ARRAY_CRASH:
            return {"host": rng.choice(arrays)}
        case StepKind.LINK | StepKind.SLOW:
            host = rng.choice([*nodes, *arrays])
            networks = NODE_NETWORKS if host in nodes else ARRAY_NETWORKS
            out = {"host": host, "network": str(rng.choice(networks))}
            if kind is StepKind.SLOW:
                out["rate"] = rng.choice(RATES)
            return out
        case StepKind.PARTITION:
            host = rng.choice(nodes)
            rest = [n for n in nodes if n != host] + ([witness] if witness else [])
            partial = rng.random() < PARTIAL_PARTITION_CHANCE and len(rest) >= 2
            others = (rng.choice([n for n in nodes if n != host]),) if partial else tuple(rest)
            return {"host": host, "others": others}
        case StepKind.VM_STOP:
            return {"vm": rng.choice(vms)}


def check_shape(nodes: Sequence[str], witness: str | None) -> None:
    """At least 2 nodes (one to fail over to) and 3 etcd members (a quorum through a fault)."""
    if len(nodes) < 2 or len(nodes) + (1 if witness else 0) < 3:
        raise InvalidInput(f"chaos needs 3 etcd members to keep quorum through a fault, and "
                           f"2 nodes to fail over to: this lab has {len(nodes)} nodes"
                           f"{' and a witness' if witness else ''} (lab up --nodes 3, or "
                           "--nodes 2 --witness)")  # fmt: skip


def make_plan(
    *, seed: int, duration_s: float, nodes: Sequence[str], arrays: Sequence[str],
    vms: Sequence[str], witness: str | None = None,
) -> ChaosPlan:  # fmt: skip
    """The steps for ``duration_s`` seconds, drawn from ``random.Random(seed)`` only.

    Per step, in this order: its gap, its kind (from the deck), its targets, its hold. Steps
    are planned until the next one would start at or after ``duration_s``. A lab needs at
    least 2 nodes and 3 etcd members (nodes and witness): one fault at a time then keeps a
    quorum."""
    check_shape(nodes, witness)
    if not duration_s > 0:
        raise InvalidInput(f"invalid chaos duration {duration_s!r} s: use more than 0")
    kinds = possible_kinds(arrays=arrays, vms=vms)
    rng = random.Random(seed)
    deck: list[StepKind] = []
    steps: list[Step] = []
    free_at = 0.0  # when the previous step is planned to be undone
    while True:
        gap = _draw(rng, GAP_S if steps else FIRST_GAP_S)
        start = round(free_at + gap, 1)
        if start >= duration_s:
            break
        if not deck:
            deck = list(kinds)
            rng.shuffle(deck)
        kind = deck.pop()
        targets = _targets(rng, kind, nodes, arrays, vms, witness)
        hold = _draw(rng, HOLD_S[kind])
        steps.append(Step(index=len(steps) + 1, kind=kind, at_s=start, gap_s=gap, hold_s=hold,
                          **targets))  # fmt: skip
        free_at = start + hold
    return ChaosPlan(seed=seed, duration_s=duration_s, steps=tuple(steps))


# ----- reactions (pure) -----


STALL_S = 3.0  # no new ACK for this long: the VM's writes stalled (its probe writes every 0.1 s)


@dataclass(frozen=True, slots=True, kw_only=True)
class VmSeen:
    """A VM as one poll showed it: ``GET /v1/vms``, and the highest ACK on the console of its
    current instance (0 if it runs nowhere or acknowledged nothing yet)."""

    state: str
    owner: str | None
    generation: int
    intent: str
    acked: int = 0

    @property
    def running(self) -> bool:
        return self.state == "running"

    def where(self) -> str:
        return f"{self.owner or '-'} g{self.generation}"


Observation = tuple[float, Mapping[str, VmSeen]]  # seconds from the run's start, VMs by name


@dataclass(frozen=True, slots=True, kw_only=True)
class _Point:
    t: float
    seen: VmSeen
    rose: bool  # its highest ACK rose since the poll before
    last_rise_t: float | None  # the latest poll (this one included) at which it rose

    def healthy(self, stall_s: float) -> bool:
        """Running and writing: an ACK rose within ``stall_s``."""
        return self.seen.running and self.last_rise_t is not None \
            and self.t - self.last_rise_t < stall_s  # fmt: skip


def _points(series: Sequence[tuple[float, VmSeen]]) -> list[_Point]:
    points, top, last_rise = [], 0, None
    for t, seen in series:
        rose = seen.acked > top
        if rose:
            top, last_rise = seen.acked, t
        points.append(_Point(t=t, seen=seen, rose=rose, last_rise_t=last_rise))
    return points


def _went_down(before: VmSeen, now: VmSeen) -> bool:
    """Stopped running, or runs another generation (a move quicker than the poll)."""
    return before.running and (not now.running or now.generation != before.generation)


def vm_reactions(
    observations: Sequence[Observation], start_s: float, end_s: float, stall_s: float = STALL_S
) -> list[dict[str, Any]]:
    """The VMs a step disturbed, and when each wrote again.

    A VM is disturbed when, at a poll between ``start_s`` and ``end_s`` (the next step's
    start), it stops being healthy (running, with an ACK within ``stall_s``): it stops running
    or runs another generation (``how``: "down"), or its writes stall ("stalled"). Then, looked
    for up to the last observation (None if never): when it stopped running and ran again, and
    when its highest ACK rose again, and where (``to``). ``outage_s`` runs from the last poll
    that saw an ACK rise to the first that saw one rise again: the time without a new
    acknowledged write, up to two poll intervals more than the truth."""
    names = sorted({name for _, seen in observations for name in seen})
    out = []
    for name in names:
        points = _points([(t, seen[name]) for t, seen in observations if name in seen])
        hit = next((i for i in range(1, len(points))
                    if start_s < points[i].t < end_s and points[i - 1].healthy(stall_s)
                    and (_went_down(points[i - 1].seen, points[i].seen)
                         or not points[i].healthy(stall_s))), None)  # fmt: skip
        if hit is None:
            continue
        before, at = points[hit - 1], points[hit]
        later = points[hit:]
        down = next((p for p in later if _went_down(before.seen, p.seen)), None)
        running = None if down is None else next((p for p in later if p.t >= down.t
                                                  and p.seen.running), None)  # fmt: skip
        # Writing again: a new ACK while it runs (a guest that is shutting down still writes).
        writing = next((p for p in points[hit + 1 :] if p.rose and p.seen.running), None)
        if at.rose and at.seen.running and _went_down(before.seen, at.seen):
            writing = at  # moved and wrote between two polls
        last = points[-1]
        stopped_at = before.last_rise_t if before.last_rise_t is not None else before.t
        out.append({
            "vm": name,
            "how": "down" if down is not None and down.t == at.t else "stalled",
            "from": before.seen.where(),
            "disturbed_at_s": round(at.t, 1),
            "writes_stopped_at_s": round(stopped_at, 1),
            "down_at_s": None if down is None else round(down.t, 1),
            "running_again_at_s": None if running is None else round(running.t, 1),
            "writing_again_at_s": None if writing is None else round(writing.t, 1),
            "to": None if writing is None else writing.seen.where(),
            "moved": writing is not None and writing.seen.owner != before.seen.owner,
            "since_step_s": None if writing is None else round(writing.t - start_s, 1),
            "outage_s": None if writing is None else round(writing.t - stopped_at, 1),
            "last_seen": f"{last.seen.state} {last.seen.where()} at {last.t:.1f} s",
        })  # fmt: skip
    return out


def summarize_reaction(vms: Sequence[Mapping[str, Any]]) -> str:
    """One line per step: ``probe2 n2 g1 -> n3 g2, writing again after 6.3 s (outage 5.9 s)``,
    ``probe1 n1 g2 stalled, n1 g3 (same node), ...``, ``... not writing again (last ...)``."""
    parts = []
    for r in vms:
        head = f"{r['vm']} {r['from']}" + (" stalled," if r["how"] == "stalled" else "")
        if r["to"] is None:
            parts.append(f"{head} not writing again (last: {r['last_seen']})")
            continue
        if r["moved"]:
            where = f"-> {r['to']}"
        elif r["to"] != r["from"]:
            where = f"-> {r['to']} (same node)"
        else:
            where = "same instance"
        parts.append(f"{head} {where}, writing again after {r['since_step_s']:.1f} s "
                     f"(outage {r['outage_s']:.1f} s)")  # fmt: skip
    return "; ".join(parts) if parts else "no VM disturbed"


# ----- the run -----


@dataclass(slots=True, kw_only=True)
class StepResult:
    step: Step
    at_s: float
    in_place_at_s: float | None = None
    undo_at_s: float | None = None  # when its undoing began
    undone_at_s: float | None = None
    placed: bool = False  # the fault is in place / the operation was requested: undo it
    did: str = ""
    undid: str = ""
    errors: list[str] = field(default_factory=list)


class Progress:
    """The progress line on a stream: rewritten in place on a terminal, else a line whenever
    the activity changes and every 15 s."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.shown = ""
        self.shown_at = 0.0

    def show(self, line: str, activity: str) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
        elif activity != self.shown or now - self.shown_at >= 15.0:
            self.stream.write(line + "\n")
        else:
            return
        self.stream.flush()
        self.shown, self.shown_at = activity, now

    def note(self, line: str) -> None:
        """A line of its own (the seed, a warning)."""
        self.stream.write(("\r\x1b[K" if self.tty else "") + line + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


POLL_S = 0.5  # the VM list, for the reactions
EVENTS_POLL_S = 5.0
API_READ_TIMEOUT_S = 15.0
WARMUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 90.0  # a guest is killed 30 s after its power button
DRAIN_TIMEOUT_S = 150.0
CONVERGE_POLL_S = 1.0
CONSOLE_TAIL_BYTES = 4096
# What a step or the healing may meet and report (a programmer's error still crashes).
OPERATIONAL = (VmclusterError, subprocess.SubprocessError, OSError)
RELAXED_POLICY = {"restart_limit": 1000, "failover_threshold": 1000}
BETWEEN = ("stopping", "stopped", "starting")  # a drained VM on its way (as node drain --wait)


def _path(kind: str, name: str, suffix: str = "") -> str:
    return f"/v1/{kind}/{quote(name, safe='')}{suffix}"


def _qemu_instances(lab: Lab) -> dict[str, list[dict[str, Any]]]:
    """Every QEMU of a lab VM in every node's namespace, as the lab sees it from outside (the
    VM's name and generation from its command line): VM -> [{node, generation, pid, frozen}]."""
    found: dict[str, list[dict[str, Any]]] = {}
    for host in lab.plan().nodes:
        for pid in netns.pids(host.namespace):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                status = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            name = next((a[6:].split(b",")[0] for a in argv if a.startswith(b"guest=")), None)
            generation = next((int(w.split(b"=")[1]) for a in argv for w in a.split()
                               if w.startswith(b"vmcluster.gen=") and w[14:].isdigit()),
                              None)  # fmt: skip
            state = status[status.rindex(")") + 2 :].split()[0]
            if name is None or generation is None or state in ("Z", "X"):
                continue
            found.setdefault(name.decode(), []).append(
                {"node": host.name, "generation": generation, "pid": pid, "frozen": state == "T"}
            )
    return found


def _top_ack(lab: Lab, vm: str, node: str, generation: int) -> int:
    """The highest ACK near the end of the console of ``vm`` generation ``generation`` on
    ``node`` (0 if none): the lab reads it from outside, as the checker does."""
    path = lab.host_dir(node) / "data" / "vms" / vm / f"g{generation}.console"
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - CONSOLE_TAIL_BYTES))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return 0
    if size > CONSOLE_TAIL_BYTES:
        tail = tail.split("\n", 1)[-1]  # the first line may be cut
    return max(acked_sequences(tail), default=0)


def _forget_exits(lab: Lab) -> None:
    """Drop the leader's record of unclean exits (as bench/failover.py does): every node fault
    makes one, and three on a node within an hour would quarantine it, which takes it out of
    the run on purpose (core/quarantine.py). Asked of the first node whose etcd answers."""
    key = Keys(lab.name).quarantine
    last: Exception | None = None
    for host in lab.plan().nodes:
        try:
            netns.run(["ip", "netns", "exec", host.namespace, "etcdctl", "--endpoints",
                       "http://127.0.0.1:2379", "--dial-timeout", "2s", "--command-timeout",
                       "3s", "del", key])  # fmt: skip
            return
        except OPERATIONAL as exc:
            last = exc
    raise VmclusterError(f"could not forget the unclean exits: {last}")


class ChaosRun:
    """One chaos run on ``lab``: :meth:`run` returns the report (a JSON-able dict)."""

    def __init__(
        self, lab: Lab, plan: ChaosPlan, *, api: ApiClient, vms: Mapping[str, list[str]],
        should_run: Sequence[str], converge_timeout_s: float, progress: Progress,
    ) -> None:  # fmt: skip
        self.lab = lab
        self.plan = plan
        self.api = api
        self.vms = vms  # "created", "existing"
        self.should_run = frozenset(should_run)  # intent running at the start
        self.converge_timeout_s = converge_timeout_s
        self.progress = progress
        self.t0 = 0.0  # loop time at the run's start
        self.wall_t0 = 0.0
        self.observations: list[Observation] = []
        self.events: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.results: list[StepResult] = []
        self.activity = "starting"
        self.current: StepResult | None = None
        self.errors: list[str] = []
        self.poll_failures = 0
        self.stopped_vms: set[str] = set()  # by a step, to be started again
        self.drained_nodes: set[str] = set()  # by a step, to be resumed
        self.policy_before: dict[str, Any] | None = None
        self.heal_started_at_s: float | None = None
        self.healed_at_s: float | None = None
        self.healed = ""
        self.done = asyncio.Event()

    def now_s(self) -> float:
        return asyncio.get_running_loop().time() - self.t0

    async def _sleep_until(self, at_s: float) -> None:
        delay = at_s - self.now_s()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _get(self, path: str) -> Any:
        try:
            async with asyncio.timeout(API_READ_TIMEOUT_S):
                return await self.api.request("GET", path)
        except TimeoutError:
            raise ApiUnreachable(f"no answer to GET {path} within {API_READ_TIMEOUT_S:g} s") \
                from None  # fmt: skip

    async def _wait_done(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.done.wait()

    # ----- the whole run -----

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self.t0, self.wall_t0 = loop.time(), time.time()
        log.info(event("lab.chaos.start", lab=self.lab.name, seed=self.plan.seed,
                       duration_s=self.plan.duration_s, steps=len(self.plan.steps)))  # fmt: skip
        await self._relax_policy()  # a failure here is the run's error, nothing was done yet
        async with asyncio.TaskGroup() as group:
            group.create_task(self._poll_vms(), name="chaos-poll-vms")
            group.create_task(self._poll_events(), name="chaos-poll-events")
            group.create_task(self._show_progress(), name="chaos-progress")
            try:
                await self._steps()  # each step reports its own errors
            finally:
                await self._heal()  # also when interrupted: the lab is left healed
            convergence = await self._converge()
            self.activity = "checking"
            check = await self._check()
            await self._fetch_events()
            self.done.set()
        self.progress.end()
        return self._report(convergence, check)

    async def _steps(self) -> None:
        end = self.plan.duration_s
        free_at = 0.0
        for step in self.plan.steps:
            start = free_at + step.gap_s
            if start >= end:
                break
            self.activity = f"waiting {step.gap_s:.1f} s before step {step.index}"
            await self._sleep_until(start)
            await self._step(step)
            free_at = self.now_s()
        self.activity = "quiet until the end of the duration"
        self.current = None
        await self._sleep_until(end)

    async def _step(self, step: Step) -> None:
        try:
            await asyncio.to_thread(_forget_exits, self.lab)
        except OPERATIONAL as exc:
            self.errors.append(f"before step {step.index}: {exc}")
        result = StepResult(step=step, at_s=round(self.now_s(), 1))
        self.results.append(result)
        self.current = result
        self.activity = f"step {step.index}: {step.describe()}"
        log.info(event("lab.chaos.step", index=step.index, step=step.describe(), at_s=result.at_s))
        try:
            result.did = await self._inject(step, result)
            result.placed = True
            result.in_place_at_s = round(self.now_s(), 1)
            await self._sleep_until(min(result.in_place_at_s + step.hold_s, self.plan.duration_s))
        except OPERATIONAL as exc:
            result.errors.append(f"{step.describe()}: {exc}")
            log.warning(event("lab.chaos.step.failed", index=step.index, reason=str(exc)))
        finally:
            if result.placed:
                result.undo_at_s = round(self.now_s(), 1)
                self.activity = f"step {step.index}: {step.describe_undo()}"
                try:
                    result.undid = await self._undo(step)
                except OPERATIONAL as exc:
                    result.errors.append(f"{step.describe_undo()}: {exc}")
            if result.errors:  # whatever the failed step left in place: one fault at a time
                try:
                    result.undid += await asyncio.to_thread(faults.heal, self.lab)
                except OPERATIONAL as exc:
                    result.errors.append(f"heal after the failed step: {exc}")
            result.undone_at_s = round(self.now_s(), 1)
            self.current = None

    # ----- steps: inject and undo -----

    async def _inject(self, step: Step, result: StepResult) -> str:
        lab = self.lab
        match step.kind:
            case StepKind.CRASH | StepKind.ARRAY_CRASH:
                return await asyncio.to_thread(faults.crash, lab, step.host)
            case StepKind.LINK:
                return await asyncio.to_thread(faults.set_link, lab, step.host,
                                               Network(step.network), up=False)  # fmt: skip
            case StepKind.PARTITION:
                return await asyncio.to_thread(faults.partition, lab, [step.host],
                                               list(step.others))  # fmt: skip
            case StepKind.FREEZE:
                return await asyncio.to_thread(faults.freeze, lab, step.host, "agent")
            case StepKind.SLOW:
                return await asyncio.to_thread(faults.slow, lab, step.host, Network(step.network),
                                               step.rate)  # fmt: skip
            case StepKind.VM_STOP:
                return await self._stop_vm(step.vm, result)
            case StepKind.DRAIN:
                return await self._drain(step.host, result)

    async def _undo(self, step: Step) -> str:
        lab = self.lab
        match step.kind:
            case StepKind.CRASH | StepKind.ARRAY_CRASH:
                return await asyncio.to_thread(faults.restart, lab, step.host)
            case StepKind.LINK:
                return await asyncio.to_thread(faults.set_link, lab, step.host,
                                               Network(step.network), up=True)  # fmt: skip
            case StepKind.PARTITION | StepKind.SLOW:  # the only fault in place: heal undoes it
                return await asyncio.to_thread(faults.heal, lab)
            case StepKind.FREEZE:
                return await asyncio.to_thread(faults.thaw, lab, step.host, "agent")
            case StepKind.VM_STOP:
                await self.api.request("POST", _path("vms", step.vm, "/start"))
                self.stopped_vms.discard(step.vm)
                return f"start of {step.vm} requested"
            case StepKind.DRAIN:
                await self.api.request("POST", _path("nodes", step.host, "/resume"))
                self.drained_nodes.discard(step.host)
                return f"resumed {step.host}"

    async def _stop_vm(self, vm: str, result: StepResult) -> str:
        started = self.now_s()
        result.placed = True  # started again even if the answer to the stop is lost
        self.stopped_vms.add(vm)
        await self.api.request("POST", _path("vms", vm, "/stop"))
        while True:
            seen = await self._get(_path("vms", vm))
            if seen["state"] == "stopped":
                return f"stopped {vm} in {self.now_s() - started:.1f} s"
            if self.now_s() - started > STOP_TIMEOUT_S:
                raise InvalidState(f"VM {vm} is still {seen['state']} {STOP_TIMEOUT_S:g} s after "
                                   f"its stop ({seen['reason']})")  # fmt: skip
            await asyncio.sleep(0.5)

    async def _drain(self, node: str, result: StepResult) -> str:
        started = self.now_s()
        result.placed = True  # resumed even if the answer to the drain is lost
        self.drained_nodes.add(node)
        await self.api.request("POST", _path("nodes", node, "/drain"))
        while True:
            vms = await self._get("/v1/vms")
            left = [v["name"] for v in vms if v["owner"] == node
                    or (v["intent"] == "running" and v["state"] in BETWEEN)]  # fmt: skip
            if not left:
                return f"drained {node} in {self.now_s() - started:.1f} s"
            if self.now_s() - started > DRAIN_TIMEOUT_S:
                raise InvalidState(f"node {node} still holds {', '.join(left)} "
                                   f"{DRAIN_TIMEOUT_S:g} s after its drain")  # fmt: skip
            await asyncio.sleep(0.5)

    # ----- policy, healing -----

    async def _relax_policy(self) -> None:
        ha = await self._get("/v1/ha")
        self.policy_before = {k: ha[k] for k in RELAXED_POLICY}
        await self.api.request("POST", "/v1/ha/settings", RELAXED_POLICY)

    async def _heal(self) -> None:
        """Everything undone: the lab's faults, the steps' admin operations, the policy."""
        self.activity = "healing"
        self.current = None
        self.heal_started_at_s = round(self.now_s(), 1)
        try:
            self.healed = await asyncio.to_thread(faults.heal, self.lab)
        except OPERATIONAL as exc:
            self.errors.append(f"heal: {exc}")
        for node in sorted(self.drained_nodes):
            try:
                await self.api.request("POST", _path("nodes", node, "/resume"))
            except OPERATIONAL as exc:
                self.errors.append(f"heal: node resume {node}: {exc}")
        for vm in sorted(self.stopped_vms):
            try:
                await self.api.request("POST", _path("vms", vm, "/start"))
            except OPERATIONAL as exc:
                self.errors.append(f"heal: vm start {vm}: {exc}")
        if self.policy_before is not None:
            try:
                await self.api.request("POST", "/v1/ha/settings", self.policy_before)
            except OPERATIONAL as exc:
                self.errors.append(f"heal: restoring the HA settings {self.policy_before}: {exc}")
        try:
            await asyncio.to_thread(_forget_exits, self.lab)
        except OPERATIONAL as exc:
            self.errors.append(f"heal: {exc}")
        self.healed_at_s = round(self.now_s(), 1)
        log.info(event("lab.chaos.healed", at_s=self.healed_at_s, healed=self.healed))

    # ----- convergence and check -----

    async def _converge(self) -> dict[str, Any]:
        """Until the cluster converged (see the module docstring), at most converge_timeout_s."""
        started = self.now_s()
        first_acks: dict[tuple[str, str, int], int] = {}
        timeline: list[dict[str, Any]] = []  # the problems whenever they change
        while True:
            self.activity = f"waiting for convergence ({self.now_s() - started:.0f} s)"
            problems, seen = await self._problems(first_acks)
            waited = round(self.now_s() - started, 1)
            if not timeline or timeline[-1]["problems"] != problems:
                timeline.append({"after_s": waited, "problems": problems})
            if not problems or waited > self.converge_timeout_s:
                return {"converged": not problems, "after_s": waited,
                        "timeout_s": self.converge_timeout_s, "problems": problems,
                        "timeline": timeline, **seen}  # fmt: skip
            await asyncio.sleep(CONVERGE_POLL_S)

    async def _problems(
        self, first_acks: dict[tuple[str, str, int], int]
    ) -> tuple[list[str], dict[str, Any]]:
        try:
            nodes = await self._get("/v1/nodes")
            vms = await self._get("/v1/vms")
        except OPERATIONAL as exc:
            return [f"the cluster API does not answer: {exc or type(exc).__name__}"], {}
        instances = await asyncio.to_thread(_qemu_instances, self.lab)
        problems = [f"node {n['name']} is {n['state']}" for n in nodes if n["state"] != "up"]
        leaders = [n["name"] for n in nodes if n["leader"]]
        if len(leaders) != 1:
            problems.append(f"{len(leaders)} leaders ({', '.join(leaders) or 'none'})")
        shown: dict[str, Any] = {}
        for vm in vms:
            name, owner, generation = vm["name"], vm["owner"], vm["generation"]
            runs = instances.get(name, [])
            where = ", ".join(f"{i['node']} g{i['generation']}" for i in runs) or "nowhere"
            entry = {"state": vm["state"], "owner": owner, "generation": generation,
                     "intent": vm["intent"], "instances": runs}  # fmt: skip
            shown[name] = entry
            if vm["intent"] != "running" and name in self.should_run:
                problems.append(f"{name} should run, but its intent is {vm['intent']}")
                continue
            if vm["intent"] != "running":
                if vm["state"] != "stopped" or runs:
                    problems.append(f"{name} should be stopped: it is {vm['state']}, QEMU on "
                                    f"{where}")  # fmt: skip
                continue
            if vm["state"] != "running":
                problems.append(f"{name} is {vm['state']} ({vm['reason']})")
                continue
            if [(i["node"], i["generation"], i["frozen"]) for i in runs] != \
                    [(owner, generation, False)]:  # fmt: skip
                frozen = " (frozen)" if any(i["frozen"] for i in runs) else ""
                problems.append(f"{name} should run once, on {owner} g{generation}: QEMU runs on "
                                f"{where}{frozen}")  # fmt: skip
                continue
            top = await asyncio.to_thread(_top_ack, self.lab, name, owner, generation)
            first = first_acks.setdefault((name, owner, generation), top)
            entry["highest_ack"] = top
            if top <= first:
                problems.append(f"{name} runs on {owner} g{generation} but writes nothing new")
        seen = {"nodes": {n["name"]: n["state"] for n in nodes},
                "leader": leaders[0] if len(leaders) == 1 else None, "vms": shown}  # fmt: skip
        return problems, seen

    async def _check(self) -> dict[str, Any] | None:
        try:
            vms = await self._get("/v1/vms")
            results = await asyncio.to_thread(check_lab, self.lab, vms)
        except OPERATIONAL as exc:
            self.errors.append(f"check: {exc or type(exc).__name__}")
            return None
        return {
            "vms": [r.to_json() for r in results],
            "lost_acks": sum(r.lost_acks for r in results),
            "stale_writes": sum(r.stale_writes for r in results),
            "ok": all(r.ok for r in results),
        }

    # ----- background: polls, progress -----

    async def _poll_vms(self) -> None:
        while not self.done.is_set():
            try:
                vms = await self._get("/v1/vms")
                self.observations.append((round(self.now_s(), 2), {
                    v["name"]: VmSeen(state=v["state"], owner=v["owner"],
                                      generation=v["generation"], intent=v["intent"],
                                      acked=_top_ack(self.lab, v["name"], v["owner"],
                                                     v["generation"]) if v["owner"] else 0)
                    for v in vms
                }))  # fmt: skip
            except OPERATIONAL:
                self.poll_failures += 1
            await self._wait_done(POLL_S)

    async def _fetch_events(self) -> None:
        try:
            events = await self._get("/v1/events?limit=1000")
        except OPERATIONAL:
            return
        for e in events:
            key = (e.get("time"), e.get("kind"), e.get("subject"), e.get("reason"))
            self.events.setdefault(key, e)

    async def _poll_events(self) -> None:
        while not self.done.is_set():
            await self._fetch_events()
            await self._wait_done(EVENTS_POLL_S)

    def _progress_line(self) -> str:
        elapsed = self.now_s()
        line = f"chaos {self.lab.name}: {min(elapsed, self.plan.duration_s):.0f}/" \
               f"{self.plan.duration_s:.0f} s"  # fmt: skip
        if self.heal_started_at_s is not None:
            line += f" (+{elapsed - self.plan.duration_s:.0f} s)"
        line += f", {len(self.results)}/{len(self.plan.steps)} steps: {self.activity}"
        current = self.current
        if current is not None and current.in_place_at_s is not None and not current.undone_at_s:
            line += f" (held {elapsed - current.in_place_at_s:.0f}/{current.step.hold_s:.0f} s)"
        return line

    async def _show_progress(self) -> None:
        while not self.done.is_set():
            self.progress.show(self._progress_line(), self.activity.split(" (")[0])
            await self._wait_done(1.0)

    # ----- the report -----

    def _events_between(self, start_s: float, end_s: float) -> list[dict[str, Any]]:
        out = []
        for e in sorted(self.events.values(), key=lambda e: e.get("time", 0.0)):
            at = round(float(e.get("time", 0.0)) - self.wall_t0, 1)
            if start_s <= at < end_s:
                out.append({"at_s": at, "kind": e.get("kind"), "subject": e.get("subject"),
                            "reason": e.get("reason", "")})  # fmt: skip
        return out

    def _report(self, convergence: dict[str, Any], check: dict[str, Any] | None) -> dict[str, Any]:
        heal_at = self.heal_started_at_s if self.heal_started_at_s is not None else self.now_s()
        end = self.now_s() + 1.0
        steps = []
        for i, result in enumerate(self.results):
            until = self.results[i + 1].at_s if i + 1 < len(self.results) else heal_at
            vms = vm_reactions(self.observations, result.at_s, until)
            held = None
            if result.in_place_at_s is not None and result.undo_at_s is not None:
                held = round(result.undo_at_s - result.in_place_at_s, 1)
            steps.append({
                **result.step.to_json(), "at_s": result.at_s,
                "in_place_at_s": result.in_place_at_s, "undo_at_s": result.undo_at_s,
                "undone_at_s": result.undone_at_s, "held_s": held, "did": result.did,
                "undid": result.undid, "errors": result.errors,
                "reaction": {"summary": summarize_reaction(vms), "vms": vms,
                             "events": self._events_between(result.at_s, until)},
            })  # fmt: skip
        heal_vms = vm_reactions(self.observations, heal_at, end)
        errors = [*self.errors, *(e for r in self.results for e in r.errors)]
        passed, reason = verdict(convergence, check, errors)
        created, existing = self.vms["created"], self.vms["existing"]
        shape = {"memory_mib": VM_MEMORY_MIB, "disk_bytes": VM_DISK_BYTES} if created else {}
        return {
            "lab": self.lab.name,
            "seed": self.plan.seed,
            "duration_s": self.plan.duration_s,
            "vms": {"created": created, "existing": existing, **shape},
            "policy": {
                "during_run": RELAXED_POLICY,
                "restored": self.policy_before,
                "quarantine": "unclean exits forgotten before each step and at the end",
            },
            "planned_steps": len(self.plan.steps),
            "steps_run": len(self.results),
            "kinds_run": sorted({str(r.step.kind) for r in self.results}),
            "steps": steps,
            "heal": {
                "at_s": heal_at,
                "done_at_s": self.healed_at_s,
                "did": self.healed,
                "reaction": {
                    "summary": summarize_reaction(heal_vms),
                    "vms": heal_vms,
                    "events": self._events_between(heal_at, end),
                },
            },
            "convergence": convergence,
            "check": check,
            "observations": len(self.observations),
            "poll_failures": self.poll_failures,
            "errors": errors,
            "passed": passed,
            "reason": reason,
        }


def verdict(
    convergence: Mapping[str, Any], check: Mapping[str, Any] | None, errors: Sequence[str]
) -> tuple[bool, str]:
    """Passed, and why not in one line: not converged, the check's violations, a step that
    failed (in that order)."""
    if not convergence.get("converged"):
        problems = convergence.get("problems") or ["unknown"]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return False, (f"the cluster did not converge within {convergence.get('timeout_s'):g} s "
                       f"after healing: {problems[0]}{more}")  # fmt: skip
    if check is None:
        return False, "the probe check did not run: " + (errors[-1] if errors else "unknown")
    if not check["ok"]:
        bad = ", ".join(v["vm"] for v in check["vms"] if not v["ok"])
        return False, (f"the probe check found {check['lost_acks']} lost ACKs and "
                       f"{check['stale_writes']} stale writes ({bad})")  # fmt: skip
    if errors:
        return False, f"{len(errors)} operation(s) failed, first: {errors[0]}"
    return True, (f"converged in {convergence['after_s']:.1f} s; no lost ACK, no stale write "
                  f"in {len(check['vms'])} VMs")  # fmt: skip


# ----- entry -----


async def _ensure_vms(
    lab: Lab, api: ApiClient, count: int, progress: Progress
) -> tuple[list[str], list[str], list[str]]:
    """(every VM, those created, those that should run): the cluster's VMs if it has any, else
    ``count`` new probe VMs spread over the nodes (--preferred) and the arrays, started."""
    existing = await api.request("GET", "/v1/vms")
    if existing:
        names = sorted(v["name"] for v in existing)
        running = sorted(v["name"] for v in existing if v["intent"] == "running")
        progress.note(f"chaos: using the cluster's {len(names)} VMs ({', '.join(names)})")
        return names, [], running
    plan = lab.plan()
    nodes, arrays = [h.name for h in plan.nodes], [h.name for h in plan.arrays]
    created = []
    for i in range(count):
        name = f"probe{i + 1}"
        body = {"name": name, "memory_mib": VM_MEMORY_MIB, "disks": [VM_DISK_BYTES],
                "image": DEFAULT_IMAGE, "policy": {"preferred": [nodes[i % len(nodes)]]},
                "array": arrays[i % len(arrays)], "start": True}  # fmt: skip
        await api.request("POST", "/v1/vms", body)
        created.append(name)
    progress.note(f"chaos: created {', '.join(created)} ({VM_MEMORY_MIB} MiB, "
                  f"{VM_DISK_BYTES // MIB}M disk, spread over {', '.join(nodes)})")  # fmt: skip
    return created, created, created


async def _warm_up(lab: Lab, api: ApiClient, names: Sequence[str], progress: Progress) -> float:
    """Until every VM that should run runs and has acknowledged a write; seconds taken."""
    started = time.monotonic()
    while True:
        vms = {v["name"]: v for v in await api.request("GET", "/v1/vms")}
        waiting = [
            f"{n} {vms[n]['state']}" for n in names
            if vms[n]["state"] != "running"
            or not _top_ack(lab, n, vms[n]["owner"], vms[n]["generation"])
        ]  # fmt: skip
        waited = time.monotonic() - started
        if not waiting:
            return round(waited, 1)
        if waited > WARMUP_TIMEOUT_S:
            raise VmclusterError(f"lab {lab.name}: the VMs do not run and write after "
                                 f"{WARMUP_TIMEOUT_S:g} s, before any fault: "
                                 f"{', '.join(waiting)}")  # fmt: skip
        progress.show(f"chaos {lab.name}: warming up, waiting for {', '.join(waiting)}",
                      "warm-up")  # fmt: skip
        await asyncio.sleep(1.0)


def check_vm_count(count: int) -> int:
    if count < 1:
        raise InvalidInput(f"invalid --vms {count}: use 1 or more")
    return count


async def _chaos(
    lab: Lab, *, duration_s: float, seed: int, vm_count: int, converge_timeout_s: float,
    progress: Progress,
) -> dict[str, Any]:  # fmt: skip
    state = lab.load()
    if state.status != "up":
        raise InvalidState(f"lab {lab.name} is {state.status}, not up: 'vmcluster lab down "
                           f"--name {lab.name}', then 'vmcluster lab up'")  # fmt: skip
    if state.faults:
        raise InvalidState(f"lab {lab.name} has faults in place "
                           f"({'; '.join(faults.describe(f) for f in state.faults)}): "
                           f"'vmcluster lab fault heal --name {lab.name}' first")  # fmt: skip
    plan_of_lab = lab.plan(state)
    nodes = [h.name for h in plan_of_lab.nodes]
    arrays = [h.name for h in plan_of_lab.arrays]
    witness = next((h.name for h in plan_of_lab.by_role(Role.WITNESS)), None)
    if not arrays:
        raise InvalidState(f"lab {lab.name} has no array for the VMs' disks: 'lab up --arrays 1' "
                           "or more")  # fmt: skip
    fit = (len(nodes) - 1) * NODE_VM_MEMORY_MIB // VM_MEMORY_MIB
    if vm_count > fit:
        raise InvalidInput(f"invalid --vms {vm_count}: at most {fit} VMs of {VM_MEMORY_MIB} MiB "
                           f"fit on {len(nodes) - 1} of this lab's {len(nodes)} nodes")  # fmt: skip
    check_shape(nodes, witness)  # before any VM is created
    api = lab.api()
    names, created, running = await _ensure_vms(lab, api, vm_count, progress)
    warmup_s = await _warm_up(lab, api, running, progress)
    plan = make_plan(seed=seed, duration_s=duration_s, nodes=nodes, arrays=arrays, vms=running,
                     witness=witness)  # fmt: skip
    progress.note(f"chaos: {len(plan.steps)} steps planned over {duration_s:g} s "
                  f"(warm-up took {warmup_s:g} s)")  # fmt: skip
    existing = [] if created else names
    run = ChaosRun(lab, plan, api=api, vms={"created": created, "existing": existing},
                   should_run=running, converge_timeout_s=converge_timeout_s,
                   progress=progress)  # fmt: skip
    report = await run.run()
    report["warmup_s"] = warmup_s
    report["plan"] = [s.to_json() for s in plan.steps]
    return report


def run_chaos(
    lab: Lab, *, duration_s: float, seed: int, vm_count: int = DEFAULT_VMS,
    converge_timeout_s: float = DEFAULT_CONVERGE_TIMEOUT_S, progress: Progress | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A chaos run on ``lab`` (which must be up); returns the report. Needs root."""
    if os.geteuid() != 0:
        raise MissingDependency("vmcluster lab chaos needs root (it injects the lab's faults)")
    check_vm_count(vm_count)
    return asyncio.run(_chaos(lab, duration_s=duration_s, seed=seed, vm_count=vm_count,
                              converge_timeout_s=converge_timeout_s,
                              progress=progress or Progress()))  # fmt: skip


def repeat_command(lab: str, duration: str, seed: int, vms: int) -> str:
    return f"vmcluster lab chaos --name {lab} --duration {duration} --seed {seed} --vms {vms}"


def print_order(report: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """The report's steps as table rows: T, STEP, HELD, REACTION (for the CLI)."""
    rows: list[tuple[str, ...]] = []
    for s in report["steps"]:
        held = "-" if s["held_s"] is None else f"{s['held_s']:.1f}"
        reaction = s["reaction"]["summary"]
        kinds = [e["kind"] for e in s["reaction"]["events"]
                 if str(e["kind"]).startswith(("leader.", "node.", "quorum."))]  # fmt: skip
        if kinds:
            reaction += f"; events: {', '.join(_counted(kinds))}"
        if s["errors"]:
            reaction = "FAILED: " + "; ".join(s["errors"]) + " | " + reaction
        rows.append((f"{s['at_s']:.1f}", s["what"], held, reaction))
    return rows


def _counted(kinds: Sequence[str]) -> list[str]:
    counts: dict[str, int] = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    return [k if n == 1 else f"{k} x{n}" for k, n in counts.items()]
