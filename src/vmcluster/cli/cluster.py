"""``vmcluster cluster``, ``node`` and ``events``: the cluster, through its agents' API."""

import asyncio
import datetime
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from vmcluster.agent.config import Secrets
from vmcluster.api.client import ApiClient
from vmcluster.api.server import MAX_EVENTS_LIMIT
from vmcluster.cli.common import data_dir, output_option, print_fields, print_json, print_table
from vmcluster.cli.common import stdout as out
from vmcluster.cli.target import api_client
from vmcluster.clusterstate.etcd import EtcdStore
from vmcluster.clusterstate.keys import Keys, dumps
from vmcluster.core.model import check_name
from vmcluster.errors import AlreadyExists, InvalidInput, InvalidState

via_option = click.option("--via", metavar="NODE", help="Ask this node's agent (default: any).")


def _client(via: str | None) -> ApiClient:
    return api_client(data_dir(), via)


@click.group()
def cluster() -> None:
    """The cluster as a whole."""


@cluster.command()
@click.argument("name")
@click.option("--etcd", "endpoints", required=True, help="etcd endpoints, comma-separated.")
@click.option(
    "--secrets-file",
    default="/etc/vmcluster/secrets.json",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where to write the token and cluster key.",
)
@click.option("--networks", default="cluster1,cluster2", show_default=True,
              help="The cluster networks, comma-separated.")  # fmt: skip
def create(name: str, endpoints: str, secrets_file: Path, networks: str) -> None:
    """Create a cluster: its record in etcd and its secrets (API token, heartbeat key).

    Copy the secrets file (mode 600) to every node; then start an agent on each node.
    """
    check_name(name, what="cluster")
    nets = [check_name(n.strip(), what="network") for n in networks.split(",") if n.strip()]
    if secrets_file.exists():
        raise AlreadyExists(f"secrets file {secrets_file} already exists: remove it or choose "
                            "another --secrets-file")  # fmt: skip

    async def write() -> bool:
        store = EtcdStore([e.strip() for e in endpoints.split(",") if e.strip()])
        try:
            record = {
                "name": name,
                "networks": nets,
                "created_at": datetime.datetime.now().timestamp(),
            }
            return await store.create(Keys(name).cluster_record, dumps(record))
        finally:
            await store.close()

    if not asyncio.run(write()):
        raise AlreadyExists(f"cluster {name!r} already exists in that etcd")
    Secrets.generate().write(secrets_file)
    out.print(f"created cluster {name}; secrets in {secrets_file} (copy to every node, mode 600)",
              markup=False)  # fmt: skip


@cluster.command()
@via_option
@output_option
def status(via: str | None, output: str) -> None:
    """Quorum, leader, networks and node counts."""
    data = _client(via).get("/v1/cluster")
    if output == "json":
        print_json(data)
        return
    print_fields([
        ("cluster", data["name"]),
        ("answered by", data["served_by"]),
        ("quorum", "yes" if data["quorum"] else "NO (this node's view may be stale)"),
        ("leader", data["leader"]),
        ("nodes", ", ".join(f"{n} {s}" for s, n in data["nodes"].items())),
        ("networks", ", ".join(f"{k} {v}" for k, v in data["networks"].items())),
    ])  # fmt: skip


@click.group()
def node() -> None:
    """Cluster nodes."""


def _network_cell(networks: dict[str, str]) -> str:
    return " ".join(f"{net}:{state}" for net, state in sorted(networks.items()))


@node.command("list")
@via_option
@output_option
def list_(via: str | None, output: str) -> None:
    """Every node with its state, per-network state and the leader."""
    nodes = _client(via).get("/v1/nodes")
    if output == "json":
        print_json(nodes)
        return
    print_table(["NODE", "STATE", "LEADER", "NETWORKS"],
                [(n["name"], n["state"], "*" if n["leader"] else "", _network_cell(n["networks"]))
                 for n in nodes])  # fmt: skip


@node.command()
@click.argument("name")
@via_option
@output_option
def show(name: str, via: str | None, output: str) -> None:
    """One node in detail."""
    data = _client(via).get(f"/v1/nodes/{quote(name, safe='')}")
    if output == "json":
        print_json(data)
        return
    print_fields([
        ("node", data["name"]), ("state", data["state"]), ("leader", data["leader"]),
        ("paused", data["paused"]), ("site", data["site"]),
        ("networks", _network_cell(data["networks"])),
        ("addresses", " ".join(f"{k}={v}" for k, v in sorted(data["addresses"].items()))),
        ("forwarder", _forwarder_cell(data.get("storage", {}))),
    ])  # fmt: skip
    disks = data.get("storage", {}).get("disks", [])
    if disks:
        out.print("")
        print_table(["DISK", "GEN", "STATE", "PATHS"],
                    [(d["disk"], str(d["generation"]), d["state"],
                      " ".join(f"{p['name']}={p['state']}" for p in d.get("paths", [])))
                     for d in disks])  # fmt: skip


def _forwarder_cell(storage: dict[str, Any]) -> str:
    state = storage.get("forwarder", "unknown")
    reason = storage.get("reason")
    return f"{state} ({reason})" if reason and state != "up" else str(state)


@node.command()
@click.argument("name")
@via_option
def pause(name: str, via: str | None) -> None:
    """Pause a node (it stays a member; later: no VMs are placed on it)."""
    _client(via).post(f"/v1/nodes/{quote(name, safe='')}/pause")
    out.print(f"node {name} paused", markup=False)


@node.command()
@click.argument("name")
@click.option("--failback", is_flag=True,
              help="Move back the VMs that prefer this node (for the next minute).")  # fmt: skip
@via_option
def resume(name: str, failback: bool, via: str | None) -> None:
    """Resume a paused or drained node."""
    suffix = "?failback=true" if failback else ""
    _client(via).post(f"/v1/nodes/{quote(name, safe='')}/resume{suffix}")
    out.print(f"node {name} resumed{', failing back its VMs' if failback else ''}", markup=False)


@node.command()
@click.argument("name")
@click.option("--wait", is_flag=True, help="Wait until no VM runs on the node.")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to wait with --wait.")  # fmt: skip
@via_option
def drain(name: str, wait: bool, timeout: float, via: str | None) -> None:
    """Pause a node and move its VMs to other nodes (stop, then start elsewhere)."""
    client = _client(via)
    client.post(f"/v1/nodes/{quote(name, safe='')}/drain")
    out.print(f"node {name} paused; draining", markup=False)
    if not wait:
        return
    deadline = time.monotonic() + timeout
    while True:
        # Its VMs are stopped there first, then started elsewhere: wait until each has left
        # and none of those that should run is still between the two.
        between = ("stopping", "stopped", "starting")
        left = [v["name"] for v in client.get("/v1/vms") if v["owner"] == name
                or (v["intent"] == "running" and v["state"] in between)]  # fmt: skip
        if not left:
            out.print(f"node {name} drained", markup=False)
            return
        if time.monotonic() >= deadline:
            raise InvalidState(f"node {name} still holds {', '.join(left)} after {timeout:g} s "
                               "(vmcluster vm list shows why)")  # fmt: skip
        time.sleep(0.5)


@cluster.group()
def ha() -> None:
    """Automatic HA actions: arm (the default) or disarm (freeze) them."""


@ha.command()
@via_option
def arm(via: str | None) -> None:
    """Resume automatic failover, restart and placement."""
    _client(via).post("/v1/ha/arm")
    out.print("HA armed: automatic actions resume", markup=False)


@ha.command()
@via_option
def disarm(via: str | None) -> None:
    """Freeze automatic actions (no failover, restart or start of pending VMs)."""
    _client(via).post("/v1/ha/disarm")
    out.print("HA disarmed: nothing moves automatically until 'vmcluster cluster ha arm'",
              markup=False)  # fmt: skip


@ha.command("status")
@via_option
@output_option
def ha_status(via: str | None, output: str) -> None:
    """Whether HA is armed, and the HA settings in force."""
    data = _client(via).get("/v1/ha")
    if output == "json":
        print_json(data)
        return
    threshold = data["failover_threshold"]
    print_fields([
        ("HA", "armed" if data["armed"] else "DISARMED (nothing moves automatically)"),
        ("failover on isolation", "yes" if data["failover_on_isolation"] else
         "no (waits for the lease: Down)"),
        ("restart in place", f"{data['restart_limit']} per "
                             f"{data['restart_period_s'] / 3600:g} h"),
        ("failover threshold", f"{'nodes - 1' if threshold is None else threshold} per "
                               f"{data['failover_period_s'] / 3600:g} h"),
    ])  # fmt: skip


@ha.command("set")
@click.option(
    "--failover-on-isolation/--no-failover-on-isolation",
    default=None,
    help="Fail over as soon as the owner is Isolated (default), or wait until Down.",
)
@click.option("--restart-limit", type=int, help="Restarts in place after QEMU crashes, per period.")
@click.option("--restart-period", type=float, metavar="HOURS", help="Period of the restart limit.")
@click.option(
    "--failover-threshold",
    metavar="N|default",
    help="Failovers per period before a VM is failed (default: nodes - 1).",
)
@click.option(
    "--failover-period", type=float, metavar="HOURS", help="Period of the failover threshold."
)
@via_option
def ha_set(
    failover_on_isolation: bool | None, restart_limit: int | None, restart_period: float | None,
    failover_threshold: str | None, failover_period: float | None, via: str | None,
) -> None:  # fmt: skip
    """Change the cluster's HA settings (the others keep their values)."""
    body: dict[str, Any] = {}
    if failover_on_isolation is not None:
        body["failover_on_isolation"] = failover_on_isolation
    if restart_limit is not None:
        body["restart_limit"] = restart_limit
    if restart_period is not None:
        body["restart_period_s"] = restart_period * 3600
    if failover_threshold is not None:
        if failover_threshold == "default":
            body["failover_threshold"] = None
        elif failover_threshold.isdigit():
            body["failover_threshold"] = int(failover_threshold)
        else:
            raise InvalidInput(f"invalid --failover-threshold {failover_threshold!r}: "
                               "use a whole number or 'default'")  # fmt: skip
    if failover_period is not None:
        body["failover_period_s"] = failover_period * 3600
    if not body:
        raise InvalidInput("nothing to change: give at least one setting (see --help)")
    _client(via).post("/v1/ha/settings", body)
    out.print("HA settings changed: " + ", ".join(f"{k}={v}" for k, v in body.items()),
              markup=False)  # fmt: skip


def _event_line(e: dict[str, Any]) -> str:
    when = datetime.datetime.fromtimestamp(e["time"]).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return f"{when}  {e['kind']:<20} {e['subject']:<10} {e['reason']}"


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events.")
@click.option("--limit", default=50, show_default=True,
              type=click.IntRange(min=0, max=MAX_EVENTS_LIMIT),
              help="How many of the newest events to show first.")  # fmt: skip
@via_option
@output_option
def events(follow: bool, limit: int, via: str | None, output: str) -> None:
    """Cluster events: node up/down, networks, leader, quorum."""
    client = _client(via)
    if not follow:
        data = client.get(f"/v1/events?limit={limit}")
        if output == "json":
            print_json(data)
        else:
            for e in data:
                out.print(_event_line(e), markup=False)
        return

    async def stream() -> None:
        async for e in client.stream_lines(f"/v1/events?follow=true&limit={limit}"):
            line = json.dumps(e) if output == "json" else _event_line(e)
            click.echo(line)

    asyncio.run(stream())
