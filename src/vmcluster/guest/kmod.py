"""Kernel module dependencies, read from the modules themselves. Pure: bytes in, names out.

A kernel package unpacked without its install hooks has no modules.dep, so the initramfs builder
reads each module's ``.modinfo`` ELF section (``depends=a,b``) and orders the modules so that
every module is loaded after the ones it needs (virtio_ring before virtio, and so on).
"""

import struct
from collections.abc import Callable


class ModuleFormatError(ValueError):
    """A file is not a 64-bit little-endian ELF kernel module with a .modinfo section."""


def modinfo(elf: bytes) -> dict[str, str]:
    """The key=value pairs of an ELF64 module's .modinfo section (last value wins)."""
    if len(elf) < 0x40 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ModuleFormatError("not a 64-bit little-endian ELF file")
    try:
        (shoff,) = struct.unpack_from("<Q", elf, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

        def section(index: int) -> tuple[int, int, int]:
            base = shoff + index * shentsize
            name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", elf, base)
            if offset + size > len(elf):
                raise ModuleFormatError(f"section {index} lies past the end of the file")
            return name, offset, size

        _, strtab_off, strtab_size = section(shstrndx)
        strtab = elf[strtab_off : strtab_off + strtab_size]
        for index in range(shnum):
            name_off, offset, size = section(index)
            name = strtab[name_off : strtab.index(b"\0", name_off)]
            if name == b".modinfo":
                fields = elf[offset : offset + size].split(b"\0")
                pairs = (f.decode("utf-8", "replace").partition("=") for f in fields if b"=" in f)
                return {key: value for key, _, value in pairs}
    except (struct.error, ValueError, OverflowError) as exc:
        raise ModuleFormatError(f"truncated or corrupt ELF file: {exc}") from exc
    raise ModuleFormatError("no .modinfo section")


def dependencies(elf: bytes) -> list[str]:
    """The modules this module needs, by name, as listed in its ``depends=`` field."""
    value = modinfo(elf).get("depends", "")
    return [name for name in value.split(",") if name]


def load_order(wanted: list[str], depends_of: Callable[[str], list[str]]) -> list[str]:
    """Every module in ``wanted`` plus its dependencies, each after all it depends on.

    ``depends_of(name)`` returns a module's direct dependencies. Raises ValueError on a cycle.
    The order among independent modules follows ``wanted``.
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"module dependency cycle through {name}")
        visiting.add(name)
        for dep in depends_of(name):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order
