"""Helpers for tests that drive vmcluster as a user would."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VMCLUSTER = str(Path(sys.executable).parent / "vmcluster")


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
    """Run the installed ``vmcluster`` command as a user would."""
    proc = subprocess.run(
        [VMCLUSTER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def kill_by_pid(pid: int) -> None:
    """SIGKILL a process this test started (e.g. to simulate a QEMU crash)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
