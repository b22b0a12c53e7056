"""The watchdog hands a dead agent's node over (a killed or crashed agent), against a real etcd:
the node's alive key moves onto a restart lease and its VMs run on past the agent's deadline;
where the cluster had already moved a VM, it does not, and the VMs die at the old deadline."""

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.agent.test_watchdog import _ident, _state, _until, run_dir  # noqa: F401
from tests.clusterstate.conftest import etcd_server  # noqa: F401
from tests.clusterstate.store_backends import EtcdServer
from tests.support import kill_by_pid

from vmcluster.agent import watchdog
from vmcluster.clusterstate.etcdgateway import EtcdGateway
from vmcluster.clusterstate.handover import DeadAgentTerms
from vmcluster.clusterstate.keys import dumps, loads
from vmcluster.clusterstate.store import Commit, Put

pytestmark = pytest.mark.integration

GRACE_S = 8
DEADLINE_S = 2.5  # the agent's deadline, from the start of a test


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    made: list[subprocess.Popen[bytes]] = []
    try:
        yield made
    finally:
        for proc in made:
            kill_by_pid(proc.pid)
            proc.wait(timeout=10)


def _scene(
    etcd: EtcdServer, directory: Path, sleepers: list[subprocess.Popen[bytes]], *, owner: str
) -> tuple[EtcdGateway, str, subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """An agent (a sleeping process) on lease L holding node n1, one VM placed at ``owner``,
    its QEMU (another), and the watchdog told of both with the hand-over terms."""
    gateway = EtcdGateway([etcd.endpoint])
    prefix = f"/t/{uuid.uuid4().hex}"
    alive, placement = f"{prefix}/nodes/n1/alive", f"{prefix}/vms/web/placement"
    lease = gateway.grant_lease(20)
    assert gateway.commit(Commit(puts={
        alive: Put(value=dumps({"incarnation": 5, "since": 0.0}), lease=lease),
        f"{prefix}/nodes/n1/status": Put(value=b"{}", lease=lease),
        placement: Put(value=dumps({"owner": owner, "generation": 3})),
    }))  # fmt: skip
    agent = subprocess.Popen(["sleep", "60"])
    qemu = subprocess.Popen(["sleep", "60"])
    sleepers += [agent, qemu]
    terms = DeadAgentTerms(node="n1", alive_key=alive, lease=lease, incarnation=5,
                           grace_s=GRACE_S, vms=((placement, "web", 3),))  # fmt: skip
    watchdog.write_state(
        directory, watchdog.boottime() + DEADLINE_S, [_ident(qemu)], check_s=0.02,
        handover=watchdog.handover_terms(terms, etcd=[etcd.endpoint], timeout_s=0.5,
                                         margin_s=1.0),
        agent=_ident(agent),
    )  # fmt: skip
    return gateway, alive, agent, qemu


def _die(proc: subprocess.Popen[bytes]) -> None:
    kill_by_pid(proc.pid)
    proc.wait(timeout=10)


def test_a_killed_agents_node_is_handed_over_and_its_vms_run_on(
    etcd_server: EtcdServer,  # noqa: F811
    run_dir: Path,  # noqa: F811
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    gateway, alive, agent, qemu = _scene(etcd_server, run_dir, sleepers, owner="n1")
    started = time.monotonic()
    _die(agent)

    def handed() -> bool:
        entry = gateway.get(alive)
        return entry is not None and "restarting" in loads(entry.value)

    _until(handed, timeout_s=5.0)
    assert time.monotonic() - started < 1.0  # well within the heartbeat timeout
    entry = gateway.get(alive)
    assert entry is not None
    record = loads(entry.value)
    assert record["restarting"]["by"] == "watchdog"
    assert record["restarting"]["lease"] == entry.lease
    assert record["incarnation"] == 5  # the agent's next run knows the node as its own
    # The dead agent's lease is gone, and its link report with it (as after a planned stop).
    assert gateway.get(alive.replace("/alive", "/status")) is None
    # Past the agent's deadline: the QEMU runs on, until the restart lease's end.
    time.sleep(DEADLINE_S + 1.0)
    assert _state(qemu.pid) not in ("gone", "Z")
    state = watchdog._read(watchdog.state_path(run_dir))
    assert state is not None
    assert state["deadline"] > watchdog.boottime() + GRACE_S - DEADLINE_S - 3
    gateway.revoke_lease(entry.lease)


def test_no_hand_over_once_a_vm_was_moved_and_it_dies_at_the_old_deadline(
    etcd_server: EtcdServer,  # noqa: F811
    run_dir: Path,  # noqa: F811
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    gateway, alive, agent, qemu = _scene(etcd_server, run_dir, sleepers, owner="n2")
    _die(agent)
    _until(lambda: qemu.poll() is not None, timeout_s=DEADLINE_S + 5.0)
    entry = gateway.get(alive)
    assert entry is not None
    assert "restarting" not in loads(entry.value)
    log = (run_dir.parent / "watchdog.log").read_text()
    assert "watchdog.handover.refused" in log
    assert "VM web was moved (generation 3 on n2)" in log
