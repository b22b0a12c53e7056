"""The watchdog process: it kills the listed instances once the deadline passes, freezes them
first with a resiliency period, and never touches a process whose identity does not match."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support import kill_by_pid

from vmcluster.agent import watchdog
from vmcluster.hypervisor import process


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def _until(check: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        kill_by_pid(proc.pid)
        proc.wait(timeout=10)


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "run"
    directory.mkdir()
    with (tmp_path / "watchdog.log").open("wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "vmcluster.agent.watchdog", str(directory)],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _until(lambda: watchdog.running(directory) is not None)
        yield directory
    finally:
        kill_by_pid(child.pid)
        child.wait(timeout=10)


def _ident(proc: subprocess.Popen[bytes]) -> process.ProcessId:
    ident = process.identify(proc.pid)
    assert ident is not None
    return ident


def _reaped_or_dead(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


def test_nothing_happens_before_the_deadline_then_the_instance_is_killed(
    run_dir: Path, victim: subprocess.Popen[bytes]
) -> None:
    watchdog.write_state(run_dir, watchdog.boottime() + 60, [_ident(victim)])
    time.sleep(0.5)
    assert victim.poll() is None
    watchdog.write_state(run_dir, watchdog.boottime() - 0.01, [_ident(victim)])
    _until(lambda: _reaped_or_dead(victim))
    assert victim.returncode == -9
    log = (run_dir.parent / "watchdog.log").read_text()
    assert f"watchdog.fenced pid={victim.pid}" in log


def test_with_a_resiliency_period_it_freezes_first_and_kills_later(
    run_dir: Path, victim: subprocess.Popen[bytes]
) -> None:
    watchdog.write_state(run_dir, watchdog.boottime(), [_ident(victim)], resiliency_s=1.5)
    _until(lambda: _state(victim.pid) == "T")
    time.sleep(0.5)
    assert victim.poll() is None, "killed before the resiliency period ended"
    _until(lambda: _reaped_or_dead(victim))
    assert victim.returncode == -9


def test_a_renewed_deadline_during_the_resiliency_period_saves_the_instance(
    run_dir: Path, victim: subprocess.Popen[bytes]
) -> None:
    watchdog.write_state(run_dir, watchdog.boottime(), [_ident(victim)], resiliency_s=1.0)
    _until(lambda: _state(victim.pid) == "T")
    watchdog.write_state(run_dir, watchdog.boottime() + 60, [_ident(victim)], resiliency_s=1.0)
    time.sleep(1.5)
    assert victim.poll() is None  # the agent, not the watchdog, resumes what it still owns
    process.send_signal(_ident(victim), signal.SIGCONT)
    _until(lambda: _state(victim.pid) in ("S", "R"))


def test_a_process_with_another_start_time_is_never_touched(
    run_dir: Path, victim: subprocess.Popen[bytes]
) -> None:
    real = _ident(victim)
    impostor = process.ProcessId(pid=real.pid, start_ticks=real.start_ticks + 1)
    watchdog.write_state(run_dir, watchdog.boottime() - 1, [impostor])
    time.sleep(0.5)
    assert victim.poll() is None
    assert _state(victim.pid) in ("S", "R")


def test_a_qemu_being_launched_is_found_by_its_pid_file_and_killed(
    run_dir: Path, tmp_path: Path
) -> None:
    """The agent has told the watchdog of a launch (pid file, VM, generation) but hung before
    it learnt the pid: past the deadline the watchdog kills the QEMU the pid file names, and
    only if its command line is that VM's at that generation."""
    from tests.agent.test_hosting_adopt import _fake_qemu

    launched, other = _fake_qemu("web", 3), _fake_qemu("web", 2)
    try:
        pidfile, stale = tmp_path / "g3.pid", tmp_path / "g2.pid"
        pidfile.write_text(f"{launched.pid}\n")
        stale.write_text(f"{other.pid}\n")
        launching = [(str(pidfile), "web", 3), (str(stale), "web", 3)]  # g2 is not g3's
        watchdog.write_state(run_dir, watchdog.boottime() - 0.01, [], launching=launching)
        _until(lambda: _reaped_or_dead(launched))
        assert launched.returncode == -9
        assert other.poll() is None
    finally:
        for proc in (launched, other):
            kill_by_pid(proc.pid)
            proc.wait(timeout=10)


def test_tighten_only_brings_the_deadline_forward_and_lists_the_instances(
    tmp_path: Path,
) -> None:
    assert watchdog.tighten(tmp_path, 10.0) is None  # no state file: nothing to do
    me = process.identify(os.getpid())
    assert me is not None
    watchdog.write_state(tmp_path, 100.0, [me])
    assert watchdog.tighten(tmp_path, 50.0) == [me]
    assert json.loads(watchdog.state_path(tmp_path).read_text())["deadline"] == 50.0
    assert watchdog.tighten(tmp_path, 80.0) == [me]  # never later
    assert json.loads(watchdog.state_path(tmp_path).read_text())["deadline"] == 50.0
