"""QEMU: command lines, processes, QMP sessions and the accelerator probe."""
