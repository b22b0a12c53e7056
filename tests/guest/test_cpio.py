"""Unit tests for vmcluster.guest.cpio, checked by an independent newc reader and, where one is
installed, by a real cpio tool."""

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmcluster.guest import cpio

HEADER_LEN = 110  # "070701" + 13 fields of 8 hex digits
FIELDS = (
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
)


@dataclass(frozen=True)
class Member:
    name: str
    data: bytes
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    devmajor: int
    devminor: int
    rdevmajor: int
    rdevminor: int
    check: int


def read_newc(archive: bytes) -> list[Member]:
    """Parse a newc archive strictly; the trailer is the last member returned."""
    members: list[Member] = []
    offset = 0
    while True:
        assert offset % 4 == 0, f"header at unaligned offset {offset}"
        header = archive[offset : offset + HEADER_LEN]
        assert len(header) == HEADER_LEN, "truncated header"
        assert header[:6] == b"070701", f"bad magic {header[:6]!r} at {offset}"
        raw = header[6:]
        assert re.fullmatch(rb"[0-9a-f]{104}", raw), f"bad header fields {raw!r}"
        values = {name: int(raw[i * 8 : i * 8 + 8], 16) for i, name in enumerate(FIELDS)}
        name_start = offset + HEADER_LEN
        name_end = name_start + values["namesize"]
        raw_name = archive[name_start:name_end]
        assert len(raw_name) == values["namesize"]
        assert raw_name.endswith(b"\0"), "name is not NUL-terminated"
        assert b"\0" not in raw_name[:-1], "NUL inside a name"
        data_start = name_end + (-name_end % 4)
        assert archive[name_end:data_start] == b"\0" * (data_start - name_end), "name padding"
        data_end = data_start + values["filesize"]
        data = archive[data_start:data_end]
        assert len(data) == values["filesize"], "truncated data"
        next_offset = data_end + (-data_end % 4)
        assert archive[data_end:next_offset] == b"\0" * (next_offset - data_end), "data padding"
        namesize, filesize = values.pop("namesize"), values.pop("filesize")
        member = Member(name=raw_name[:-1].decode(), data=data, **values)
        assert namesize == len(member.name.encode()) + 1
        assert filesize == len(member.data)
        members.append(member)
        offset = next_offset
        if member.name == "TRAILER!!!":
            assert offset == len(archive), "bytes after the trailer"
            return members


def check_archive(entries: list[cpio.Entry]) -> list[Member]:
    """Build an archive, parse it back, check every member; return the non-trailer members."""
    blob = cpio.archive(entries)
    assert len(blob) % 4 == 0
    members = read_newc(blob)
    *body, trailer = members
    assert trailer.name == "TRAILER!!!"
    assert trailer.data == b""
    assert trailer.mode == 0
    assert trailer.ino == 0
    assert len(body) == len(entries)
    for index, (entry, member) in enumerate(zip(entries, body, strict=True), start=1):
        assert member.name == entry.path
        assert member.mode == entry.mode
        assert member.data == entry.data
        assert member.ino == index
        assert (member.uid, member.gid, member.mtime, member.check) == (0, 0, 0, 0)
        assert (member.devmajor, member.devminor) == (0, 0)
        assert (member.rdevmajor, member.rdevminor) == (entry.rdev_major, entry.rdev_minor)
        assert member.nlink == (2 if stat.S_ISDIR(entry.mode) else 1)
    return body


def test_empty_archive_is_just_the_trailer() -> None:
    blob = cpio.archive([])
    members = read_newc(blob)
    assert [m.name for m in members] == ["TRAILER!!!"]
    # 110-byte header + 11-byte name, padded to 124.
    assert len(blob) == 124
    assert blob.startswith(b"070701")


def test_exact_bytes_of_a_small_regular_file() -> None:
    blob = cpio.archive([cpio.regular("a", b"xyz", 0o600)])
    expected_head = b"070701" + b"".join(
        b"%08x" % v for v in (1, 0o100600, 0, 0, 1, 0, 3, 0, 0, 0, 0, 2, 0)
    )
    # header (110) + "a\0" (2) = 112, already aligned; data 3 bytes + 1 pad.
    assert blob[:112] == expected_head + b"a\0"
    assert blob[112:116] == b"xyz\0"
    assert blob[116:122] == b"070701"


def test_helpers_set_type_and_permissions() -> None:
    entries = [
        cpio.directory("bin"),
        cpio.directory("tmp", 0o1777),
        cpio.regular("bin/tool", b"#!/bin/sh\n", 0o755),
        cpio.regular("etc/empty", b""),
        cpio.symlink("bin/sh", "busybox"),
        cpio.char_device("dev/console", 5, 1),
        cpio.char_device("dev/null", 1, 3, 0o666),
    ]
    body = check_archive(entries)
    modes = {m.name: m.mode for m in body}
    assert modes == {
        "bin": stat.S_IFDIR | 0o755,
        "tmp": stat.S_IFDIR | 0o1777,
        "bin/tool": stat.S_IFREG | 0o755,
        "etc/empty": stat.S_IFREG | 0o644,
        "bin/sh": stat.S_IFLNK | 0o777,
        "dev/console": stat.S_IFCHR | 0o600,
        "dev/null": stat.S_IFCHR | 0o666,
    }
    by_name = {m.name: m for m in body}
    assert by_name["bin/sh"].data == b"busybox"
    assert (by_name["dev/console"].rdevmajor, by_name["dev/console"].rdevminor) == (5, 1)
    assert (by_name["dev/null"].rdevmajor, by_name["dev/null"].rdevminor) == (1, 3)
    assert by_name["bin"].nlink == 2
    assert by_name["bin/tool"].nlink == 1
    assert by_name["dev/console"].data == b""


def test_entry_order_is_kept() -> None:
    names = ["z", "a", "m/x", "m"]
    body = check_archive([cpio.regular(n, n.encode()) for n in names])
    assert [m.name for m in body] == names


@pytest.mark.parametrize("data_len", range(9))
@pytest.mark.parametrize("name_len", range(1, 9))
def test_alignment_for_every_name_and_data_length(name_len: int, data_len: int) -> None:
    entries = [
        cpio.regular("n" * name_len, bytes(range(data_len))),
        cpio.regular("after", b"tail"),  # its header must start aligned
    ]
    body = check_archive(entries)
    assert body[0].data == bytes(range(data_len))
    assert body[1].data == b"tail"


def test_non_ascii_name_is_utf8() -> None:
    body = check_archive([cpio.regular("caf\u00e9/\u2603 file, with=odd chars", b"x")])
    assert body[0].name == "caf\u00e9/\u2603 file, with=odd chars"


def test_data_that_looks_like_a_header_is_not_confused() -> None:
    fake = cpio.archive([cpio.regular("inner", b"payload")])
    body = check_archive([cpio.regular("nested.cpio", fake), cpio.regular("next", b"n")])
    assert body[0].data == fake
    assert [m.name for m in body] == ["nested.cpio", "next"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"path": "", "mode": stat.S_IFREG | 0o644},
        {"path": "/etc/passwd", "mode": stat.S_IFREG | 0o644},
        {"path": "etc/passwd", "mode": 0o644},
    ],
)
def test_entry_rejects_programmer_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(AssertionError):
        cpio.Entry(**kwargs)  # type: ignore[arg-type]


segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=12)
paths = st.lists(segment, min_size=1, max_size=3).map("/".join)


@st.composite
def entry_lists(draw: st.DrawFn) -> list[cpio.Entry]:
    unique_paths = draw(st.lists(paths, max_size=8, unique=True))
    entries = []
    for path in unique_paths:
        kind = draw(st.sampled_from(["dir", "file", "link", "chr"]))
        perm = draw(st.integers(0, 0o7777))
        if kind == "dir":
            entries.append(cpio.directory(path, perm))
        elif kind == "file":
            entries.append(cpio.regular(path, draw(st.binary(max_size=70)), perm))
        elif kind == "link":
            entries.append(cpio.symlink(path, draw(paths)))
        else:
            major, minor = draw(st.integers(0, 0xFFF)), draw(st.integers(0, 0xFFFFF))
            entries.append(cpio.char_device(path, major, minor, perm))
    return entries


@settings(max_examples=200)
@given(entry_lists())
def test_archive_round_trips(entries: list[cpio.Entry]) -> None:
    check_archive(entries)


# ------------------------------------------------------------- a real cpio as a second opinion


def _cpio_tools() -> list[tuple[str, list[str]]]:
    tools = []
    gnu = shutil.which("cpio") or ("/usr/bin/cpio" if os.path.exists("/usr/bin/cpio") else None)
    if gnu:
        tools.append(("gnu", [gnu, "-i", "-d", "-m", "-H", "newc", "--no-absolute-filenames"]))
    busybox = shutil.which("busybox")
    if busybox:
        probe = subprocess.run(
            [busybox, "cpio", "--help"], capture_output=True, text=True, check=False
        )
        if "Extract" in probe.stdout + probe.stderr:
            tools.append(("busybox", [busybox, "cpio", "-i", "-d", "-m", "-H", "newc"]))
    return tools


def test_real_cpio_extracts_the_archive(tmp_path: Path) -> None:
    tools = _cpio_tools()
    if not tools:
        pytest.skip("neither cpio nor busybox cpio is installed")
    is_root = os.geteuid() == 0
    payload = bytes(range(256)) * 5 + b"odd"
    entries = [
        cpio.directory("bin"),
        cpio.regular("bin/tool", b"#!/bin/sh\necho hi\n", 0o755),
        cpio.symlink("bin/sh", "tool"),
        cpio.directory("etc"),
        cpio.directory("etc/deep"),
        cpio.regular("etc/deep/data.bin", payload, 0o640),
        cpio.regular("etc/empty", b"", 0o600),
        cpio.regular("etc/name, with=comma", b"1", 0o644),
        cpio.directory("dev"),
    ]
    if is_root:  # making device nodes needs privilege
        entries.append(cpio.char_device("dev/console", 5, 1))
    blob = cpio.archive(entries)
    for tool, argv in tools:
        dest = tmp_path / tool
        dest.mkdir()
        result = subprocess.run(
            argv, input=blob, cwd=dest, capture_output=True, timeout=60, check=False
        )
        assert result.returncode == 0, (tool, result.stderr.decode(errors="replace"))
        tool_file = dest / "bin/tool"
        assert tool_file.read_bytes() == b"#!/bin/sh\necho hi\n"
        assert stat.S_IMODE(tool_file.stat().st_mode) == 0o755
        assert (dest / "bin").is_dir()
        assert os.readlink(dest / "bin/sh") == "tool"
        assert (dest / "etc/deep/data.bin").read_bytes() == payload
        assert stat.S_IMODE((dest / "etc/deep/data.bin").stat().st_mode) == 0o640
        assert (dest / "etc/empty").read_bytes() == b""
        assert (dest / "etc/name, with=comma").read_bytes() == b"1"
        assert (dest / "dev").is_dir()
        extracted = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
        assert extracted == sorted(e.path for e in entries)
        if is_root:
            console = (dest / "dev/console").lstat()
            assert stat.S_ISCHR(console.st_mode)
            assert (os.major(console.st_rdev), os.minor(console.st_rdev)) == (5, 1)
