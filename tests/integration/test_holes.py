"""Safety holes of the control plane, closed and tried in a lab with real agents, etcd, QEMU
(TCG) and arrays: a crashed peer never makes the survivor of a 2-node cluster touch its own
VMs, and a second agent under a node's name is refused with nothing started."""

import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.integration.test_ha import (
    _check_probe,
    _cli,
    _create,
    _running,
    _vms,
    _writing,
)
from tests.support import run_cli

from vmcluster.lab.lab import Lab
from vmcluster.paths import DataDir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

CONVERGE_S = 60.0  # only so that nothing hangs


def _lab(home: DataDir, *args: str) -> Iterator[Lab]:
    name = "w" + uuid.uuid4().hex[:6]
    up = run_cli("lab", "up", "--name", name, *args)
    assert up.code == 0, up.err
    try:
        yield Lab(home, name)
    finally:
        down = run_cli("lab", "down", "--name", name)
        assert down.code == 0, down.err


@pytest.fixture
def two_nodes(home: DataDir) -> Iterator[Lab]:
    yield from _lab(home, "--nodes", "2", "--witness")


@pytest.fixture
def three_nodes(home: DataDir) -> Iterator[Lab]:
    yield from _lab(home)


def _leader() -> str:
    nodes = _cli("node", "list", "-o", "json").json()
    assert isinstance(nodes, list)
    (leader,) = [n["name"] for n in nodes if n["leader"]]
    return str(leader)


def test_two_nodes_and_a_witness_a_crashed_peer_leaves_the_survivors_vms_alone(
    two_nodes: Lab,
) -> None:
    """The dead node's lease (and its last link report, which says it hears the survivor)
    lives on for a lease TTL. The survivor must not see itself isolated: its own VM keeps its
    generation, and the dead node's VM runs on the survivor."""
    lab = two_nodes
    survivor = _leader()
    victim = "n2" if survivor == "n1" else "n1"
    _create("mine", "--preferred", survivor, "--possible", survivor)
    _create("theirs", "--preferred", victim)
    mine, theirs = _running("mine"), _running("theirs")
    assert (mine["owner"], theirs["owner"]) == (survivor, victim)
    _writing(lab, mine)
    _writing(lab, theirs)
    _cli("lab", "fault", "crash", victim, "--name", lab.name)
    deadline = time.monotonic() + CONVERGE_S
    moved: dict[str, Any] | None = None
    while time.monotonic() < deadline and moved is None:
        vms = _vms()
        now_mine = vms["mine"]
        # Never touched: same owner, same generation, running, at every look.
        assert (now_mine["owner"], now_mine["generation"], now_mine["state"]) == \
            (survivor, mine["generation"], "running"), now_mine  # fmt: skip
        if vms["theirs"]["state"] == "running" and vms["theirs"]["owner"] == survivor:
            moved = vms["theirs"]
        time.sleep(0.2)
    assert moved is not None, "the dead node's VM did not come back on the survivor"
    assert moved["generation"] == theirs["generation"] + 1
    kinds = _cli("events", "-o", "json", "--limit", "500").json()
    assert not [e for e in kinds if e["kind"] == "node.isolated" and e["subject"] == survivor]
    _writing(lab, moved)
    _check_probe(lab)


def test_a_second_agent_with_a_nodes_name_is_refused_and_starts_nothing(two_nodes: Lab) -> None:
    """An agent configured as n1 (its own data directory) on the other host: refused with one
    line and exit code 4 once n1's lease has been seen renewed; n1 keeps its VM, nothing more
    runs."""
    lab = two_nodes
    _create("web", "--preferred", "n1")
    web = _running("web")
    config = (lab.host_dir("n1") / "agent.toml").read_text()
    twin_dir = lab.host_dir("n2") / "twin"
    twin = config.replace(str(lab.host_dir("n1") / "data"), str(twin_dir))
    twin = "\n".join(
        f'api_socket = "{twin_dir / "api.sock"}"' if line.startswith("api_socket") else line
        for line in twin.splitlines() if not line.startswith("api_listen")
    )  # fmt: skip
    assert twin != config
    path = lab.host_dir("n2") / "twin.toml"
    path.write_text(twin + "\n")
    started = time.monotonic()
    result = run_cli("lab", "exec", "--name", lab.name, "n2", "--", *_agent_argv(path))
    assert time.monotonic() - started < CONVERGE_S
    lines = [line for line in result.err.splitlines() if line.strip().startswith("error:")]
    assert result.code == 4, (result.code, result.err[-2000:])
    assert len(lines) == 1, result.err[-2000:]
    assert "node n1: another agent (incarnation" in lines[0]
    assert "holds this node name in the cluster" in lines[0]
    assert not (twin_dir / "vms").exists()  # nothing adopted or started
    assert not (twin_dir / "api.sock").exists()
    after = _vms()["web"]
    assert (after["owner"], after["generation"], after["state"]) == \
        ("n1", web["generation"], "running")  # fmt: skip
    _check_probe(lab)


def _agent_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "vmcluster", "agent", "--config", str(config)]


def test_a_leader_cut_from_the_storage_hands_the_lead_over(three_nodes: Lab) -> None:
    """The leader loses both storage paths (cluster networks intact): it could not fence a VM
    at the arrays any more, so it hands the lead to a node that reaches them, which fails VMs
    over as usual."""
    lab = three_nodes
    old = _leader()
    others = sorted({"n1", "n2", "n3"} - {old})
    for network in ("storage-a", "storage-b"):
        _cli("lab", "fault", "link", old, network, "down", "--name", lab.name)
    deadline = time.monotonic() + CONVERGE_S
    while time.monotonic() < deadline and _leader_or_none() in (old, None):
        time.sleep(0.2)
    assert _leader_or_none() in others
    events = _cli("events", "-o", "json", "--limit", "500").json()
    assert [e for e in events if e["kind"] == "leader.resigned" and e["subject"] == old]
    possible = ",".join(others)
    # Asked first, the cut node cannot create the VM's LUN: it says so (421) having done
    # nothing, and the CLI asks the next agent.
    target = lab.api_target()
    first_cut = [target.endpoints[old], *(target.endpoints[n] for n in others)]
    env = {"VMCLUSTER_API": ",".join(first_cut), "VMCLUSTER_SECRETS": target.secrets_file}
    created = run_cli("vm", "create", "after", "--memory", "128", "--disk", "16M", "--start",
                      "--preferred", others[0], "--possible", possible, env=env)  # fmt: skip
    assert created.code == 0, created.err
    first = _running("after")
    _writing(lab, first)
    _cli("lab", "fault", "crash", first["owner"], "--name", lab.name)
    moved = _running("after", generation_above=first["generation"], not_on=first["owner"])
    assert moved["owner"] in others
    _writing(lab, moved)
    _cli("lab", "fault", "heal", "--name", lab.name)
    _check_probe(lab)


def _leader_or_none() -> str | None:
    nodes = run_cli("node", "list", "-o", "json").json()
    leaders = [n["name"] for n in nodes if n["leader"]] if isinstance(nodes, list) else []
    return str(leaders[0]) if len(leaders) == 1 else None
