"""High availability in a lab, with real QEMU (TCG), real arrays and real faults: failover after a
node crash or isolation with the storage fence and the self-fence, restart after a QEMU crash,
the failover threshold, pending VMs, HA disarmed, drain and resume, failback, anti-affinity. Every
test ends with the probe checker: no acknowledged write lost (I2), no write of a retired
generation (I1)."""

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.support import kill_by_pid, run_cli

from vmcluster.lab.lab import Lab
from vmcluster.paths import DataDir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

# Generous bounds so that nothing hangs; bench/failover measures the real figures.
CONVERGE_S = 60.0


def _until(check: Callable[[], Any], timeout_s: float = CONVERGE_S, what: str = "") -> Any:
    """Poll until ``check`` returns something truthy; return it. Fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (AssertionError, KeyError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"not reached within {timeout_s} s: {what} (last: {last!r})")


def _cli(*args: str) -> Any:
    result = run_cli(*args)
    assert result.code == 0, (args, result.err)
    return result


def _vms() -> dict[str, dict[str, Any]]:
    listed = _cli("vm", "list", "-o", "json").json()
    assert isinstance(listed, list)
    return {v["name"]: v for v in listed}


def _nodes() -> dict[str, dict[str, Any]]:
    listed = _cli("node", "list", "-o", "json").json()
    assert isinstance(listed, list)
    return {n["name"]: n for n in listed}


def _vm_dir(lab: Lab, node: str, vm: str) -> Path:
    return lab.host_dir(node) / "data" / "vms" / vm


def _acks(lab: Lab, node: str, vm: str, generation: int) -> list[int]:
    path = _vm_dir(lab, node, vm) / f"g{generation}.console"
    if not path.exists():
        return []
    return [int(line.split()[1]) for line in path.read_text(errors="replace").splitlines()
            if line.startswith("ACK ") and line.split()[1].isdigit()]  # fmt: skip


def _qemu_pid(lab: Lab, node: str, vm: str, generation: int) -> int | None:
    path = _vm_dir(lab, node, vm) / f"g{generation}.json"
    try:
        return int(json.loads(path.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def _running(vm: str, *, generation_above: int = 0, not_on: str | None = None) -> Any:
    def check() -> dict[str, Any] | None:
        v = _vms()[vm]
        if v["state"] == "running" and v["generation"] > generation_above and \
                v["owner"] != not_on:  # fmt: skip
            return v
        return None

    return _until(check, what=f"{vm} running (generation > {generation_above}, not on {not_on})")


def _writing(lab: Lab, vm: dict[str, Any], above: int = 0, count: int = 3) -> int:
    """Wait until the instance in ``vm`` has acknowledged ``count`` writes past ``above``."""

    def check() -> int:
        acks = _acks(lab, vm["owner"], vm["name"], vm["generation"])
        return max(acks) if acks and max(acks) >= above + count else 0

    return int(_until(check, what=f"{vm['name']} writing on {vm['owner']}"))


def _check_probe(lab: Lab) -> list[dict[str, Any]]:
    result = run_cli("lab", "check", "-o", "json", "--name", lab.name)
    report = json.loads(result.out)
    for vm in report:
        assert vm["lost_acks"] == 0, vm
        assert vm["stale_writes"] == 0, vm
    assert result.code == 0, result.err
    return list(report)


def _event_kinds(subject: str) -> list[str]:
    events = _cli("events", "-o", "json", "--limit", "500").json()
    assert isinstance(events, list)
    return [e["kind"] for e in events if e["subject"] == subject]


@pytest.fixture
def lab(home: DataDir, request: pytest.FixtureRequest) -> Iterator[Lab]:
    name = "h" + uuid.uuid4().hex[:6]
    up = run_cli("lab", "up", "--name", name)
    assert up.code == 0, up.err
    the_lab = Lab(home, name)
    try:
        yield the_lab
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:  # the agents' view, for the failure report
            print(run_cli("events", "--limit", "60").out)
            for node in ("n1", "n2", "n3"):
                lines = (the_lab.host_dir(node) / "agent.log").read_text().splitlines()
                print(f"--- {node}/agent.log\n" + "\n".join(lines[-40:]))
        down = run_cli("lab", "down", "--name", name)
        assert down.code == 0, down.err


def _create(name: str, *args: str, start: bool = True) -> None:
    _cli("vm", "create", name, "--memory", "128", "--disk", "16M", *args,
         *(["--start"] if start else []))  # fmt: skip


# ----- failover -----


def test_crash_of_the_owner_node_brings_the_vm_back_elsewhere_without_losing_a_write(
    lab: Lab,
) -> None:
    _create("p1")
    first = _running("p1")
    before = _writing(lab, first)
    _cli("lab", "fault", "crash", first["owner"], "--name", lab.name)
    second = _running("p1", generation_above=first["generation"], not_on=first["owner"])
    assert second["generation"] == first["generation"] + 1
    _writing(lab, second, above=before)
    assert "vm.failover" in _event_kinds("p1")
    [report] = _check_probe(lab)
    assert report["highest_acked"] > before
    assert report["generations"] == [first["generation"], second["generation"]]


def test_isolated_owner_is_fenced_at_the_array_and_stops_its_vm(lab: Lab) -> None:
    """The owner loses both cluster networks but keeps its storage paths: its VMs fail over, the
    array serves only the new generations, a VM that writes loses its disk at once (and its QEMU
    is killed), and a quiet VM (one write a minute) is killed by the old node's self-fence."""
    leader = next(n for n, v in _nodes().items() if v["leader"])
    victim = next(n for n in ("n1", "n2", "n3") if n != leader)
    _create("p2", "--preferred", victim)
    _create("q2", "--preferred", victim, "--probe-interval", "60000")
    first = _running("p2")
    quiet = _running("q2")
    assert first["owner"] == quiet["owner"] == victim
    before = _writing(lab, first)
    old_pid = _qemu_pid(lab, victim, "p2", first["generation"])
    quiet_pid = _qemu_pid(lab, victim, "q2", quiet["generation"])
    assert old_pid is not None
    assert quiet_pid is not None
    for network in ("cluster1", "cluster2"):
        _cli("lab", "fault", "link", victim, network, "down", "--name", lab.name)
    second = _running("p2", generation_above=first["generation"], not_on=victim)
    _running("q2", generation_above=quiet["generation"], not_on=victim)
    # The storage fence: only the new generation's export exists at the array.
    disk = second["disks"][0]
    array = lab.array(lab.plan().host(disk["array"]))
    exports = [e for e in asyncio.run(array.exports()) if e.startswith(disk["lun"] + ".")]
    assert exports == [f"{disk['lun']}.g{second['generation']}"]
    # The old instances: the writer lost its disk, the quiet one was self-fenced.
    _until(lambda: not Path(f"/proc/{old_pid}").exists(), what="old QEMU gone")
    _until(lambda: not Path(f"/proc/{quiet_pid}").exists(), what="quiet QEMU gone")
    log = (lab.host_dir(victim) / "agent.log").read_text()
    assert "vm.instance.lost-disk vm=p2" in log
    assert "vm.self-fence" in log
    _writing(lab, second, above=before)
    _cli("lab", "fault", "heal", "--name", lab.name)
    _check_probe(lab)


# ----- QEMU crashes and the failover threshold -----


def test_qemu_crash_restarts_in_place_then_fails_over_then_the_vm_fails(lab: Lab) -> None:
    _create("p3")
    vm = _running("p3")
    _writing(lab, vm)
    owner = vm["owner"]
    # 1st crash: restarted on the same node (restart limit 1 per hour).
    kill_by_pid(_qemu_pid(lab, owner, "p3", vm["generation"]) or 0)
    vm = _running("p3", generation_above=vm["generation"])
    assert vm["owner"] == owner
    assert "vm.restart" in _event_kinds("p3")
    _writing(lab, vm)
    # 2nd crash: the restart limit is used up, so it fails over.
    kill_by_pid(_qemu_pid(lab, owner, "p3", vm["generation"]) or 0)
    vm = _running("p3", generation_above=vm["generation"], not_on=owner)
    _writing(lab, vm)
    # Crashes on the new node fail it over again until the threshold (3 nodes: 2 in 6 h).
    kill_by_pid(_qemu_pid(lab, vm["owner"], "p3", vm["generation"]) or 0)
    vm = _running("p3", generation_above=vm["generation"])
    _writing(lab, vm)
    kill_by_pid(_qemu_pid(lab, vm["owner"], "p3", vm["generation"]) or 0)
    failed = _until(lambda: _vms()["p3"]["state"] == "failed" and _vms()["p3"], what="failed")
    assert "failovers within" in failed["reason"]
    assert failed["owner"] is None
    # An admin start clears the failure.
    _cli("vm", "start", "p3")
    vm = _running("p3", generation_above=failed["generation"])
    _writing(lab, vm)
    _check_probe(lab)


# ----- placement: pending, anti-affinity -----


def test_a_vm_that_cannot_be_placed_waits_and_starts_when_its_node_returns(lab: Lab) -> None:
    _create("p4", "--possible", "n3")
    first = _running("p4")
    assert first["owner"] == "n3"
    before = _writing(lab, first)
    _cli("lab", "fault", "crash", "n3", "--name", lab.name)
    pending = _until(lambda: _vms()["p4"]["state"] == "pending" and _vms()["p4"], what="pending")
    assert "n3" in pending["reason"] or "possible" in pending["reason"], pending["reason"]
    assert pending["owner"] is None
    _cli("lab", "fault", "restart", "n3", "--name", lab.name)
    second = _running("p4", generation_above=first["generation"])
    assert second["owner"] == "n3"
    _writing(lab, second, above=before)
    _check_probe(lab)


def test_hard_anti_affinity_keeps_vms_apart_and_leaves_one_pending(lab: Lab) -> None:
    for name in ("d1", "d2", "d3"):
        _create(name, "--anti-affinity", "db:hard", "--possible", "n1,n2")
    _until(lambda: {v["state"] for n, v in _vms().items()} >= {"running", "pending"},
           what="two running, one pending")  # fmt: skip
    vms = _until(lambda: sorted(v["state"] for v in _vms().values()) ==
                 ["pending", "running", "running"] and _vms(), what="settled")  # fmt: skip
    owners = sorted(v["owner"] for v in vms.values() if v["state"] == "running")
    assert owners == ["n1", "n2"]
    [pending] = [v for v in vms.values() if v["state"] == "pending"]
    assert "anti-affinity" in pending["reason"] or "db" in pending["reason"], pending["reason"]


# ----- admin: disarm, drain, resume, failback -----


def test_with_ha_disarmed_nothing_moves_until_it_is_armed(lab: Lab) -> None:
    _create("p5")
    first = _running("p5")
    _writing(lab, first)
    _cli("cluster", "ha", "disarm")
    status = _cli("cluster", "ha", "status", "-o", "json").json()
    assert isinstance(status, dict)
    assert status["armed"] is False
    _cli("lab", "fault", "crash", first["owner"], "--name", lab.name)
    _until(lambda: _nodes()[first["owner"]]["state"] == "down", what="owner down")
    time.sleep(3.0)  # several controller cycles
    held = _vms()["p5"]
    assert (held["owner"], held["generation"]) == (first["owner"], first["generation"])
    _cli("cluster", "ha", "arm")
    second = _running("p5", generation_above=first["generation"], not_on=first["owner"])
    _writing(lab, second)
    _check_probe(lab)


def test_drain_moves_vms_off_and_resume_with_failback_brings_them_back(lab: Lab) -> None:
    _create("p6", "--preferred", "n1")
    first = _running("p6")
    assert first["owner"] == "n1"
    before = _writing(lab, first)
    drained = run_cli("node", "drain", "n1", "--wait")
    assert drained.code == 0, drained.err
    moved = _vms()["p6"]
    assert moved["state"] == "running"
    assert moved["owner"] != "n1"
    assert _nodes()["n1"]["state"] == "paused"
    log = (lab.host_dir("n1") / "agent.log").read_text()
    assert 'vm.instance.stopped vm=p6 generation=1 how="powered off"' in log  # a clean stop
    before = _writing(lab, moved, above=before)
    _cli("node", "resume", "n1", "--failback")
    back = _running("p6", generation_above=moved["generation"])
    assert back["owner"] == "n1"
    _writing(lab, back, above=before)
    _check_probe(lab)


def test_immediate_failback_returns_a_vm_to_its_preferred_node(lab: Lab) -> None:
    _create("p7", "--preferred", "n2", "--failback", "immediate")
    first = _running("p7")
    assert first["owner"] == "n2"
    _writing(lab, first)
    _cli("lab", "fault", "crash", "n2", "--name", lab.name)
    away = _running("p7", generation_above=first["generation"], not_on="n2")
    _writing(lab, away)
    _cli("lab", "fault", "restart", "n2", "--name", lab.name)
    back = _running("p7", generation_above=away["generation"])
    assert back["owner"] == "n2"
    events = _cli("events", "-o", "json", "--limit", "500").json()
    assert isinstance(events, list)
    stops = [e["reason"] for e in events if e["subject"] == "p7" and e["kind"] == "vm.stopping"]
    assert any(r.startswith("failback p7 to n2") for r in stops), stops  # stopped cleanly first
    _writing(lab, back)
    _check_probe(lab)


# ----- errors -----


def _one_line_error(args: list[str], code: int, fragment: str) -> None:
    result = run_cli(*args)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == code, (result.code, result.out, result.err)
    assert len(lines) == 1, result.err
    assert fragment in lines[0], result.err


def test_bad_requests_get_one_line_errors_and_leave_nothing_behind(lab: Lab) -> None:
    _one_line_error(["vm", "create", "x1", "--array", "a9"], 2, 'unknown array "a9"')
    _one_line_error(["vm", "create", "x1", "--preferred", "n9"], 2, '"n9" is not a node')
    _one_line_error(["vm", "create", "Bad_Name"], 2, "invalid VM name")
    _one_line_error(["vm", "create", "x1", "--failback", "25-3"], 2, "invalid --failback")
    _one_line_error(["vm", "start", "ghost"], 3, "VM 'ghost' does not exist")
    assert _vms() == {}
    luns = sorted(p.name for p in (lab.host_dir("a1") / "luns").glob("*.raw"))
    assert luns == ["lab-probe.raw"]
    _create("x1", start=False)
    _one_line_error(["vm", "create", "x1"], 4, "already exists")
    _cli("vm", "start", "x1")
    _one_line_error(["vm", "delete", "x1"], 5, "stop it first")
    _cli("vm", "stop", "x1")
    _cli("vm", "delete", "x1")
    assert _vms() == {}
    assert sorted(p.name for p in (lab.host_dir("a1") / "luns").glob("*.raw")) == ["lab-probe.raw"]


# ----- the watchdog and quarantine -----


def test_a_hung_agent_loses_its_vms_to_the_watchdog_and_the_vm_fails_over(lab: Lab) -> None:
    leader = next(n for n, v in _nodes().items() if v["leader"])
    victim = next(n for n in ("n1", "n2", "n3") if n != leader)
    _create("p8", "--preferred", victim)
    first = _running("p8")
    assert first["owner"] == victim
    before = _writing(lab, first)
    old_pid = _qemu_pid(lab, victim, "p8", first["generation"])
    assert old_pid is not None
    _cli("lab", "fault", "freeze", victim, "--name", lab.name)
    # Nobody renews the agent's deadline: its watchdog kills the VM.
    _until(lambda: not Path(f"/proc/{old_pid}").exists(), what="old QEMU killed")
    log = (lab.host_dir(victim) / "data" / "watchdog.log").read_text()
    assert f"watchdog.fenced pid={old_pid}" in log
    second = _running("p8", generation_above=first["generation"], not_on=victim)
    _writing(lab, second, above=before)
    _cli("lab", "fault", "thaw", victim, "--name", lab.name)
    _until(lambda: _nodes()[victim]["state"] == "up", what=f"{victim} up again")
    assert _vms()["p8"]["owner"] == second["owner"]
    _check_probe(lab)


def test_a_node_that_crashes_three_times_is_quarantined_and_gets_no_vms(lab: Lab) -> None:
    for _ in range(3):
        _cli("lab", "fault", "crash", "n3", "--name", lab.name)
        _until(lambda: _nodes()["n3"]["state"] == "down", what="n3 down")
        _cli("lab", "fault", "restart", "n3", "--name", lab.name)
        _until(lambda: _nodes()["n3"]["state"] in ("up", "quarantined"), what="n3 back")
    _until(lambda: _nodes()["n3"]["state"] == "quarantined", what="n3 quarantined")
    assert "node.quarantined" in _event_kinds("n3")
    _create("p9", "--preferred", "n3")
    vm = _running("p9")
    assert vm["owner"] != "n3"
    _writing(lab, vm)


def test_ha_settings_change_what_happens_after_a_qemu_crash(lab: Lab) -> None:
    _one_line_error(["cluster", "ha", "set", "--restart-limit", "-1"], 2, "restart_limit")
    _one_line_error(["cluster", "ha", "set", "--failover-threshold", "x"], 2, "failover-threshold")
    _one_line_error(["cluster", "ha", "set"], 2, "nothing to change")
    _cli("cluster", "ha", "set", "--restart-limit", "0", "--failover-threshold", "1")
    status = _cli("cluster", "ha", "status", "-o", "json").json()
    assert isinstance(status, dict)
    assert (status["restart_limit"], status["failover_threshold"]) == (0, 1)
    _create("p10")
    vm = _running("p10")
    _writing(lab, vm)
    # No restart in place: the first QEMU crash fails the VM over at once.
    kill_by_pid(_qemu_pid(lab, vm["owner"], "p10", vm["generation"]) or 0)
    moved = _running("p10", generation_above=vm["generation"], not_on=vm["owner"])
    _writing(lab, moved)
    # Threshold 1: the next crash leaves it failed.
    kill_by_pid(_qemu_pid(lab, moved["owner"], "p10", moved["generation"]) or 0)
    failed = _until(lambda: _vms()["p10"]["state"] == "failed" and _vms()["p10"], what="failed")
    assert "1 failovers within 6 h" in failed["reason"]
    _check_probe(lab)
