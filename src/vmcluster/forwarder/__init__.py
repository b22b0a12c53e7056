"""The block forwarder: vmcluster's NBD relay between a node's QEMU and the arrays, with
multipath (docs/forwarder.md)."""
