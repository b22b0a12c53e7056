"""vmcluster: failover clustering for KVM/QEMU virtual machines."""

__version__ = "0.1.0"
