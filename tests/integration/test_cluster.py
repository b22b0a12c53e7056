"""The cluster in a lab: agents, heartbeats over both cluster networks, quorum, one leader, the
REST API with its token, events. Real etcd, real namespaces, real faults."""

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tests.support import VMCLUSTER, run_cli

from vmcluster.lab.lab import Lab
from vmcluster.paths import DataDir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

# Generous bounds, only so that nothing hangs; bench/detection measures the real figures.
CONVERGE_S = 20.0


def _nodes(via: str | None = None) -> dict[str, dict[str, Any]]:
    args = ["node", "list", "-o", "json"] + (["--via", via] if via else [])
    result = run_cli(*args)
    assert result.code == 0, result.err
    listed = result.json()
    assert isinstance(listed, list)
    return {n["name"]: n for n in listed}


def _until(check: Callable[[], bool], timeout_s: float = CONVERGE_S) -> float:
    """Poll until ``check`` holds; returns the seconds it took. Fails after ``timeout_s``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if check():
                return time.monotonic() - started
        except AssertionError:
            pass
        time.sleep(0.2)
    assert check(), f"condition not reached within {timeout_s} s"
    return time.monotonic() - started


def _leaders(nodes: dict[str, dict[str, Any]]) -> list[str]:
    return [name for name, n in nodes.items() if n["leader"]]


def _lab(home: DataDir, *args: str) -> Iterator[Lab]:
    name = "c" + uuid.uuid4().hex[:6]
    up = run_cli("lab", "up", "--name", name, *args)
    assert up.code == 0, up.err
    try:
        yield Lab(home, name)
    finally:
        down = run_cli("lab", "down", "--name", name)
        assert down.code == 0, down.err


@pytest.fixture
def lab(home: DataDir) -> Iterator[Lab]:
    yield from _lab(home, "--arrays", "0")


def test_after_lab_up_every_node_is_up_with_one_leader(lab: Lab) -> None:
    for via in ("n1", "n2", "n3"):
        nodes = _nodes(via)
        assert set(nodes) == {"n1", "n2", "n3"}
        for node in nodes.values():
            assert node["state"] == "up"
            assert node["networks"] == {"cluster1": "up", "cluster2": "up"}
        assert len(_leaders(nodes)) == 1
    status = run_cli("cluster", "status", "-o", "json").json()
    assert isinstance(status, dict)
    assert status["quorum"] is True
    assert status["nodes"] == {"up": 3}
    table = run_cli("node", "list")
    assert table.code == 0
    assert "cluster1:up" in table.out


def test_crashing_the_leader_marks_it_down_and_moves_the_leadership(lab: Lab) -> None:
    (leader,) = _leaders(_nodes())
    survivor = next(n for n in ("n1", "n2", "n3") if n != leader)
    assert run_cli("lab", "fault", "crash", leader).code == 0

    def converged() -> bool:
        nodes = _nodes(survivor)
        leaders = _leaders(nodes)
        return nodes[leader]["state"] == "down" and len(leaders) == 1 and leaders[0] != leader

    _until(converged)
    nodes = _nodes(survivor)
    assert [n for n, v in nodes.items() if v["state"] == "up"] == sorted(
        n for n in ("n1", "n2", "n3") if n != leader
    )

    def events() -> list[tuple[str, str]]:
        listed = run_cli("events", "--via", survivor, "-o", "json").json()
        assert isinstance(listed, list)
        return [(e["kind"], e["subject"]) for e in listed]

    _until(lambda: ("node.down", leader) in events())
    assert any(kind == "leader.changed" and subject != leader for kind, subject in events())

    assert run_cli("lab", "fault", "restart", leader).code == 0
    _until(lambda: _nodes(survivor)[leader]["state"] == "up")


def test_a_lost_cluster_network_partitions_it_for_that_node_only(lab: Lab) -> None:
    assert run_cli("lab", "fault", "link", "n1", "cluster1", "down").code == 0

    def partitioned() -> bool:
        nodes = _nodes("n2")
        return (nodes["n1"]["networks"] == {"cluster1": "partitioned", "cluster2": "up"}
                and nodes["n2"]["networks"]["cluster1"] == "up")  # fmt: skip

    _until(partitioned)
    for via in ("n1", "n2", "n3"):
        nodes = _nodes(via)
        assert nodes["n1"]["state"] == "up", f"n1 stays up through cluster2 (seen from {via})"
        assert nodes["n3"]["networks"] == {"cluster1": "up", "cluster2": "up"}
    status = run_cli("cluster", "status", "--via", "n1", "-o", "json").json()
    assert isinstance(status, dict)
    assert status["quorum"] is True
    assert run_cli("lab", "fault", "link", "n1", "cluster1", "up").code == 0
    _until(lambda: _nodes("n2")["n1"]["networks"]["cluster1"] == "up")


def test_the_minority_side_of_a_partition_has_no_quorum(lab: Lab) -> None:
    assert run_cli("lab", "fault", "partition", "n1", "/", "n2", "n3").code == 0
    _until(lambda: _nodes("n1")["n1"]["state"] == "no-quorum")
    status = run_cli("cluster", "status", "--via", "n1", "-o", "json").json()
    assert isinstance(status, dict)
    assert status["quorum"] is False

    def majority_works() -> bool:
        nodes = _nodes("n2")
        leaders = _leaders(nodes)
        states = {name: node["state"] for name, node in nodes.items()}
        up_leader = len(leaders) == 1 and leaders[0] != "n1"
        return states == {"n1": "down", "n2": "up", "n3": "up"} and up_leader

    _until(majority_works)
    # The minority changes nothing: a write through n1 is refused.
    refused = run_cli("node", "pause", "n3", "--via", "n1")
    assert refused.code != 0
    assert "no quorum" in refused.err
    # The majority can change things.
    assert run_cli("node", "pause", "n3", "--via", "n2").code == 0
    assert run_cli("node", "resume", "n3", "--via", "n2").code == 0

    assert run_cli("lab", "fault", "heal").code == 0
    _until(lambda: {n["state"] for n in _nodes("n1").values()} == {"up"})


def test_pause_and_resume_a_node(lab: Lab) -> None:
    paused = run_cli("node", "pause", "n2")
    assert paused.code == 0, paused.err
    _until(lambda: _nodes("n3")["n2"]["state"] == "paused")
    shown = run_cli("node", "show", "n2", "-o", "json").json()
    assert isinstance(shown, dict)
    assert shown["paused"] is True
    assert run_cli("node", "resume", "n2").code == 0
    _until(lambda: _nodes("n3")["n2"]["state"] == "up")
    kinds = [e["kind"] for e in run_cli("events", "-o", "json").json()]  # type: ignore[union-attr]
    assert "node.paused" in kinds
    assert "node.resumed" in kinds
    unknown = run_cli("node", "show", "n9")
    assert unknown.code == 3
    assert "node 'n9' is not a member" in unknown.err


def test_events_follow_streams_new_events(lab: Lab) -> None:
    with subprocess.Popen([VMCLUSTER, "events", "--follow", "--limit", "0", "-o", "json"],
                          stdout=subprocess.PIPE, text=True) as follower:  # fmt: skip
        try:
            time.sleep(1.0)
            assert run_cli("node", "pause", "n3").code == 0
            assert follower.stdout is not None
            streamed = json.loads(follower.stdout.readline())
            assert streamed["kind"] == "node.paused"
            assert streamed["subject"] == "n3"
        finally:
            follower.kill()


def test_the_api_refuses_requests_without_the_token(lab: Lab) -> None:
    info = json.loads((lab.dir / "cli.json").read_text())
    socket_path = info["api"]["n1"].removeprefix("unix://")

    def get(path: str, token: str | None) -> tuple[int, Any]:
        headers = ["-H", f"Authorization: Bearer {token}"] if token else []
        out = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket",
                              socket_path, *headers, f"http://agent{path}"],
                             capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
        body, _, code = out.stdout.rpartition("\n")
        return int(code), json.loads(body)

    token = json.loads((lab.dir / "secrets.json").read_text())["token"]
    assert get("/v1/nodes", None)[0] == 401
    code, body = get("/v1/nodes", "wrong-token")
    assert code == 401
    assert body == {"error": "missing or invalid bearer token"}
    assert get("/v1/nodes", token)[0] == 200
    code, doc = get("/openapi.json", None)
    assert code == 200
    assert doc["openapi"].startswith("3.")
    assert "/v1/nodes" in doc["paths"]
    # Over the cluster network too (TCP), from another host of the lab.
    result = subprocess.run(["ip", "netns", "exec", lab.plan().host("n2").namespace, "curl", "-s",
                             "-o", "/dev/null", "-w", "%{http_code}",
                             "http://10.77.1.11:7480/v1/cluster"],
                            capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
    assert result.stdout == "401"


def test_cli_names_the_addresses_it_tried_when_no_agent_answers(home: DataDir) -> None:
    secrets = home.root / "secrets.json"
    secrets.write_text(json.dumps({"token": "t" * 32, "cluster_key": "00" * 32}))
    secrets.chmod(0o600)
    result = run_cli("node", "list", env={"VMCLUSTER_API": "unix:///nonexistent/api.sock",
                                          "VMCLUSTER_SECRETS": str(secrets)})  # fmt: skip
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1
    assert "unix:///nonexistent/api.sock" in lines[0]


def test_two_nodes_and_a_witness_survive_the_loss_of_one_node(home: DataDir) -> None:
    for lab in _lab(home, "--nodes", "2", "--arrays", "0", "--witness"):
        nodes = _nodes()
        assert set(nodes) == {"n1", "n2"}
        assert {n["state"] for n in nodes.values()} == {"up"}
        assert run_cli("lab", "fault", "crash", "n1").code == 0

        def survived() -> bool:
            view = _nodes("n2")
            return view["n1"]["state"] == "down" and view["n2"]["state"] == "up" \
                and _leaders(view) == ["n2"]  # fmt: skip

        _until(survived)
        status = run_cli("cluster", "status", "--via", "n2", "-o", "json").json()
        assert isinstance(status, dict)
        assert status["quorum"] is True
        del lab
