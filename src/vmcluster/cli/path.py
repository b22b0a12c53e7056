"""``vmcluster path``: the storage paths of every node's attached disks (its block forwarder)."""

import datetime
import time
from typing import Any

import click

from vmcluster.cli.cluster import via_option
from vmcluster.cli.common import data_dir, output_option, print_json, print_table
from vmcluster.cli.target import api_client
from vmcluster.errors import InvalidInput


@click.group()
def path() -> None:
    """Storage paths: each node's connections to the arrays, per attached disk."""


def _since(at: float | None) -> str:
    if not at:
        return ""
    seconds = max(0.0, time.time() - at)
    when = datetime.datetime.fromtimestamp(at).strftime("%H:%M:%S")
    return f"{when} ({seconds:.0f}s ago)" if seconds < 3600 else when


def path_rows(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [(r["node"], str(r["disk"]), str(r["generation"]), str(r["path"]), str(r["state"]),
             str(r["disk_state"]), str(r["address"]), _since(r.get("since")),
             str(r.get("reason") or "")) for r in rows]  # fmt: skip


PATH_HEADERS = ["NODE", "DISK", "GEN", "PATH", "STATE", "DISK STATE", "ADDRESS", "SINCE", "REASON"]


@path.command("list")
@click.option("--node", "node_name", metavar="NODE", help="Only this node's paths.")
@via_option
@output_option
def list_(node_name: str | None, via: str | None, output: str) -> None:
    """Every path of every attached disk: its state (up, standby, down, connecting), since when
    and why; the disk's state (active, waiting: no path, fenced)."""
    client = api_client(data_dir(), via)
    rows = client.get("/v1/paths")
    if node_name is not None:
        nodes = {n["name"] for n in client.get("/v1/nodes")}
        if node_name not in nodes:
            raise InvalidInput(f"node {node_name!r} is not a member of the cluster")
        rows = [r for r in rows if r["node"] == node_name]
    if output == "json":
        print_json(rows)
        return
    print_table(PATH_HEADERS, path_rows(rows))
