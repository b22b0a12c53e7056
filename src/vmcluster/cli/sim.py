"""``vmcluster sim``: the seeded simulator of a whole cluster (vmcluster.sim)."""

import multiprocessing
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from vmcluster.cli.common import output_option, print_json, stdout
from vmcluster.core.units import parse_duration
from vmcluster.errors import InvalidInput
from vmcluster.sim.faults import FAULT_KINDS
from vmcluster.sim.model import SimOptions
from vmcluster.sim.runner import SimResult, simulate
from vmcluster.sim.scenario import compare

MAX_NODES = 16
MAX_VMS = 200


@click.group()
def sim() -> None:
    """Simulate a whole cluster under random faults, seed by seed, and check its invariants.

    The real agents run in virtual time over simulated networks, etcd, arrays and QEMU; a seed
    decides everything, so a failing seed replays exactly with --seed.
    """


def _options(nodes: int, vms: int, duration: str, witness: bool) -> SimOptions:
    if not 2 <= nodes <= MAX_NODES:
        raise InvalidInput(f"--nodes {nodes}: use 2 to {MAX_NODES}")
    if not 1 <= vms <= MAX_VMS:
        raise InvalidInput(f"--vms {vms}: use 1 to {MAX_VMS}")
    if nodes == 2 and not witness:
        raise InvalidInput("--nodes 2 needs --witness: two nodes alone have no quorum when one "
                           "fails")  # fmt: skip
    seconds = parse_duration(duration, what="--duration")
    if not 5 <= seconds <= 3600:
        raise InvalidInput(f"--duration {duration}: use 5 s to 1 h")
    return SimOptions(nodes=nodes, vms=vms, witness=witness, duration_s=seconds)


def _replay(seed: int, nodes: int, vms: int, duration: str, witness: bool) -> str:
    extra = " --witness" if witness else ""
    return (
        f"vmcluster sim run --seed {seed} --nodes {nodes} --vms {vms} --duration {duration}{extra}"
    )


def _one(args: tuple[int, SimOptions]) -> SimResult:
    return simulate(*args)


def _same_hashes() -> None:
    """A run must not depend on Python's per-process hash seed (the order of sets of
    strings): run under PYTHONHASHSEED=0, re-executing once if needed."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        os.execve(sys.executable, [sys.executable, "-m", "vmcluster", *sys.argv[1:]], env)


@sim.command("run")
@click.option(
    "--seeds", type=int, default=100, show_default=True, help="How many seeds (1, 2, ...)."
)
@click.option("--seed", type=int, default=None, help="Run this seed only and show its timeline.")
@click.option("--nodes", type=int, default=3, show_default=True)
@click.option("--vms", type=int, default=4, show_default=True)
@click.option("--duration", default="60s", show_default=True,
              help="How long faults come, per seed (90, 90s, 10m).")  # fmt: skip
@click.option("--witness", is_flag=True, help="Add a witness (an etcd member only).")
@click.option("--jobs", type=int, default=0, help="Processes (default: one per CPU).")
@output_option
def sim_run(
    seeds: int, seed: int | None, nodes: int, vms: int, duration: str, witness: bool, jobs: int,
    output: str,
) -> None:  # fmt: skip
    """Run seeds; exit 1 if any breaks an invariant (each is named with its replay command)."""
    options = _options(nodes, vms, duration, witness)
    if seed is None and not 1 <= seeds <= 1_000_000:
        raise InvalidInput(f"--seeds {seeds}: use 1 to 1000000")
    if jobs < 0:
        raise InvalidInput(f"--jobs {jobs}: use 0 (one per CPU) or more")
    _same_hashes()
    chosen = [seed] if seed is not None else list(range(1, seeds + 1))
    started = time.monotonic()
    work = [(s, options) for s in chosen]
    processes = min(jobs or os.cpu_count() or 1, len(work))
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            results = pool.map(_one, work, chunksize=max(1, len(work) // (processes * 8)))
    else:
        results = [_one(w) for w in work]
    wall = time.monotonic() - started
    failed = [r for r in results if not r.ok]
    summary = _summary(results, wall, options)
    for r in summary["failed"]:
        r["replay"] = _replay(r["seed"], nodes, vms, duration, witness)
    if output == "json":
        print_json(summary)
    else:
        if seed is not None:
            for line in results[0].timeline:
                stdout.print(line, markup=False)
        _print_summary(summary)
        if failed and seed is None:
            first = failed[0]
            stdout.print(f"\ntimeline of seed {first.seed}:", markup=False)
            for line in first.timeline:
                stdout.print(line, markup=False)
    sys.exit(1 if failed else 0)


def _summary(results: list[SimResult], wall: float, options: SimOptions) -> dict[str, Any]:
    faults = dict.fromkeys(FAULT_KINDS, 0)
    for r in results:
        for kind, count in r.faults.items():
            faults[kind] += count
    opts = asdict(options)
    opts["planted"] = sorted(options.planted)
    opts["timings"] = asdict(options.timings)
    return {
        "seeds": len(results),
        "passed": sum(1 for r in results if r.ok),
        "failed": [{"seed": r.seed, "invariant": v.invariant, "at_s": round(v.at, 3),
                    "violation": v.text}
                   for r in results if not r.ok for v in r.violations[:1]],
        "faults": faults,
        "failovers": sum(r.failovers for r in results),
        "virtual_s": round(sum(r.virtual_s for r in results), 1),
        "steps": sum(r.steps for r in results),
        "wall_s": round(wall, 1),
        "options": opts,
    }  # fmt: skip


def _print_summary(summary: dict[str, Any]) -> None:
    faults = ", ".join(f"{k} {v}" for k, v in summary["faults"].items() if v) or "none"
    stdout.print(
        f"{summary['seeds']} seeds: {summary['passed']} passed, {len(summary['failed'])} failed "
        f"({summary['virtual_s']:g} s simulated in {summary['wall_s']:g} s); "
        f"{summary['failovers']} restarts elsewhere or in place", markup=False,
    )  # fmt: skip
    stdout.print(f"faults: {faults}", markup=False)
    for r in summary["failed"]:
        stdout.print(f"seed {r['seed']}: {r['invariant']} at {r['at_s']:g} s: {r['violation']}; "
                     f"replay: {r['replay']}", markup=False)  # fmt: skip


@sim.command("scenario")
@click.argument("directories", nargs=-1, required=True,
                type=click.Path(file_okay=False, path_type=Path))  # fmt: skip
@click.option("--update", is_flag=True,
              help="Write each log as the new expected log (review the diff).")  # fmt: skip
def sim_scenario(directories: tuple[Path, ...], update: bool) -> None:
    """Run golden scenarios (a directory each, with cmds and expected) and compare their logs.

    Exit 1 if any log differs from its expected log or breaks an invariant (the difference is
    shown); --update writes the logs instead."""
    _same_hashes()
    failed = 0
    for directory in directories:
        passed, lines = compare(directory, update)
        failed += not passed
        for line in lines if not passed else lines[:1]:
            stdout.print(line, markup=False)
    if len(directories) > 1:
        stdout.print(f"{len(directories) - failed} of {len(directories)} scenarios passed",
                     markup=False)  # fmt: skip
    sys.exit(1 if failed else 0)
