"""Thin wrappers around iproute2, tc and nft for the lab. Every call names its namespace."""

import json
import subprocess
from pathlib import Path
from typing import Any

from vmcluster.errors import VmclusterError
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

NETNS_DIR = Path("/run/netns")


class NetworkSetupError(VmclusterError):
    """An ip/tc/nft command failed while building or changing the lab's network."""


def run(argv: list[str], *, input_text: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        argv, input=input_text, capture_output=True, text=True, check=False, timeout=60
    )
    if check and proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise NetworkSetupError(f"{' '.join(argv)}: {detail}")
    log.debug(event("lab.cmd", argv=" ".join(argv), rc=proc.returncode))
    return proc.stdout


def ip(namespace: str | None, *args: str, check: bool = True) -> str:
    prefix = ["ip"] if namespace is None else ["ip", "-n", namespace]
    return run([*prefix, *args], check=check)


def exists(namespace: str) -> bool:
    return (NETNS_DIR / namespace).exists()


def namespaces_with_prefix(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def add(namespace: str) -> None:
    run(["ip", "netns", "add", namespace])
    ip(namespace, "link", "set", "lo", "up")


def delete(namespace: str) -> None:
    if exists(namespace):
        run(["ip", "netns", "delete", namespace])


def pids(namespace: str) -> list[int]:
    """Every process whose network namespace is ``namespace``."""
    if not exists(namespace):
        return []
    out = run(["ip", "netns", "pids", namespace], check=False)
    return [int(word) for word in out.split() if word.isdigit()]


def links(namespace: str) -> list[dict[str, Any]]:
    data = json.loads(ip(namespace, "-j", "link", "show") or "[]")
    return list(data)


def set_link(namespace: str, ifname: str, up: bool) -> None:
    ip(namespace, "link", "set", ifname, "up" if up else "down")


def nft(namespace: str, script: str) -> None:
    run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], input_text=script)


def tc(namespace: str, *args: str, check: bool = True) -> str:
    return run(["tc", "-n", namespace, *args], check=check)
