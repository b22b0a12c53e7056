"""Where vmcluster keeps its files.

The data directory is ``$VMCLUSTER_HOME`` (default ``~/.local/share/vmcluster``):

    images/<image>/        vmlinuz, initrd.img, image.json
    vms/<vm>/              spec.json, state.json, <disk>.raw, console.<boot>.log, qemu.log
    accel.json             the accelerator probe's verdict for this host boot

Unix sockets have a 107-byte path limit, so QMP sockets live in a short runtime directory derived
from the data directory: ``/run/vmcluster/<hash>/`` as root, else ``$XDG_RUNTIME_DIR`` or ``/tmp``.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class DataDir:
    root: Path

    @classmethod
    def from_env(cls) -> "DataDir":
        home = os.environ.get("VMCLUSTER_HOME")
        if home:
            return cls(Path(home).expanduser().absolute())
        return cls(Path("~/.local/share/vmcluster").expanduser())

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def vms(self) -> Path:
        return self.root / "vms"

    @property
    def accel_file(self) -> Path:
        return self.root / "accel.json"

    @property
    def runtime(self) -> Path:
        """A short directory for sockets, unique to this data directory."""
        tag = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        if os.geteuid() == 0:
            base = Path("/run/vmcluster")
        elif os.environ.get("XDG_RUNTIME_DIR"):
            base = Path(os.environ["XDG_RUNTIME_DIR"]) / "vmcluster"
        else:
            base = Path(f"/tmp/vmcluster-{os.geteuid()}")
        return base / tag
