"""The lab for real: namespaces, bridges, an etcd cluster, qemu-storage-daemon arrays, faults.

Every test builds its own lab under a fresh data directory and removes it, and checks that
``lab down`` leaves no namespace and no process behind."""

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.support import VMCLUSTER, CliResult, run_cli

from vmcluster.lab import netns
from vmcluster.lab.lab import Lab
from vmcluster.lab.plan import Network
from vmcluster.paths import DataDir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

PROBE_SIZE = "1048576"


def _name() -> str:
    return "t" + uuid.uuid4().hex[:6]


def _in(lab: Lab, host: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run argv in a host of the lab; a command that times out counts as failed (rc 124)."""
    namespace = lab.plan().host(host).namespace
    full = ["ip", "netns", "exec", namespace, *argv]
    try:
        return subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(full, 124, "", "timed out")


def _nbd_size(lab: Lab, node: str, array: str, network: Network) -> str | None:
    address = lab.plan().host(array).address(network)
    result = _in(lab, node, "nbdinfo", "--size", f"nbd://{address}:10809/lab-probe", timeout=8)
    return result.stdout.strip() if result.returncode == 0 else None


def _etcd_put(lab: Lab, host: str, key: str, value: str) -> bool:
    result = _in(lab, host, "etcdctl", "--endpoints", "http://127.0.0.1:2379",
                 "--dial-timeout", "2s", "--command-timeout", "3s", "put", key, value)  # fmt: skip
    return result.returncode == 0


def _etcd_get(lab: Lab, host: str, key: str) -> str | None:
    result = _in(lab, host, "etcdctl", "--endpoints", "http://127.0.0.1:2379",
                 "--dial-timeout", "2s", "--command-timeout", "3s", "get", key,
                 "--print-value-only")  # fmt: skip
    return result.stdout.strip() if result.returncode == 0 else None


def _eventually(check: Callable[[], bool], timeout_s: float = 30) -> bool:
    """Poll ``check`` until it holds (for state that converges, such as a member rejoining)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.3)
    return check()


def _tracked_pids(lab: Lab) -> list[int]:
    return [p.pid for p in lab.load().processes if p.pid is not None]


def _assert_gone(name: str, pids: list[int]) -> None:
    assert netns.namespaces_with_prefix(f"vmc-{name}-") == []
    for pid in pids:
        status = Path(f"/proc/{pid}/status")
        if status.exists():  # only a zombie awaiting its reaper may remain, never a live process
            assert "State:\tZ" in status.read_text(), f"pid {pid} still runs"


@pytest.fixture
def lab(home: DataDir) -> Iterator[Lab]:
    name = _name()
    result = run_cli("lab", "up", "--name", name)
    assert result.code == 0, result.err
    the_lab = Lab(home, name)
    pids = _tracked_pids(the_lab)
    try:
        yield the_lab
    finally:
        pids += _tracked_pids(the_lab) if the_lab.exists() else []
        down = run_cli("lab", "down", "--name", name)
        assert down.code == 0, down.err
        _assert_gone(name, pids)


def test_up_status_down_leaves_nothing(home: DataDir) -> None:
    name = _name()
    up = run_cli("lab", "up", "--name", name)
    assert up.code == 0, up.err
    assert f"lab {name} is up" in up.out
    the_lab = Lab(home, name)
    try:
        pids = _tracked_pids(the_lab)
        assert len(pids) == 13  # 3 etcd members, 2 arrays (daemon, service), 3 forwarders, 3 agents

        status = run_cli("lab", "status", "-o", "json").json()  # the current lab, no --name
        assert isinstance(status, dict)
        assert status["name"] == name
        assert status["status"] == "up"
        hosts = {h["name"]: h for h in status["hosts"]}
        assert set(hosts) == {"n1", "n2", "n3", "a1", "a2", "client"}
        assert hosts["n2"]["addresses"] == {"cluster1": "10.77.1.12", "cluster2": "10.77.2.12",
                                            "storage-a": "10.77.11.12", "storage-b": "10.77.12.12",
                                            "vm": None}  # fmt: skip
        assert all(state == "up" for h in hosts.values() for state in h["links"].values())
        assert all(p["alive"] for p in status["processes"])
        assert status["faults"] == []
        assert sorted(netns.namespaces_with_prefix(f"vmc-{name}-")) == sorted(
            f"vmc-{name}-{h}" for h in ["switch", "n1", "n2", "n3", "a1", "a2", "client"]
        )

        down = run_cli("lab", "down")
        assert down.code == 0, down.err
        assert "13 processes stopped, 7 namespaces deleted" in down.out
        _assert_gone(name, pids)
        assert not the_lab.dir.exists()
        again = run_cli("lab", "down", "--name", name)
        assert again.code == 0
        assert "nothing to remove" in again.out
    finally:  # a failed assertion must not leave the lab behind
        if the_lab.dir.exists():
            run_cli("lab", "down", "--name", name)


def test_etcd_is_healthy_from_every_node_over_both_cluster_networks(lab: Lab) -> None:
    plan = lab.plan()
    for node in plan.nodes:
        for network in (Network.CLUSTER1, Network.CLUSTER2):
            endpoints = ",".join(plan.etcd_endpoints(network))
            result = _in(lab, node.name, "etcdctl", "--endpoints", endpoints, "endpoint", "health")
            assert result.returncode == 0, result.stderr
            assert result.stderr.count("is healthy") == 3, result.stderr
    assert _etcd_put(lab, "n1", "/probe", "one")
    assert _etcd_get(lab, "n3", "/probe") == "one"


def test_every_node_reaches_every_array_over_both_paths(lab: Lab) -> None:
    for node in ("n1", "n2", "n3"):
        for array in ("a1", "a2"):
            for network in (Network.STORAGE_A, Network.STORAGE_B):
                assert _nbd_size(lab, node, array, network) == PROBE_SIZE, (node, array, network)
    # Data written over path A is read back over path B (one LUN, two paths).
    a_url = "nbd://10.77.11.101:10809/lab-probe"
    b_url = "nbd://10.77.12.101:10809/lab-probe"
    write = _in(lab, "n1", "qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 4096", a_url)
    assert write.returncode == 0, write.stderr
    read = _in(lab, "n2", "qemu-io", "-f", "raw", "-c", "read -P 0x5a 4096 4096", b_url)
    assert read.returncode == 0, read.stdout + read.stderr
    assert "Pattern verification failed" not in read.stdout


def test_a_path_whose_link_is_down_is_unreachable(lab: Lab) -> None:
    result = run_cli("lab", "fault", "link", "n1", "storage-a", "down")
    assert result.code == 0, result.err
    assert _nbd_size(lab, "n1", "a1", Network.STORAGE_A) is None
    assert _nbd_size(lab, "n1", "a1", Network.STORAGE_B) == PROBE_SIZE
    assert _nbd_size(lab, "n2", "a1", Network.STORAGE_A) == PROBE_SIZE
    status = run_cli("lab", "status", "-o", "json").json()
    assert isinstance(status, dict)
    n1 = next(h for h in status["hosts"] if h["name"] == "n1")
    assert n1["links"]["storage-a"] == "down"
    assert status["faults"] == [{"kind": "link", "host": "n1", "network": "storage-a"}]

    assert run_cli("lab", "fault", "link", "n1", "storage-a", "up").code == 0
    assert _nbd_size(lab, "n1", "a1", Network.STORAGE_A) == PROBE_SIZE
    assert run_cli("lab", "status", "-o", "json").json()["faults"] == []  # type: ignore[index]


def test_crash_keeps_quorum_and_restart_brings_the_member_back(lab: Lab) -> None:
    n2_pids = [p.pid for p in lab.load().processes_of("n2")]
    crash = run_cli("lab", "fault", "crash", "n2")
    assert crash.code == 0, crash.err
    assert "crashed n2" in crash.out
    for pid in n2_pids:
        assert pid is not None
        _assert_gone("none", [pid])
    assert _eventually(lambda: _etcd_put(lab, "n1", "/while-n2-down", "yes"), 15), "quorum kept"
    health = lab.etcd_health(lab.plan(), via=lab.plan().host("n1"))
    assert health == {"n1": True, "n2": False, "n3": True}
    status = run_cli("lab", "status", "-o", "json").json()
    assert isinstance(status, dict)
    assert [p["alive"] for p in status["processes"] if p["host"] == "n2"] == [False] * 3
    n2 = next(h for h in status["hosts"] if h["name"] == "n2")
    assert set(n2["links"].values()) == {"down"}

    restart = run_cli("lab", "fault", "restart", "n2")
    assert restart.code == 0, restart.err
    assert lab.etcd_health(lab.plan()) == {"n1": True, "n2": True, "n3": True}
    assert _etcd_get(lab, "n2", "/while-n2-down") == "yes", "the member caught up"


def test_an_array_restarts_with_its_data_and_exports(lab: Lab) -> None:
    url = "nbd://10.77.11.102:10809/lab-probe"
    assert (
        _in(lab, "n1", "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 65536", url).returncode == 0
    )
    assert run_cli("lab", "fault", "crash", "a2").code == 0
    assert _nbd_size(lab, "n1", "a2", Network.STORAGE_A) is None
    assert run_cli("lab", "fault", "restart", "a2").code == 0
    read = _in(lab, "n3", "qemu-io", "-f", "raw", "-c", "read -P 0x77 0 65536", url)
    assert read.returncode == 0, read.stderr
    assert "Pattern verification failed" not in read.stdout


def _tcp_reachable(lab: Lab, src: str, address: str, port: int = 2379) -> bool:
    probe = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(1.0)\n"
        "try:\n s.connect((sys.argv[1], int(sys.argv[2]))); print('ok')\n"
        "except OSError as e: print('fail', e)\n"
    )
    result = _in(lab, src, "python3", "-c", probe, address, str(port))
    return result.stdout.startswith("ok")


def test_partition_separates_exactly_the_two_groups(lab: Lab) -> None:
    plan = lab.plan()
    result = run_cli("lab", "fault", "partition", "n1", "/", "n2", "n3")
    assert result.code == 0, result.err
    for network in (Network.CLUSTER1, Network.CLUSTER2):
        for other in ("n2", "n3"):
            assert not _tcp_reachable(lab, "n1", plan.host(other).address(network))
            assert not _tcp_reachable(lab, other, plan.host("n1").address(network))
        assert _tcp_reachable(lab, "n2", plan.host("n3").address(network))
        assert _tcp_reachable(lab, "n3", plan.host("n2").address(network))
    # Storage paths are not part of the partition.
    assert _nbd_size(lab, "n1", "a1", Network.STORAGE_A) == PROBE_SIZE
    assert _nbd_size(lab, "n1", "a2", Network.STORAGE_B) == PROBE_SIZE
    assert not _etcd_put(lab, "n1", "/minority", "x"), "the minority side has no quorum"
    assert _etcd_put(lab, "n2", "/majority", "y")

    healed = run_cli("lab", "fault", "heal")
    assert healed.code == 0
    assert "partition n1 / n2 n3" in healed.out
    assert _tcp_reachable(lab, "n1", plan.host("n2").address(Network.CLUSTER1))
    assert _eventually(lambda: _etcd_get(lab, "n1", "/majority") == "y"), (
        "n1 rejoins and catches up"
    )


def test_freeze_thaw_slow_and_heal(lab: Lab) -> None:
    freeze = run_cli("lab", "fault", "freeze", "n3", "--role", "etcd")
    assert freeze.code == 0, freeze.err
    (etcd3,) = lab.load().processes_of("n3", "etcd")
    assert "State:\tT" in Path(f"/proc/{etcd3.pid}/status").read_text()
    assert run_cli("lab", "fault", "thaw", "n3", "--role", "etcd").code == 0
    assert "State:\tT" not in Path(f"/proc/{etcd3.pid}/status").read_text()

    slow = run_cli("lab", "fault", "slow", "n1", "cluster2", "2mbit")
    assert slow.code == 0, slow.err
    qdisc = _in(lab, "n1", "tc", "qdisc", "show", "dev", "cluster2").stdout
    assert "tbf" in qdisc
    assert "2Mbit" in qdisc
    assert run_cli("lab", "fault", "freeze", "n2", "--role", "etcd").code == 0
    faults = run_cli("lab", "status", "-o", "json").json()["faults"]  # type: ignore[index]
    assert {f["kind"] for f in faults} == {"slow", "freeze"}

    assert run_cli("lab", "fault", "heal").code == 0
    assert "tbf" not in _in(lab, "n1", "tc", "qdisc", "show", "dev", "cluster2").stdout
    assert run_cli("lab", "status", "-o", "json").json()["faults"] == []  # type: ignore[index]
    assert lab.etcd_health(lab.plan()) == {"n1": True, "n2": True, "n3": True}


def test_two_nodes_and_a_witness_survive_the_loss_of_a_node(home: DataDir) -> None:
    name = _name()
    assert run_cli("lab", "up", "--name", name, "--nodes", "2", "--arrays", "1",
                   "--witness").code == 0  # fmt: skip
    the_lab = Lab(home, name)
    pids = _tracked_pids(the_lab)
    try:
        assert the_lab.etcd_health(the_lab.plan()) == {"n1": True, "n2": True, "witness": True}
        assert run_cli("lab", "fault", "crash", "n1").code == 0
        # If n1 led, the survivors first elect a new leader (about a second).
        assert _eventually(lambda: _etcd_put(the_lab, "n2", "/after-n1-crash", "ok"), 15)
    finally:
        pids += _tracked_pids(the_lab)
        assert run_cli("lab", "down", "--name", name).code == 0
    _assert_gone(name, pids)


def test_two_labs_coexist_and_eight_nodes_work(home: DataDir) -> None:
    first, second = _name(), _name()
    assert run_cli("lab", "up", "--name", first, "--nodes", "2", "--arrays", "0").code == 0
    try:
        big = run_cli("lab", "up", "--name", second, "--nodes", "8", "--arrays", "1")
        assert big.code == 0, big.err
        lab2 = Lab(home, second)
        assert all(lab2.etcd_health(lab2.plan()).values())
        assert _etcd_put(lab2, "n8", "/eight", "8")
        assert _etcd_get(Lab(home, first), "n1", "/eight") == "", "labs are separate"
        listed = run_cli("lab", "list", "-o", "json").json()
        assert listed == sorted([first, second])
        ambiguous = run_cli("lab", "status", "--name", first)
        assert ambiguous.code == 0
    finally:
        run_cli("lab", "down", "--name", second)
        run_cli("lab", "down", "--name", first)
    assert netns.namespaces_with_prefix(f"vmc-{first}-") == []
    assert netns.namespaces_with_prefix(f"vmc-{second}-") == []


def _one_line_error(result: CliResult, code: int, *fragments: str) -> None:
    assert result.code == code, (result.code, result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_input_is_refused_in_one_line(lab: Lab) -> None:
    _one_line_error(run_cli("lab", "fault", "crash", "n9"), 2, "unknown host 'n9'")
    _one_line_error(run_cli("lab", "fault", "link", "n1", "storage-c", "down"), 2,
                    "unknown network 'storage-c'")  # fmt: skip
    _one_line_error(run_cli("lab", "fault", "link", "a1", "cluster1", "down"), 2,
                    "host a1 is not on network cluster1")  # fmt: skip
    _one_line_error(run_cli("lab", "fault", "slow", "n1", "cluster1", "fast"), 2, "invalid rate")
    _one_line_error(run_cli("lab", "fault", "partition", "n1", "/", "n1"), 2, "in both groups")
    _one_line_error(run_cli("lab", "fault", "restart", "n1"), 5, "n1 is not crashed")
    _one_line_error(run_cli("lab", "fault", "thaw", "n1", "--role", "etcd"), 5, "not frozen")
    _one_line_error(run_cli("lab", "up", "--name", lab.name), 4, f"lab {lab.name!r} already exists")
    _one_line_error(run_cli("lab", "up", "--name", "Bad-Name"), 2, "invalid lab name")
    _one_line_error(run_cli("lab", "up", "--name", "x9", "--nodes", "9"), 2, "invalid node count 9")
    _one_line_error(run_cli("lab", "exec", "n7", "--", "true"), 2, "unknown host 'n7'")
    assert netns.namespaces_with_prefix("vmc-x9-") == []
    # The existing lab is untouched by the refused commands.
    assert all(p["alive"] for p in lab.status()["processes"])
    assert lab.status()["faults"] == []


def test_up_without_a_needed_tool_or_without_root(home: DataDir, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ip", "tc", "nft", "setsid", "etcdctl", "qemu-storage-daemon", "python3"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    name = _name()
    result = run_cli("lab", "up", "--name", name, env={"PATH": str(bin_dir)})
    _one_line_error(result, 6, "the lab needs etcd", "make setup")
    assert netns.namespaces_with_prefix(f"vmc-{name}-") == []
    assert not (home.root / "labs" / name).exists()

    nobody = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
         VMCLUSTER,
         "lab", "up", "--name", name],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "VMCLUSTER_HOME": str(tmp_path / "nobody-home")},
    )  # fmt: skip
    assert nobody.returncode == 6, nobody.stderr
    assert "needs root" in nobody.stderr
    assert netns.namespaces_with_prefix(f"vmc-{name}-") == []


def test_down_cleans_up_after_a_crashed_up(home: DataDir) -> None:
    name = _name()

    up = subprocess.Popen([VMCLUSTER, "lab", "up", "--name", name],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    the_lab = Lab(home, name)
    # Kill `lab up` as soon as it has started processes: a crash half-way through.
    for _ in range(500):
        if the_lab.exists() and any(p.pid for p in the_lab.load().processes):
            break
        subprocess.run(["sleep", "0.01"], check=True)
    up.kill()
    up.wait(timeout=30)
    pids = _tracked_pids(the_lab)
    assert netns.namespaces_with_prefix(f"vmc-{name}-")
    down = run_cli("lab", "down", "--name", name)
    assert down.code == 0, down.err
    _assert_gone(name, pids)
