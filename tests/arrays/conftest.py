"""A real qemu-storage-daemon for array tests, and an NBD client that holds its connection."""

import contextlib
import os
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmcluster.arrays.qsd import QsdArray


@dataclass
class Daemon:
    array: QsdArray
    port: int
    argv: list[str]
    proc: subprocess.Popen[bytes]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_daemon(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    run_dir = Path(tempfile.mkdtemp(prefix="vmc-qsd-"))  # short: unix socket paths are limited
    qmp = run_dir / "qmp.sock"
    port = _free_port()
    argv = ["qemu-storage-daemon", "--chardev", f"socket,id=qmp,path={qmp},server=on,wait=off",
            "--monitor", "chardev=qmp",
            "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}"]  # fmt: skip
    holder = Daemon(array=QsdArray(name="a1", qmp_socket=qmp, directory=tmp_path / "a1"),
                    port=port, argv=argv, proc=start_daemon(argv))  # fmt: skip
    try:
        yield holder
    finally:
        holder.proc.kill()
        holder.proc.wait(timeout=10)
        shutil.rmtree(run_dir, ignore_errors=True)


class NbdClient:
    """qemu-io holding one NBD connection open, driven one command at a time (it reads its next
    command only after printing its prompt again)."""

    PROMPT = b"qemu-io> "

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(["stdbuf", "-oL", "qemu-io", "-f", "raw", url],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)  # fmt: skip
        self.output = b""
        self.prompts = 0
        self._read_until_prompt()

    def _read_until_prompt(self, timeout_s: float = 30) -> str:
        assert self.proc.stdout is not None
        start = len(self.output)
        self.prompts += 1
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while self.output.count(self.PROMPT) < self.prompts and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self.output += chunk
        return self.output[start:].decode(errors="replace")

    def run(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command}\n".encode())
        self.proc.stdin.flush()
        return self._read_until_prompt()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
