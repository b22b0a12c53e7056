"""Golden scenarios: a directory with the commands of one story and the log it must give.

    scenarios/two-nodes-witness/
        cmds        what happens, and when (simulated seconds)
        expected    the log it gives: the cluster's events, the faults and every QEMU's life

``cmds`` holds one command per line (``#`` starts a comment)::

    options nodes=2 witness=yes seed=1 duration=40   # the cluster; faults end at 8 + duration
    ha failover_threshold=1 failover_period_s=3600   # HA settings, before the VMs
    create web {"policy": {"preferred": ["n1"]}}     # a VM: the body of POST /v1/vms
    volume vol1 a1 256M                              # a shared volume, before the VMs
    disk vol1/d1 64M                                 # ... and a disk in it (VMs: "vol1/d1")
    at 20 crash n2                                   # at 20 s: a fault or an admin action

Faults: ``crash HOST``, ``power-on HOST``, ``hang HOST SECONDS``, ``agent-restart HOST``,
``isolate HOST SECONDS``, ``storage-cut HOST SECONDS``, ``link HOST NETWORK SECONDS``,
``qemu-crash VM``, ``array-down ARRAY SECONDS``. Admin actions (through the service layer, on
the first node that has quorum): ``stop VM``, ``start VM``, ``drain NODE``, ``resume NODE``,
``resume NODE failback``, ``disk-create VOLUME/DISK SIZE``, ``disk-resize VOLUME/DISK SIZE``,
``disk-clone VOLUME/DISK NEW``, ``disk-delete VOLUME/DISK``, ``volume-move VOLUME NODE``. The
run is a normal simulated run without random faults: every invariant is checked, a violation
fails the scenario, and everything is healed at the end.

``vmcluster sim scenario DIR`` runs one and compares its log with ``expected``; ``--update``
writes the log as the new ``expected`` (after a change of behaviour made on purpose: review
the diff).
"""

import json
import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vmcluster.core.units import parse_size
from vmcluster.errors import InvalidInput, NotFound
from vmcluster.sim.faults import Injector
from vmcluster.sim.model import EPOCH, SimOptions
from vmcluster.sim.runner import simulate
from vmcluster.sim.world import DISK_BYTES, VM_MEMORY_MIB, SimWorld

FAULTS = {"crash": 0, "power-on": 0, "hang": 1, "agent-restart": 0, "isolate": 1,
          "storage-cut": 1, "link": 2, "qemu-crash": 0, "array-down": 1}  # fmt: skip
ADMIN = {"stop": 0, "start": 0, "drain": 0, "resume": (0, 1), "disk-create": 1,
         "disk-resize": 1, "disk-clone": 1, "disk-delete": 0, "volume-move": 1}  # fmt: skip
OPTIONS = {"nodes": int, "vms": int, "witness": bool, "seed": int, "duration": float}


@dataclass(frozen=True, slots=True)
class Step:
    at: float
    verb: str
    args: tuple[str, ...]
    line: int


@dataclass(slots=True)
class Scenario:
    name: str
    options: SimOptions
    seed: int = 1
    ha: dict[str, Any] = field(default_factory=dict)
    creates: list[dict[str, Any]] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    volumes: list[tuple[str, str, int]] = field(default_factory=list)  # name, array, size
    disks: list[tuple[str, int]] = field(default_factory=list)  # VOLUME/DISK, size


def parse(directory: Path) -> Scenario:
    """The scenario in ``directory``; InvalidInput naming the file and line otherwise."""
    path = directory / "cmds"
    try:
        text = path.read_text()
    except OSError as exc:
        raise NotFound(f"scenario {directory}: no cmds file ({exc.strerror})") from None
    values: dict[str, Any] = {"nodes": 3, "vms": 0, "witness": False, "seed": 1, "duration": 60.0}
    ha: dict[str, Any] = {}
    creates: list[dict[str, Any]] = []
    steps: list[Step] = []
    volumes: list[tuple[str, str, int]] = []
    disks: list[tuple[str, int]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{path}:{number}"
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("create") else raw
        if not line.strip():
            continue
        verb, _, rest = line.strip().partition(" ")
        if verb == "options":
            for word in rest.split():
                key, _, value = word.partition("=")
                if key not in OPTIONS:
                    raise InvalidInput(f"{where}: unknown option {key!r} ({', '.join(OPTIONS)})")
                values[key] = _value(OPTIONS[key], value, where, key)
        elif verb == "ha":
            for word in rest.split():
                key, _, value = word.partition("=")
                ha[key] = _json(value, where)
        elif verb == "create":
            name, _, body = rest.strip().partition(" ")
            fields = _json(body, where) if body.strip() else {}
            if not isinstance(fields, dict):
                raise InvalidInput(f"{where}: create {name}: the body must be a JSON object")
            creates.append({"name": name, "memory_mib": VM_MEMORY_MIB, "disks": [DISK_BYTES],
                            "start": True, **fields})  # fmt: skip
        elif verb == "volume":
            words = rest.split()
            if len(words) != 3:
                raise InvalidInput(f"{where}: volume takes NAME ARRAY SIZE")
            volumes.append((words[0], words[1], parse_size(words[2], what=f"{where}: size")))
        elif verb == "disk":
            words = rest.split()
            if len(words) != 2 or "/" not in words[0]:
                raise InvalidInput(f"{where}: disk takes VOLUME/DISK SIZE")
            disks.append((words[0], parse_size(words[1], what=f"{where}: size")))
        elif verb == "at":
            steps.append(_step(rest, where, number))
        else:
            raise InvalidInput(f"{where}: unknown command {verb!r} (options, ha, create, "
                               "volume, disk, at)")  # fmt: skip
    options = SimOptions(nodes=values["nodes"], vms=values["vms"], witness=values["witness"],
                         duration_s=values["duration"], faults=False)  # fmt: skip
    return Scenario(name=directory.name, options=options, seed=values["seed"], ha=ha,
                    creates=creates, steps=steps, volumes=volumes, disks=disks)  # fmt: skip


def _value(kind: type, text: str, where: str, key: str) -> Any:
    try:
        if kind is bool:
            if text not in ("yes", "no"):
                raise ValueError
            return text == "yes"
        return kind(text)
    except ValueError:
        raise InvalidInput(f"{where}: option {key}={text!r} is not a {kind.__name__}") from None


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{where}: {text.strip()[:40]!r} is not JSON ({exc.msg})") from None


def _step(rest: str, where: str, number: int) -> Step:
    words = shlex.split(rest)
    try:
        at = float(words[0])
    except (IndexError, ValueError):
        raise InvalidInput(f"{where}: 'at' needs a time in seconds, then a command") from None
    if len(words) < 2:
        raise InvalidInput(f"{where}: 'at {words[0]}' needs a command")
    verb, args = words[1], tuple(words[2:])
    wanted = FAULTS.get(verb, ADMIN.get(verb))
    if wanted is None:
        raise InvalidInput(f"{where}: unknown step {verb!r} (faults: {', '.join(FAULTS)}; "
                           f"admin: {', '.join(ADMIN)})")  # fmt: skip
    counts = wanted if isinstance(wanted, tuple) else (wanted,)
    if len(args) - 1 not in counts:
        raise InvalidInput(f"{where}: {verb} takes {' or '.join(str(c + 1) for c in counts)} "
                           "arguments")  # fmt: skip
    return Step(at=at, verb=verb, args=args, line=number)


def run(scenario: Scenario) -> tuple[list[str], list[str]]:
    """Run it: (the log, the violations found)."""

    def plan(world: SimWorld, injector: Injector) -> None:
        for step in scenario.steps:
            world.schedule(step.at - world.now, f"step {step.verb}",
                           _carry_out(world, injector, step))  # fmt: skip

    options = replace(scenario.options, failed_ok=True)
    result = simulate(scenario.seed, options, plan=plan, creates=scenario.creates,
                      ha=scenario.ha, volumes=scenario.volumes, disks=scenario.disks)  # fmt: skip
    log = _log(result.timeline, result.events)
    return log, [f"{v.invariant} at {v.at:.1f} s: {v.text}" for v in result.violations]


def _carry_out(world: SimWorld, injector: Injector, step: Step) -> Callable[[], None]:
    def go() -> None:
        args = step.args
        if step.verb in FAULTS:
            if step.verb == "qemu-crash":
                guests = [g for h in world.hosts.values() for g in h.guests.values()
                          if g.vm == args[0] and g.alive]  # fmt: skip
                world.note("sim", f"STEP qemu-crash {args[0]}")
                for guest in guests:
                    world.kill(guest, "crashed")
                return
            if step.verb == "array-down":
                world.note("sim", f"STEP array-down {args[0]} {args[1]}")
                array = world.arrays[args[0]]
                array.up = False
                world.schedule(float(args[1]), "heal", lambda: _array_up(world, args[0]))
                return
            host = world.hosts[args[0]]
            world.note("sim", f"STEP {step.verb} {' '.join(args)}")
            if step.verb == "power-on":
                injector.power_on(host)
            elif step.verb == "link":
                injector.apply("link", host, float(args[2]), network=args[1])
            else:  # a crash lasts until power-on; an agent comes back after 2 s
                default = math.inf if step.verb == "crash" else 2.0
                injector.apply(step.verb, host, float(args[1]) if len(args) > 1 else default)
            return
        world.note("sim", f"STEP {step.verb} {' '.join(args)}")
        injector.admin(step.verb, *args)

    return go


def _array_up(world: SimWorld, name: str) -> None:
    world.arrays[name].up = True
    world.note("sim", f"HEAL array {name} up")


def _log(timeline: tuple[str, ...], events: list[dict[str, Any]]) -> list[str]:
    """The scenario's log: its steps and faults, every QEMU's life, and the cluster's events
    as committed (with their time), in time order."""
    keep = ("STEP ", "HEAL ", "qemu ", "guest ")
    lines: list[tuple[float, str]] = []
    for line in timeline:
        at, who, text = float(line[:9]), line[10:14], line[15:]
        if text.startswith(keep) and "datagram" not in text:
            lines.append((at, f"{at:7.1f} {who.strip():<4} {text}"))
    for e in events:
        when = float(e.get("time", EPOCH)) - EPOCH
        lines.append((when, f"{when:7.1f} {'':<4} event {e['kind']} {e['subject']}: "
                            f"{e['reason']}"))  # fmt: skip
    return [text for _, text in sorted(lines, key=lambda item: item[0])]


def compare(directory: Path, update: bool) -> tuple[bool, list[str]]:
    """Run the scenario in ``directory``: (passed, what to show). With ``update``, write its
    log as ``expected``."""
    scenario = parse(directory)
    log, violations = run(scenario)
    expected_path = directory / "expected"
    if violations:
        return False, [f"scenario {scenario.name}: invariant violated: {violations[0]}", *log]
    if update:
        expected_path.write_text("\n".join(log) + "\n")
        return True, [f"scenario {scenario.name}: expected log written ({len(log)} lines)"]
    try:
        expected = expected_path.read_text().splitlines()
    except OSError:
        return False, [f"scenario {scenario.name}: no expected log; run with --update to "
                       "write one"]  # fmt: skip
    if expected == log:
        return True, [f"scenario {scenario.name}: passed ({len(log)} lines)"]
    import difflib

    diff = difflib.unified_diff(expected, log, "expected", "got", lineterm="", n=2)
    return False, [f"scenario {scenario.name}: the log differs from expected", *diff]
