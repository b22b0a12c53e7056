"""Helpers for the Store conformance suite: starting the session's etcd, and :class:`Backend`, the
handle a test gets from the ``backend`` fixture (see conftest.py).

A scenario is an async function ``scenario(store, prefix)``; ``backend.run(scenario)`` runs it with
``asyncio.run`` on a fresh store under a timeout, then closes the store. Every key a scenario uses
must be under ``prefix`` (unique per test), which isolates tests that share the one etcd.
"""

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmcluster.clusterstate.etcd import EtcdStore
from vmcluster.clusterstate.fake import FakeStore
from vmcluster.clusterstate.store import Store

ETCD = "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"
SCENARIO_TIMEOUT_S = 30.0
ETCD_START_TIMEOUT_S = 20.0

Scenario = Callable[[Store, str], Awaitable[None]]


async def settle_grpc() -> None:
    """Let gRPC deliver the completions of the calls a closed client cancelled while this event
    loop still runs (otherwise gRPC's poller hands them to the closed loop later, which logs
    "Event loop is closed" errors during the next test)."""
    await asyncio.sleep(0.1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class EtcdServer:
    endpoint: str  # http://127.0.0.1:PORT
    pid: int

    def etcdctl(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [ETCDCTL, f"--endpoints={self.endpoint}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "ETCDCTL_API": "3"},
            check=False,
        )


def start_etcd(base: Path) -> tuple[subprocess.Popen[bytes], EtcdServer, Path]:
    client_port, peer_port = free_port(), free_port()
    data_dir = base / "data"
    log_path = base / "etcd.log"
    client_url = f"http://127.0.0.1:{client_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [ETCD, "--name", "conformance", "--data-dir", str(data_dir),
             "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"conformance={peer_url}", "--initial-cluster-state", "new",
             "--log-level", "warn", "--logger", "zap"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = EtcdServer(endpoint=client_url, pid=proc.pid)
    deadline = time.monotonic() + ETCD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            if server.etcdctl("endpoint", "health", "--command-timeout=2s").returncode == 0:
                return proc, server, data_dir
        time.sleep(0.2)
    stop_etcd(proc)
    shutil.rmtree(data_dir, ignore_errors=True)
    raise RuntimeError(f"etcd did not become healthy:\n{log_path.read_text(errors='replace')}")


def stop_etcd(proc: subprocess.Popen[bytes]) -> None:
    """Stop the etcd this fixture started (signals go to its PID only) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass
class Backend:
    """One Store implementation, as the conformance scenarios see it."""

    kind: str  # "fake" or "etcd"
    prefix: str  # unique per test: /t/<uuid>/
    request: pytest.FixtureRequest
    etcd: EtcdServer | None = None

    def new_store(self) -> Store:
        """A fresh store (call it inside the running loop)."""
        if self.kind == "fake":
            return FakeStore()
        assert self.etcd is not None
        return EtcdStore([self.etcd.endpoint])

    def run(self, scenario: Scenario, *, timeout: float = SCENARIO_TIMEOUT_S) -> None:
        """Run ``scenario(store, prefix)`` in a new event loop, then close the store."""

        async def main() -> None:
            async with asyncio.timeout(timeout):
                store = self.new_store()
                try:
                    await scenario(store, self.prefix)
                finally:
                    await store.close()
                    await settle_grpc()

        asyncio.run(main())

    async def compact(self, store: Store, revision: int) -> None:
        """Compact the history before ``revision`` (as an operator would)."""
        if self.kind == "fake":
            assert isinstance(store, FakeStore)
            store.compact(revision)
            return
        assert self.etcd is not None
        done = await asyncio.to_thread(self.etcd.etcdctl, "compact", str(revision))
        assert done.returncode == 0, done.stderr

    def known_bug(self, kind: str, reason: str) -> None:
        """Mark this test as an expected (strict) failure on implementation ``kind`` only."""
        if self.kind == kind:
            self.request.applymarker(pytest.mark.xfail(strict=True, reason=f"bug: {reason}"))
