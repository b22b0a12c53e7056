"""Multipath in a lab, with real QEMU (TCG), the node's block forwarder and real link faults: a
writing probe VM rides through the loss of either storage path, and of both for a while, with
no I/O error and no lost acknowledged write; a fenced generation is refused on every path; the
forwarder is untouched by an agent crash. Every test ends with the probe checker."""

import asyncio
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tests.support import kill_by_pid, run_cli

from vmcluster.forwarder.client import ForwarderClient
from vmcluster.guest.check import scan_records
from vmcluster.guest.record import SECTOR_BYTES, sector_of
from vmcluster.lab.lab import Lab
from vmcluster.lab.plan import Network
from vmcluster.lab.procs import Tracked, forget, spawn
from vmcluster.paths import DataDir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

CONVERGE_S = 60.0  # generous, so that nothing hangs; bench/blockio measures the real stall


def _until(check: Callable[[], Any], timeout_s: float = CONVERGE_S, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (AssertionError, KeyError, IndexError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"not reached within {timeout_s} s: {what} (last: {last!r})")


def _cli(*args: str) -> Any:
    result = run_cli(*args)
    assert result.code == 0, (args, result.err)
    return result


def _vm(name: str) -> dict[str, Any]:
    found = _cli("vm", "show", name, "-o", "json").json()
    assert isinstance(found, dict)
    return found


def _running(name: str, generation_above: int = 0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        vm = _vm(name)
        ok = vm["state"] == "running" and vm["generation"] > generation_above
        return vm if ok else None

    result: dict[str, Any] = _until(check, what=f"{name} running")
    return result


def _acks(lab: Lab, vm: dict[str, Any]) -> int:
    console = (
        lab.host_dir(vm["owner"]) / "data" / "vms" / vm["name"] / f"g{vm['generation']}.console"
    )
    if not console.exists():
        return 0
    acks = [int(line.split()[1]) for line in console.read_text(errors="replace").splitlines()
            if line.startswith("ACK ") and line.split()[1].isdigit()]  # fmt: skip
    return max(acks, default=0)


def _writes_on(lab: Lab, vm: dict[str, Any], count: int = 10) -> int:
    """Wait until the instance acknowledges ``count`` more writes; the new highest ACK."""
    start = _acks(lab, vm)
    return int(_until(lambda: (a := _acks(lab, vm)) >= start + count and a,
                      what=f"{vm['name']} writing {count} more"))  # fmt: skip


def _paths(node: str) -> dict[str, dict[str, Any]]:
    rows = _cli("path", "list", "--node", node, "-o", "json").json()
    return {r["path"]: r for r in rows}


def _path_state(node: str, path: str, state: str) -> dict[str, Any]:
    result: dict[str, Any] = _until(lambda: (r := _paths(node).get(path)) and
                                    r["state"] == state and r,
                                    what=f"{node} path {path} {state}")  # fmt: skip
    return result


def _events(kind_prefix: str) -> list[dict[str, Any]]:
    events = _cli("events", "-o", "json", "--limit", "500").json()
    return [e for e in events if e["kind"].startswith(kind_prefix)]


def _where_records_are(lab: Lab, vm: str, first: int) -> str:
    """For a failed check: where the records of ``vm`` from seq ``first`` on are found, in
    every LUN of every array of the lab (its own LUN or another), and what the gaps hold."""
    lines = []
    for array in lab.plan().arrays:
        for path in sorted((lab.host_dir(array.name) / "luns").glob("*.raw")):
            disk = path.read_bytes()
            mine = {seq: r for seq, r in scan_records(disk) if r.vm == vm and seq >= first}
            if not mine:
                continue
            seqs = sorted(mine)
            gaps = [s for s in range(first, seqs[-1]) if s not in mine][:10]
            held = {s: disk[sector_of(s) * SECTOR_BYTES :][:64] for s in gaps[:3]}
            lines.append(f"{array.name}/{path.name}: {len(seqs)} records {seqs[0]}..{seqs[-1]}, "
                         f"generations {sorted({r.generation for r in mine.values()})}, "
                         f"missing {gaps}, slots hold {held}")  # fmt: skip
    return "; ".join(lines) or "no record of it anywhere"


def _check_probe(lab: Lab) -> list[dict[str, Any]]:
    result = run_cli("lab", "check", "-o", "json", "--name", lab.name)
    report = json.loads(result.out)
    for vm in report:
        if vm["lost_acks"]:
            vm["where"] = _where_records_are(lab, vm["vm"], vm["highest_on_disk"] + 1)
        assert vm["lost_acks"] == 0, json.dumps(vm)
        assert vm["stale_writes"] == 0, json.dumps(vm)
    assert result.code == 0, result.err
    return list(report)


@pytest.fixture
def lab(home: DataDir, request: pytest.FixtureRequest) -> Iterator[Lab]:
    name = "m" + uuid.uuid4().hex[:6]
    up = run_cli("lab", "up", "--name", name)
    assert up.code == 0, up.err
    the_lab = Lab(home, name)
    try:
        yield the_lab
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(run_cli("events", "--limit", "60").out)
            for node in ("n1", "n2", "n3"):
                for log in ("agent.log", "forwarder.log"):
                    path = the_lab.host_dir(node) / log
                    if path.exists():
                        lines = path.read_text().splitlines()
                        print(f"--- {node}/{log}\n" + "\n".join(lines[-30:]))
        down = run_cli("lab", "down", "--name", name)
        assert down.code == 0, down.err


def _start_probe(name: str) -> dict[str, Any]:
    _cli("vm", "create", name, "--memory", "128", "--disk", "16M", "--start")
    return _running(name)


def test_a_probe_vm_writes_on_through_the_loss_of_each_path_and_of_both(lab: Lab) -> None:
    vm = _start_probe("mp1")
    owner = vm["owner"]
    _writes_on(lab, vm, 5)
    paths = _paths(owner)
    assert {p: r["state"] for p, r in paths.items()} == {"storage-a": "up", "storage-b": "up"}
    assert paths["storage-a"]["disk"] == "mp1.disk0"

    # storage-a down: the writes go on over storage-b; the path comes back after the link.
    _cli("lab", "fault", "link", owner, "storage-a", "down", "--name", lab.name)
    down = _path_state(owner, "storage-a", "down")
    assert down["disk_state"] == "active"
    _writes_on(lab, vm)
    _cli("lab", "fault", "link", owner, "storage-a", "up", "--name", lab.name)
    _path_state(owner, "storage-a", "up")

    # storage-b down, storage-a back: the same.
    _cli("lab", "fault", "link", owner, "storage-b", "down", "--name", lab.name)
    _path_state(owner, "storage-b", "down")
    _writes_on(lab, vm)
    _cli("lab", "fault", "link", owner, "storage-b", "up", "--name", lab.name)
    _path_state(owner, "storage-b", "up")

    # Both down for a moment (shorter than the agent's array probe takes to call the array
    # lost): the guest's writes wait, then go on when one path returns.
    for network in ("storage-a", "storage-b"):
        _cli("lab", "fault", "link", owner, network, "down", "--name", lab.name)
    _until(lambda: _paths(owner)["storage-a"]["disk_state"] == "waiting", 10,
           what="the disk waiting with no path")  # fmt: skip
    waiting = _acks(lab, vm)
    time.sleep(1.5)
    stalled = _acks(lab, vm)
    assert stalled <= waiting + 1, (waiting, stalled)  # nothing acknowledged without a path
    _cli("lab", "fault", "link", owner, "storage-a", "up", "--name", lab.name)
    _writes_on(lab, vm)
    _cli("lab", "fault", "link", owner, "storage-b", "up", "--name", lab.name)
    _path_state(owner, "storage-b", "up")

    # The same instance all along: no I/O error reached the guest.
    now = _vm("mp1")
    assert (now["owner"], now["generation"]) == (owner, vm["generation"])
    log = (lab.host_dir(owner) / "agent.log").read_text()
    assert "vm.instance.lost-disk" not in log
    kinds = [e["kind"] for e in _events("path.") if e["subject"] == f"{owner}/mp1.disk0"]
    assert kinds.count("path.down") >= 4, kinds
    assert "disk.waiting" in [e["kind"] for e in _events("disk.")]
    _cli("vm", "stop", "mp1")
    report = _check_probe(lab)
    assert report[0]["highest_acked"] > stalled


def _fwd_status(lab: Lab, node: str) -> list[dict[str, Any]]:
    """The node's forwarder's disks (its control socket is a file: no namespace needed)."""
    return asyncio.run(ForwarderClient(lab.forwarder_socket(node)).status())


def test_a_fenced_generation_is_refused_on_every_path(lab: Lab) -> None:
    """The owner is cut off the cluster networks (its storage paths stay): the VM fails over at
    the next generation, the array retires the old one, and the old node's forwarder reports
    the old disk fenced; the old export answers on no portal."""
    vm = _start_probe("mp2")
    owner = vm["owner"]
    _writes_on(lab, vm, 3)
    for network in ("cluster1", "cluster2"):
        _cli("lab", "fault", "link", owner, network, "down", "--name", lab.name)
    second = _until(lambda: (v := _vm("mp2"))["state"] == "running" and
                    v["generation"] > vm["generation"] and v["owner"] != owner and v,
                    what="mp2 failed over")  # fmt: skip
    log = lab.host_dir(owner) / "forwarder.log"
    _until(lambda: "forwarder.disk.fenced disk=mp2.disk0" in log.read_text(), 30,
           what="the old node's forwarder reports the disk fenced")  # fmt: skip
    # Every portal refuses the old generation's export, asked from the old node itself.
    old_export = f"{vm['disks'][0]['lun']}.g{vm['generation']}"
    namespace = lab.plan().host(owner).namespace
    array = lab.plan().host(vm["disks"][0]["array"])
    for network in ("storage-a", "storage-b"):
        uri = f"nbd://{array.address(Network(network))}:10809/{old_export}"
        probe = subprocess.run(["ip", "netns", "exec", namespace, "nbdinfo", uri],
                               capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert probe.returncode != 0, (network, probe.stdout)
        assert f"for export: {old_export}" in probe.stderr, probe.stderr  # refused by name
    _writes_on(lab, second, 3)
    _cli("lab", "fault", "heal", "--name", lab.name)
    _check_probe(lab)


def _tracked(lab: Lab, node: str, role: str) -> Tracked:
    return next(t for t in lab.load().processes_of(node, role))


def test_an_agent_crash_leaves_the_forwarder_and_the_written_data_alone(lab: Lab) -> None:
    """The agent of the VM's node is killed: its forwarder (its own process) keeps serving the
    instance, whose writes go on until the cluster fences it (the node looks isolated without
    its agent), then the VM runs on at the next generation with nothing lost. The restarted
    agent detaches the disk of the instance that no longer runs."""
    vm = _start_probe("mp3")
    owner = vm["owner"]
    _writes_on(lab, vm, 3)
    forwarder = _tracked(lab, owner, "forwarder")
    agent = _tracked(lab, owner, "agent")
    assert agent.pid is not None
    killed_at = _acks(lab, vm)
    kill_by_pid(agent.pid)
    # The instance's I/O does not pass through the agent: it acknowledges writes on after.
    _until(lambda: _acks(lab, vm) > killed_at + 3, 20, what="writes after the agent died")
    second = _until(lambda: (v := _vm("mp3"))["state"] == "running" and
                    v["generation"] > vm["generation"] and v,
                    what="mp3 running at the next generation")  # fmt: skip
    assert forwarder.alive, "the forwarder went down with the agent"
    state = lab.load()
    restarted = spawn(forget(agent))
    state.replace_process(agent, restarted)
    state.save(lab.state_path)
    _until(lambda: all(d["generation"] != vm["generation"] for d in _fwd_status(lab, owner)
                       if d["disk"] == "mp3.disk0"),
           what="the old generation's disk detached by the new agent")  # fmt: skip
    assert _tracked(lab, owner, "forwarder").pid == forwarder.pid
    _writes_on(lab, second, 3)
    _check_probe(lab)


def test_an_agent_restart_planned_or_killed_keeps_the_vm_writing_at_its_generation(
    lab: Lab,
) -> None:
    """The agent of the VM's node stopped as systemd restarts it (SIGTERM) and started again:
    it hands the node over (Restarting, not Isolated, while it is away), so the VM is neither
    fenced nor moved; its writes go on through the forwarder throughout, at one generation,
    with no ACK lost. Then the agent killed (SIGKILL): it cannot hand over, but its watchdog
    does, within a fraction of the heartbeat timeout, with the same outcome."""
    vm = _start_probe("mp4")
    owner = vm["owner"]
    _writes_on(lab, vm, 3)
    for how, args, said in (("planned", [], "stopped (SIGTERM)"), ("killed", ["--kill"], "killed")):
        before = len([e for e in _events("node.restarted") if e["subject"] == owner])
        done = _cli("lab", "fault", "agent-restart", owner, *args, "--name", lab.name)
        assert said in done.out, done.out
        _until(lambda: len([e for e in _events("node.restarted")
                            if e["subject"] == owner]) > before,  # noqa: B023
               what=f"{owner}'s agent back and the node taken over ({how})")  # fmt: skip
        assert [e for e in _events("node.restarting") if e["subject"] == owner]
        _writes_on(lab, vm, 5)
        after = _vm("mp4")
        assert (after["owner"], after["generation"], after["state"]) == \
            (owner, vm["generation"], "running"), how  # fmt: skip
        assert not [e for e in _events("vm.") if "mp4" in e["subject"] and "fail" in e["kind"]]
        _check_probe(lab)
