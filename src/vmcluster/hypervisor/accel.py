"""Choosing the accelerator: KVM only when a real boot under KVM works, else TCG.

On some hosts /dev/kvm exists but guests hang at boot under it. So the probe boots the probe image
under KVM with ``vmcluster.mode=accel-probe`` (the guest prints a marker and powers off) and waits a
few seconds for the marker. The verdict is cached per host boot and QEMU binary in ``accel.json``;
``VMCLUSTER_ACCEL=kvm|tcg`` overrides it. The log says which accelerator was chosen and why.
"""

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vmcluster.errors import InvalidInput, MissingDependency
from vmcluster.guest.image import ImageInfo
from vmcluster.hypervisor.cmdline import Accel, qemu_opt_value
from vmcluster.hypervisor.process import INSTALL_HINT
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

PROBE_MARKER = "VMCLUSTER-ACCEL-PROBE-OK"
PROBE_TIMEOUT_S = 6.0
QEMU_BINARY = "qemu-system-x86_64"


@dataclass(frozen=True, slots=True, kw_only=True)
class AccelChoice:
    accel: Accel
    reason: str
    host_key: str


def _host_key(qemu: str) -> str:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    stat = Path(qemu).stat()
    return f"{boot_id}:{qemu}:{stat.st_mtime_ns}"


def qemu_binary() -> str:
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise MissingDependency(f"{QEMU_BINARY} not found: {INSTALL_HINT}")
    return path


def choose_accel(cache_file: Path, image: ImageInfo) -> AccelChoice:
    """The accelerator to run VMs with on this host (probing once per host boot)."""
    forced = os.environ.get("VMCLUSTER_ACCEL", "").strip().lower()
    if forced:
        try:
            return AccelChoice(accel=Accel(forced), reason="set by VMCLUSTER_ACCEL", host_key="")
        except ValueError:
            raise InvalidInput(f"invalid VMCLUSTER_ACCEL {forced!r}: use kvm or tcg") from None
    qemu = qemu_binary()
    key = _host_key(qemu)
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        cached = json.loads(cache_file.read_text())
        if cached["host_key"] == key:
            return AccelChoice(accel=Accel(cached["accel"]), reason=cached["reason"], host_key=key)
    choice = _probe(qemu, image, key)
    log.warning(event("accel.chosen", accel=choice.accel, reason=choice.reason))
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(choice)) + "\n")
    tmp.replace(cache_file)
    return choice


def _probe(qemu: str, image: ImageInfo, key: str) -> AccelChoice:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice(accel=Accel.TCG, reason="/dev/kvm is not usable", host_key=key)
    with tempfile.TemporaryDirectory(prefix="vmcluster-accel-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [
            qemu, "-machine", "pc", "-accel", "kvm", "-cpu", "host", "-m", "128M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", "console=ttyS0 loglevel=1 panic=-1 vmcluster.mode=accel-probe",
            "-chardev", f"file,id=console,path={qemu_opt_value(str(console))}",
            "-serial", "chardev:console",
        ]  # fmt: skip
        started = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            _, err = proc.communicate(timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        stderr = err.decode(errors="replace").strip()
        seconds = time.monotonic() - started
        booted = console.exists() and PROBE_MARKER in console.read_text(errors="replace")
    if booted:
        return AccelChoice(
            accel=Accel.KVM, reason=f"a probe boot under KVM took {seconds:.1f} s", host_key=key
        )
    if proc.returncode not in (0, -9) and stderr:
        why = f"a probe boot under KVM failed: {stderr.splitlines()[-1]}"
    else:
        why = f"a probe boot under KVM did not finish within {PROBE_TIMEOUT_S:.0f} s"
    return AccelChoice(accel=Accel.TCG, reason=why, host_key=key)
