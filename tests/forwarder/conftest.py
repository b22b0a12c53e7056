"""The real-forwarder fixtures (processes, a qemu-storage-daemon array, cables per path), for
every test module here; they are defined in test_forwarder_real.py."""

from tests.forwarder.test_forwarder_real import cables, procs, qsd, short_dir

__all__ = ["cables", "procs", "qsd", "short_dir"]
