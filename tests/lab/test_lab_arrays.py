"""The lab's arrays are hosts of their own: each runs qemu-storage-daemon and its array service in
its namespace, and nodes reach the service over storage-a and storage-b only."""

import json
import os
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support import run_cli

from vmcluster.agent.config import ArrayAccess, load_config
from vmcluster.arrays.serviceconfig import ServiceConfig, load_service_config
from vmcluster.lab import netns
from vmcluster.lab.lab import Lab
from vmcluster.lab.plan import Network, make_plan
from vmcluster.paths import DataDir


def test_nodes_reach_an_array_over_both_storage_networks(tmp_path: Path) -> None:
    lab = Lab(DataDir(tmp_path), "t1")
    a2 = make_plan("t1", nodes=2, arrays=2).host("a2")
    assert lab.array_service(a2) == ("10.77.11.102:10810", "10.77.12.102:10810")
    assert lab.array_access(a2) == ArrayAccess(
        name="a2",
        service=("10.77.11.102:10810", "10.77.12.102:10810"),
        nbd=("10.77.11.102:10809", "10.77.12.102:10809"),
    )


# ----- for real -----


def _in(lab: Lab, host: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    namespace = lab.plan().host(host).namespace
    full = ["ip", "netns", "exec", namespace, *argv]
    try:
        return subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(full, 124, "", "timed out")


def _array(lab: Lab, node: str, command: str, *addresses: str) -> subprocess.CompletedProcess[str]:
    """``vmcluster array COMMAND`` run on ``node``, asking array a1 at ``addresses``."""
    return _in(lab, node, sys.executable, "-m", "vmcluster", "array", command, "--name", "a1",
               "-o", "json", *addresses)  # fmt: skip


@pytest.fixture
def small_lab(home: DataDir) -> Iterator[Lab]:
    name = "t" + uuid.uuid4().hex[:6]
    up = run_cli("lab", "up", "--name", name, "--nodes", "1", "--arrays", "1")
    assert up.code == 0, up.err
    lab = Lab(home, name)
    try:
        yield lab
    finally:
        down = run_cli("lab", "down", "--name", name)
        assert down.code == 0, down.err
        assert netns.namespaces_with_prefix(f"vmc-{name}-") == []


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")
def test_an_array_host_runs_its_service_and_nodes_reach_it_over_the_storage_networks(
    small_lab: Lab,
) -> None:
    lab = small_lab
    a1 = lab.plan().host("a1")
    path_a, path_b = lab.array_service(a1)

    # What the lab wrote: the node knows the service's addresses, nothing of the array's files.
    node = load_config(lab.host_dir("n1") / "agent.toml")
    assert node.arrays["a1"].service == (path_a, path_b)
    assert "qmp_socket" not in tomllib.loads((lab.host_dir("n1") / "agent.toml").read_text())
    service = load_service_config(lab.host_dir("a1") / "array-service.toml")
    assert service == ServiceConfig(array="a1", directory=str(lab.host_dir("a1")),
                                    qmp_socket=str(lab.array(a1).qmp_socket),
                                    listen=(path_a, path_b))  # fmt: skip
    roles = [(p.role, p.alive) for p in lab.load().processes_of("a1")]
    assert roles == [("array", True), ("array-service", True)]

    # A node asks the array over each path alone.
    for address in (path_a, path_b):
        luns = _array(lab, "n1", "luns", address)
        assert luns.returncode == 0, luns.stderr
        assert json.loads(luns.stdout) == [{"name": "lab-probe", "size_bytes": 1024 * 1024,
                                            "generation": 0}]  # fmt: skip

    # One path down: the client takes the other.
    assert run_cli("lab", "fault", "link", "a1", "storage-a", "down").code == 0
    status = _array(lab, "n1", "status", path_a, path_b)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == {"name": "a1", "luns": 1, "exports": 1}
    alone = _array(lab, "n1", "status", path_a)
    assert alone.returncode == 7, alone.stderr  # ArrayUnavailable
    assert alone.stderr.strip().startswith(f"error: array a1: no answer from its service ({path_a}")
    assert run_cli("lab", "fault", "link", "a1", "storage-a", "up").code == 0

    # The array host crashes (daemon and service) and comes back with its exports.
    assert run_cli("lab", "fault", "crash", "a1").code == 0
    assert _array(lab, "n1", "status", path_a, path_b).returncode == 7
    assert run_cli("lab", "fault", "restart", "a1").code == 0
    exports = _array(lab, "n1", "exports", path_b)
    assert json.loads(exports.stdout) == ["lab-probe"], exports.stderr
    size = _in(lab, "n1", "nbdinfo", "--size", f"nbd://{a1.address(Network.STORAGE_A)}:10809/"
               "lab-probe")  # fmt: skip
    assert size.stdout.strip() == str(1024 * 1024), size.stderr
