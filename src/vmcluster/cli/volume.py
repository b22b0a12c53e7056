"""``vmcluster volume`` and ``vmcluster disk``: shared volumes and the disks in them.

Disk operations go through the volume's coordinator, whichever agent is asked; an operation
that runs long (a copy) is followed until it is done."""

import time
from typing import Any

import click

from vmcluster.api.client import ApiClient
from vmcluster.cli.cluster import via_option
from vmcluster.cli.common import (
    data_dir,
    output_option,
    print_fields,
    print_json,
    print_table,
    stdout,
)
from vmcluster.cli.target import api_client
from vmcluster.core.units import format_size, parse_size
from vmcluster.errors import InvalidInput

FOLLOW_LIMIT_S = 3600.0  # how long a CLI follows one operation before it gives up waiting


def _size(value: int) -> str:
    return format_size(value) if value else "0"


def _split(path: str) -> tuple[str, str]:
    if path.count("/") != 1 or not all(path.split("/")):
        raise InvalidInput(f"invalid disk {path!r}: give it as VOLUME/DISK")
    volume, disk = path.split("/")
    return volume, disk


def _follow(client: ApiClient, answer: dict[str, Any]) -> dict[str, Any]:
    """The outcome of an operation answered ``running``: asked again until it is done."""
    deadline = time.monotonic() + FOLLOW_LIMIT_S
    while answer.get("state") == "running" and time.monotonic() < deadline:
        answer = client.get(f"/v1/volumes/{answer['volume']}/ops/{answer['id']}")
    return answer


@click.group()
def volume() -> None:
    """Shared volumes: a share of an array that every node uses at once, each with a
    coordinator node that carries out its disks' metadata operations."""


VOLUME_HEADERS = ["NAME", "ARRAY", "SIZE", "USED", "FREE", "DISKS", "COORDINATOR", "OPS"]


def _volume_row(v: dict[str, Any]) -> tuple[object, ...]:
    return (v["name"], v["array"], _size(v["size_bytes"]), _size(v["used_bytes"]),
            _size(v["free_bytes"]), v["disks"], v["coordinator"] or "(none)",
            v["operations"])  # fmt: skip


@volume.command("create")
@click.argument("name")
@click.option("--array", "array_name", required=True, metavar="ARRAY", help="The array it is on.")
@click.option("--size", required=True, metavar="SIZE", help="Its capacity (e.g. 10G).")
@via_option
@output_option
def create(name: str, array_name: str, size: str, via: str | None, output: str) -> None:
    """Create a shared volume on an array; the leader gives it a coordinator."""
    body = {"name": name, "array": array_name, "size_bytes": parse_size(size, what="volume size")}
    made = api_client(data_dir(), via).post("/v1/volumes", body)
    if output == "json":
        print_json(made)
        return
    stdout.print(
        f"volume {name} created on array {array_name} ({_size(made['size_bytes'])})", markup=False
    )


@volume.command("list")
@via_option
@output_option
def list_(via: str | None, output: str) -> None:
    """Every shared volume: its array, size, use and coordinator."""
    volumes = api_client(data_dir(), via).get("/v1/volumes")
    if output == "json":
        print_json(volumes)
        return
    print_table(VOLUME_HEADERS, [_volume_row(v) for v in volumes])


@volume.command("show")
@click.argument("name")
@via_option
@output_option
def show(name: str, via: str | None, output: str) -> None:
    """One volume: its coordinator, each node's access (direct, redirected, no-access) and its
    disks."""
    v = api_client(data_dir(), via).get(f"/v1/volumes/{name}")
    if output == "json":
        print_json(v)
        return
    print_fields([("Name", v["name"]), ("Array", v["array"]), ("Size", _size(v["size_bytes"])),
                  ("Used", _size(v["used_bytes"])), ("Free", _size(v["free_bytes"])),
                  ("Coordinator", f"{v['coordinator']} (term {v['term']})"
                   if v["coordinator"] else "(none)"),
                  ("Operations", v["operations"])])  # fmt: skip
    stdout.print()
    print_table(["NODE", "STATE", "ACCESS", "DISKS", "PATHS"],
                [(n, m["state"], m["mode"], m["disks"],
                  " ".join(f"{p['name']}:{p['state']}" for p in m["paths"]))
                 for n, m in v["nodes"].items()])  # fmt: skip
    if v["disk_list"]:
        stdout.print()
        print_table(DISK_HEADERS, [_disk_row(d) for d in v["disk_list"]])


@volume.command("move")
@click.argument("name")
@click.option("--coordinator", "node", required=True, metavar="NODE",
              help="The node that is to coordinate it.")  # fmt: skip
@via_option
def move(name: str, node: str, via: str | None) -> None:
    """Move a volume's coordinator to another node (one that reaches its array)."""
    moved = api_client(data_dir(), via).post(f"/v1/volumes/{name}/move", {"coordinator": node})
    stdout.print(
        f"volume {name}: coordinator {moved['coordinator']} (term {moved['term']})", markup=False
    )


@volume.command("delete")
@click.argument("name")
@via_option
def delete(name: str, via: str | None) -> None:
    """Delete a volume that holds no disk."""
    api_client(data_dir(), via).delete(f"/v1/volumes/{name}")
    stdout.print(f"volume {name} deleted", markup=False)


# ----- disks -----


@click.group()
def disk() -> None:
    """Disks in shared volumes (VOLUME/DISK): create, grow, snapshot, clone, delete."""


DISK_HEADERS = ["DISK", "KIND", "SIZE", "SOURCE", "ATTACHED TO"]


def _disk_row(d: dict[str, Any]) -> tuple[object, ...]:
    kind = d["kind"] + (" (deleting)" if d.get("deleting") else "")
    return (d["path"], kind, _size(d["size_bytes"]), d["source"], d["attached_to"])


def _done(client: ApiClient, answer: dict[str, Any], output: str, sentence: str) -> None:
    answer = _follow(client, answer)
    if output == "json":
        print_json(answer)
        return
    if answer.get("state") == "running":
        stdout.print(f"{sentence}: still running (operation {answer['id']})", markup=False)
        return
    stdout.print(sentence, markup=False)


@disk.command("create")
@click.argument("path", metavar="VOLUME/DISK")
@click.option("--size", required=True, metavar="SIZE", help="Its size (e.g. 4G).")
@via_option
@output_option
def disk_create(path: str, size: str, via: str | None, output: str) -> None:
    """Create an empty disk in a volume."""
    volume_name, name = _split(path)
    client = api_client(data_dir(), via)
    body = {"name": name, "size_bytes": parse_size(size, what="disk size")}
    answer = client.post(f"/v1/volumes/{volume_name}/disks", body)
    _done(client, answer, output, f"disk {path} created ({size})")


@disk.command("list")
@click.option("--volume", "volume_name", metavar="VOLUME", help="Only this volume's disks.")
@via_option
@output_option
def disk_list(volume_name: str | None, via: str | None, output: str) -> None:
    """The disks and snapshots of every volume, with the VM each is attached to."""
    query = f"?volume={volume_name}" if volume_name is not None else ""
    disks = api_client(data_dir(), via).get(f"/v1/disks{query}")
    if output == "json":
        print_json(disks)
        return
    print_table(DISK_HEADERS, [_disk_row(d) for d in disks])


@disk.command("resize")
@click.argument("path", metavar="VOLUME/DISK")
@click.option("--size", required=True, metavar="SIZE", help="The new, larger size.")
@via_option
@output_option
def disk_resize(path: str, size: str, via: str | None, output: str) -> None:
    """Grow a disk, also while its VM runs (the guest is told); a disk never shrinks."""
    volume_name, name = _split(path)
    client = api_client(data_dir(), via)
    answer = client.post(f"/v1/volumes/{volume_name}/disks/{name}/resize",
                         {"size_bytes": parse_size(size, what="disk size")})  # fmt: skip
    _done(client, answer, output, f"disk {path} grown to {size}")


@disk.command("snapshot")
@click.argument("path", metavar="VOLUME/DISK")
@click.argument("snapshot_name", metavar="SNAPSHOT")
@via_option
@output_option
def disk_snapshot(path: str, snapshot_name: str, via: str | None, output: str) -> None:
    """A read-only copy of a disk as it is now (consistent while its VM writes), in the same
    volume."""
    volume_name, name = _split(path)
    client = api_client(data_dir(), via)
    answer = client.post(f"/v1/volumes/{volume_name}/disks/{name}/snapshot",
                         {"name": snapshot_name})  # fmt: skip
    _done(client, answer, output, f"snapshot {volume_name}/{snapshot_name} made of {path}")


@disk.command("clone")
@click.argument("path", metavar="VOLUME/SOURCE")
@click.argument("target", metavar="VOLUME/NEW")
@via_option
@output_option
def disk_clone(path: str, target: str, via: str | None, output: str) -> None:
    """A new disk with the data of a disk or a snapshot, in the same volume."""
    volume_name, name = _split(path)
    target_volume, new = _split(target)
    if target_volume != volume_name:
        raise InvalidInput(f"clone {target}: a clone is made in its source's volume "
                           f"({volume_name})")  # fmt: skip
    client = api_client(data_dir(), via)
    answer = client.post(f"/v1/volumes/{volume_name}/disks/{name}/clone", {"name": new})
    _done(client, answer, output, f"disk {target} cloned from {path}")


@disk.command("delete")
@click.argument("path", metavar="VOLUME/DISK")
@via_option
def disk_delete(path: str, via: str | None) -> None:
    """Delete a disk or snapshot that no VM uses (its data is gone)."""
    volume_name, name = _split(path)
    api_client(data_dir(), via).delete(f"/v1/volumes/{volume_name}/disks/{name}")
    stdout.print(f"disk {path} deleted", markup=False)
