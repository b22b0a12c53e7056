"""Boot time of the probe guest: from QEMU's start to the guest's first acknowledged write.

A failed-over VM's first new ACK comes one boot after QEMU starts on the new node, so this is
most of what bench/failover measures after the decision. Each run starts QEMU exactly as the
agent does (vmcluster.hypervisor.cmdline.build_argv) with a fresh local disk, on the accelerator
this host uses, and times the console's ``booted`` line and ``ACK 1``. The reference, measured
in the same run and alternated with it, is the same image booted as before: the compressed
bzImage, and the kernel command line without the fast-boot settings.

    sudo .venv/bin/python bench/boot.py [--runs 5]

Prints one JSON object: per configuration the runs and their min/median/max, and the ratio of
the medians (current / reference).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

from vmcluster.core.model import DiskSpec, VmSpec
from vmcluster.guest.image import build_image
from vmcluster.hypervisor import cmdline
from vmcluster.hypervisor.accel import choose_accel, qemu_binary
from vmcluster.hypervisor.cmdline import Launch, build_argv
from vmcluster.paths import DataDir

TIMEOUT_S = 60.0
POLL_S = 0.01


def _boot(launch: Launch, qemu: str) -> dict[str, float]:
    for path in (launch.console_log, launch.disk_files[0]):
        Path(str(path)).unlink(missing_ok=True)
    with open(str(launch.disk_files[0]), "wb") as disk:
        disk.truncate(launch.spec.disks[0].size_bytes)
    started = time.monotonic()
    proc = subprocess.Popen(build_argv(launch, qemu), stdout=subprocess.DEVNULL)
    marks: dict[str, float] = {}
    try:
        while "ack" not in marks and time.monotonic() - started < TIMEOUT_S:
            try:
                text = launch.console_log.read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            if "booted" not in marks and "vmcluster-probe: booted" in text:
                marks["booted"] = round(time.monotonic() - started, 3)
            if "\nACK 1\n" in text:
                marks["ack"] = round(time.monotonic() - started, 3)
            time.sleep(POLL_S)
    finally:
        proc.kill()
        proc.wait()
    if "ack" not in marks:
        raise SystemExit(f"no ACK 1 within {TIMEOUT_S:g} s; console: {launch.console_log}")
    return marks


def _summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": round(statistics.median(values), 3), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    home = DataDir(Path(os.environ.get("VMCLUSTER_HOME", "/var/lib/vmcluster")))
    image = build_image(home.images)
    accel = choose_accel(home.accel_file, image).accel
    qemu = qemu_binary()
    with tempfile.TemporaryDirectory(prefix="vmcluster-bench-boot-") as tmp:
        root = Path(tmp)
        disk = DiskSpec(name="disk0", size_bytes=16 << 20)
        spec = VmSpec(name="bench", memory_mib=128, disks=(disk,))
        current = Launch(
            spec=spec, kernel=image.kernel, initrd=image.initrd,
            disk_files=(root / "disk0.raw",), qmp_socket=root / "qmp.sock",
            console_log=root / "console.log", pidfile=root / "qemu.pid", accel=accel,
            generation=1, daemonize=False,
        )  # fmt: skip
        reference = replace(current, kernel=Path(image.path) / "vmlinuz")
        results: dict[str, list[dict[str, float]]] = {"current": [], "reference": []}
        for _ in range(args.runs):
            results["current"].append(_boot(current, qemu))
            with mock.patch.object(cmdline, "FAST_BOOT", ()):
                results["reference"].append(_boot(reference, qemu))
    acks = {name: [r["ack"] for r in runs] for name, runs in results.items()}
    out = {
        "bench": "boot",
        "accel": str(accel),
        "image_boot": image.boot,
        "runs": args.runs,
        "current": {"kernel": image.kernel.name, "fast_boot": list(cmdline.FAST_BOOT),
                    "runs": results["current"], "ack_s": _summary(acks["current"])},
        "reference": {"kernel": "vmlinuz", "fast_boot": [], "runs": results["reference"],
                      "ack_s": _summary(acks["reference"])},
        "ratio": round(statistics.median(acks["current"]) / statistics.median(acks["reference"]),
                       2),
    }  # fmt: skip
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
