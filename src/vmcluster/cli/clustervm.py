"""The cluster side of ``vmcluster vm``: clustered VMs through any node's agent."""

import re
import sys
import time
from typing import Any
from urllib.parse import quote

from vmcluster.api.client import ApiClient
from vmcluster.cli.common import data_dir, print_fields, print_json, print_table, stdout
from vmcluster.cli.target import api_client
from vmcluster.errors import InvalidInput, InvalidState, NotFound

POLL_S = 0.3


def _client(via: str | None) -> ApiClient:
    return api_client(data_dir(), via)


def _path(name: str, suffix: str = "") -> str:
    return f"/v1/vms/{quote(name, safe='')}{suffix}"


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


def _failback(value: str) -> dict[str, Any]:
    if value in ("never", "immediate"):
        return {"mode": value}
    match = re.fullmatch(r"(\d{1,2})-(\d{1,2})", value)
    if match is None or not all(0 <= int(h) <= 23 for h in match.groups()):
        raise InvalidInput(f"invalid --failback {value!r}: use never, immediate or HH-HH "
                           "(a window of UTC hours, e.g. 22-06)")  # fmt: skip
    return {"mode": "window", "start_hour": int(match[1]), "end_hour": int(match[2])}


def create(
    *, name: str, memory_mib: int, vcpus: int, disks: list[int | str], image: str,
    volume: str | None,
    probe_interval: int, priority: str, preferred: str, possible: str, anti_affinity: str,
    failback: str, array: str | None, start: bool, via: str | None, output: str,
) -> None:  # fmt: skip
    klass, _, hard = anti_affinity.partition(":")
    if hard not in ("", "hard", "soft"):
        raise InvalidInput(f"invalid --anti-affinity {anti_affinity!r}: use CLASS or CLASS:hard")
    policy = {"priority": priority, "preferred": _names(preferred),
              "possible": _names(possible), "anti_affinity": klass or None,
              "anti_affinity_hard": hard == "hard", "failback": _failback(failback)}  # fmt: skip
    body: dict[str, Any] = {"name": name, "memory_mib": memory_mib, "vcpus": vcpus,
                            "disks": disks, "image": image, "probe_interval_ms": probe_interval,
                            "policy": policy, "start": start}  # fmt: skip
    if array:
        body["array"] = array
    if volume:
        body["volume"] = volume
    created = _client(via).post("/v1/vms", body)
    if output == "json":
        print_json(created)
    else:
        stdout.print(f"created VM {name}{' (starting)' if start else ''}", markup=False)


def _wait_for(
    client: ApiClient,
    name: str,
    states: set[str],
    timeout: float,
    what: str,
    *,
    failed_before: int | None = None,
) -> dict[str, Any]:
    """Poll until the VM is in one of ``states``. ``failed_before``: the generation it had
    failed at before the request: an agent whose copy lags may still show that failure, which
    is no news (a failure at a later generation is)."""  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        vm: dict[str, Any] = client.get(_path(name))
        if vm["state"] in states:
            return vm
        if vm["state"] == "failed" and vm["generation"] != failed_before:
            raise InvalidState(f"VM {name} failed: {vm['reason']}")
        if time.monotonic() >= deadline:
            why = f": {vm['reason']}" if vm["reason"] else ""
            raise InvalidState(f"VM {name} is still {vm['state']} after {timeout:g} s "
                               f"(waiting for it to {what}){why}")  # fmt: skip
        time.sleep(POLL_S)


def start(name: str, *, wait: bool, timeout: float, via: str | None, output: str) -> None:
    client = _client(via)
    before: dict[str, Any] = client.get(_path(name)) if wait else {}
    client.post(_path(name, "/start"))
    if not wait:
        stdout.print(f"start of VM {name} requested", markup=False)
        return
    failed_before = before["generation"] if before.get("state") == "failed" else None
    vm = _wait_for(client, name, {"running"}, timeout, "run", failed_before=failed_before)
    if output == "json":
        print_json(vm)
    else:
        stdout.print(f"VM {name} running on {vm['owner']} (generation {vm['generation']})",
                     markup=False)  # fmt: skip


def stop(name: str, *, wait: bool, timeout: float, via: str | None) -> None:
    client = _client(via)
    client.post(_path(name, "/stop"))
    if not wait:
        stdout.print(f"stop of VM {name} requested", markup=False)
        return
    _wait_for(client, name, {"stopped"}, timeout, "stop")
    stdout.print(f"stopped VM {name}", markup=False)


def delete(name: str, *, via: str | None) -> None:
    _client(via).delete(_path(name))
    stdout.print(
        f"deleted VM {name} (its own LUNs deleted; disks of shared volumes kept)", markup=False
    )


def list_(*, via: str | None, output: str) -> None:
    vms = _client(via).get("/v1/vms")
    if output == "json":
        print_json(vms)
        return
    print_table(["NAME", "STATE", "OWNER", "GEN", "MEMORY", "PRIORITY", "REASON"],
                [(v["name"], v["state"], v["owner"] or "-", v["generation"],
                  f"{v['memory_mib']}M", v["policy"]["priority"], v["reason"])
                 for v in vms])  # fmt: skip


def show(name: str, *, via: str | None, output: str) -> None:
    vm = _client(via).get(_path(name))
    if output == "json":
        print_json(vm)
        return
    policy = vm["policy"]
    print_fields([
        ("name", vm["name"]), ("state", vm["state"]), ("owner", vm["owner"]),
        ("generation", vm["generation"]), ("reason", vm["reason"]), ("intent", vm["intent"]),
        ("vcpus", vm["vcpus"]), ("memory", f"{vm['memory_mib']} MiB"),
        ("disks", ", ".join(f"{d['name']} {d['size_bytes'] // (1 << 20)} MiB on "
                            + (f"volume {d['volume_disk']}" if d.get("volume_disk")
                               else f"{d['array']}/{d['lun']}")
                            for d in vm["disks"])),
        ("priority", policy["priority"]),
        ("preferred", ",".join(policy["preferred"]) or "-"),
        ("possible", ",".join(policy["possible"]) or "every node"),
        ("anti-affinity", (policy["anti_affinity"] or "-")
         + (" (hard)" if policy["anti_affinity_hard"] else "")),
        ("failovers (6 h)", len(vm["failovers"])),
    ])  # fmt: skip


def console(name: str, *, follow: bool, generation: int | None, node: str | None) -> None:
    client = _client(None)
    vm = client.get(_path(name))
    node = node or vm["owner"]
    if node is None:
        raise NotFound(f"VM {name} runs nowhere now: name the node and generation of an earlier "
                       "instance with --node and --generation")  # fmt: skip
    generation = vm["generation"] if generation is None else generation
    target = _client(node)
    shown = 0
    out = sys.stdout
    while True:
        data = target.get(_path(name, f"/console?generation={generation}&limit=1048576"))
        text: str = data["text"]
        if len(text) > shown:
            out.write(text[shown:])
            out.flush()
            shown = len(text)
        if not follow:
            return
        current = client.get(_path(name))
        if current["generation"] != generation or current["state"] not in ("starting", "running"):
            return
        time.sleep(0.5)
