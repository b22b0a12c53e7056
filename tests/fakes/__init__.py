"""Fakes of the outside world (QEMU and friends) for tests that must not need the real thing."""
