"""A writer for the cpio "newc" format, the format of a Linux initramfs. Pure: builds bytes.

Building the archive ourselves means file owners, modes and device nodes (``/dev/console``) are
exactly what the guest needs, without root and without the host's cpio tool.
"""

import stat
from dataclasses import dataclass

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One archive member. ``path`` is relative (no leading '/')."""

    path: str
    mode: int  # full st_mode: file type bits | permission bits
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0

    def __post_init__(self) -> None:
        assert self.path, "empty path"
        assert not self.path.startswith("/"), self.path
        assert stat.S_IFMT(self.mode) != 0, "mode must include the file type"


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path=path, mode=stat.S_IFDIR | perm)


def regular(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path=path, mode=stat.S_IFREG | perm, data=data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path=path, mode=stat.S_IFLNK | 0o777, data=target.encode())


def char_device(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path=path, mode=stat.S_IFCHR | perm, rdev_major=major, rdev_minor=minor)


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _member(ino: int, name: str, entry: Entry | None) -> bytes:
    mode, data, rmaj, rmin = (0, b"", 0, 0) if entry is None else (
        entry.mode, entry.data, entry.rdev_major, entry.rdev_minor)  # fmt: skip
    encoded = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmaj, rmin, len(encoded), 0)
    head = _MAGIC + b"".join(f"{value:08x}".encode() for value in fields)
    return head + encoded + _pad4(len(head) + len(encoded)) + data + _pad4(len(data))


def archive(entries: list[Entry]) -> bytes:
    """The newc archive of ``entries`` in order, with the trailer. Owners are root, mtimes 0."""
    members = [_member(ino, e.path, e) for ino, e in enumerate(entries, start=1)]
    return b"".join([*members, _member(0, _TRAILER, None)])
