"""GET /v1/paths and the ``storage`` of GET /v1/nodes/{node}: what each node published of its
forwarder's disks and paths (agent/paths.py), shown for every node."""

from pathlib import Path
from typing import Any

import pytest

from tests.api.test_api_input import Api, run
from vmcluster.clusterstate.keys import dumps

DISK = {
    "disk": "web.root", "generation": 4, "export": "web-root.g4", "state": "active",
    "policy": "failover", "socket": "/run/vmcluster/fwd/web.root.g4.nbd",
    "paths": [
        {"name": "storage-a", "address": "10.0.11.101:10809", "state": "down", "since": 100.0,
         "reason": "probe not answered within 50 ms", "in_flight": 0, "failures": 1},
        {"name": "storage-b", "address": "10.0.12.101:10809", "state": "up", "since": 90.0,
         "reason": "connected", "in_flight": 2, "failures": 0},
    ],
}  # fmt: skip


async def publish(a: Api, snapshot: dict[str, Any]) -> None:
    await a.store.put(a.agent.keys.node("n1", "paths"), dumps(snapshot),
                      lease=a.agent.quorum.lease_id)  # fmt: skip
    await a.synced()


def test_every_path_of_every_disk_is_a_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(a: Api) -> None:
        await publish(a, {"forwarder": "up", "reason": "", "disks": [DISK], "at": 101.0})
        answer = await a.request("GET", "/v1/paths")
        assert answer.status == 200
        assert answer.body == [
            {"node": "n1", "disk": "web.root", "generation": 4, "disk_state": "active",
             "policy": "failover", "path": "storage-a", "address": "10.0.11.101:10809",
             "state": "down", "since": 100.0, "reason": "probe not answered within 50 ms",
             "failures": 1},
            {"node": "n1", "disk": "web.root", "generation": 4, "disk_state": "active",
             "policy": "failover", "path": "storage-b", "address": "10.0.12.101:10809",
             "state": "up", "since": 90.0, "reason": "connected", "failures": 0},
        ]  # fmt: skip
        node = await a.request("GET", "/v1/nodes/n1")
        assert node.body["storage"]["forwarder"] == "up"
        assert node.body["storage"]["disks"] == [DISK]

    run(tmp_path, monkeypatch, scenario)


def test_a_node_that_published_nothing_shows_an_unknown_forwarder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(a: Api) -> None:
        assert (await a.request("GET", "/v1/paths")).body == []
        node = await a.request("GET", "/v1/nodes/n1")
        assert node.body["storage"] == {"forwarder": "unknown", "reason": "not published",
                                        "disks": []}  # fmt: skip
        await publish(a, {"forwarder": "down", "reason": "no socket", "disks": [], "at": 5.0})
        node = await a.request("GET", "/v1/nodes/n1")
        assert node.body["storage"]["forwarder"] == "down"
        assert node.body["storage"]["reason"] == "no socket"

    run(tmp_path, monkeypatch, scenario)


def test_paths_takes_no_query(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(a: Api) -> None:
        answer = await a.request("GET", "/v1/paths?node=n1")
        assert answer.status == 400, answer

    run(tmp_path, monkeypatch, scenario)
