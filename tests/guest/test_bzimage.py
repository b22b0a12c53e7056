"""The uncompressed kernel taken out of a bzImage for a PVH boot (vmcluster.guest.bzimage): made-up
bzImages in each compression, kernels without the PVH note, damaged and foreign files, and the
real image's kernel."""

import gzip
import lzma
import struct
from collections.abc import Callable

import lz4.block
import pytest

from vmcluster.guest.bzimage import (
    LZ4_LEGACY_BLOCK,
    LZ4_LEGACY_MAGIC,
    XEN_ELFNOTE_PHYS32_ENTRY,
    NotAKernel,
    has_pvh_note,
    pvh_kernel,
)
from vmcluster.guest.image import ImageInfo


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    return struct.pack("<III", len(name) + 1, len(desc), kind) + pad(name + b"\0") + pad(desc)


def elf(notes: bytes, *, filler: int = 0) -> bytes:
    """A 64-bit little-endian ELF whose one program header is a PT_NOTE holding ``notes``."""
    header = bytearray(64)
    header[0:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1  # 64-bit, little-endian, version 1
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 120, 0, 0, len(notes), len(notes), 4)
    return bytes(header) + phdr + notes + bytes(range(256)) * filler


PVH = _note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", 0x1000000))
OTHER_XEN = _note(b"Xen", 6, b"linux\0") + _note(b"GNU", 3, b"build-id")


def lz4_legacy(data: bytes) -> bytes:
    out = struct.pack("<I", LZ4_LEGACY_MAGIC)
    for at in range(0, len(data), LZ4_LEGACY_BLOCK):
        block = lz4.block.compress(data[at : at + LZ4_LEGACY_BLOCK], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return out


COMPRESSIONS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda d: gzip.compress(d, mtime=0),
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "lz4": lz4_legacy,
}


def bzimage(payload: bytes, *, size: int, setup_sects: int = 3, offset: int = 100) -> bytes:
    """A bzImage (boot protocol 2.15) with ``payload`` and the kernel's size trailer."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    body = payload + struct.pack("<I", size)
    struct.pack_into("<II", setup, 0x248, offset, len(body))
    return bytes(setup) + b"\0" * offset + body + b"\0" * 64


@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
def test_the_kernel_comes_out_of_each_compression(compression: str) -> None:
    kernel = elf(OTHER_XEN + PVH, filler=40000)  # 10 MiB: the LZ4 payload has two blocks
    image = bzimage(COMPRESSIONS[compression](kernel), size=len(kernel))
    assert pvh_kernel(image) == kernel


def test_a_kernel_without_the_pvh_note_boots_as_a_bzimage() -> None:
    kernel = elf(OTHER_XEN)
    assert not has_pvh_note(kernel)
    assert pvh_kernel(bzimage(gzip.compress(kernel), size=len(kernel))) is None


def test_an_unknown_compression_boots_as_a_bzimage() -> None:
    kernel = elf(PVH)
    bzip2_like = b"BZh9" + kernel
    assert pvh_kernel(bzimage(bzip2_like, size=len(kernel))) is None


@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
def test_a_payload_that_is_cut_short_is_refused(compression: str) -> None:
    kernel = elf(PVH, filler=2000)
    whole = COMPRESSIONS[compression](kernel)
    with pytest.raises(NotAKernel, match="payload"):
        pvh_kernel(bzimage(whole[: len(whole) // 2], size=len(kernel)))


def test_a_trailer_that_disagrees_with_the_payload_is_refused() -> None:
    kernel = elf(PVH)
    with pytest.raises(NotAKernel, match="not the size its trailer gives"):
        pvh_kernel(bzimage(gzip.compress(kernel), size=len(kernel) + 1))


@pytest.mark.parametrize(
    ("data", "problem"),
    [(b"", "no 'HdrS'"), (b"\x7fELF" + bytes(2000), "no 'HdrS'"),
     (bytes(0x202) + b"HdrS" + struct.pack("<H", 0x204) + bytes(100), "has no payload fields")],
)  # fmt: skip
def test_a_file_that_is_no_bzimage_is_refused(data: bytes, problem: str) -> None:
    with pytest.raises(NotAKernel, match=problem):
        pvh_kernel(data)


def test_a_payload_outside_the_file_is_refused() -> None:
    image = bytearray(bzimage(gzip.compress(elf(PVH)), size=0))
    struct.pack_into("<I", image, 0x24C, len(image))  # payload_length beyond the end
    with pytest.raises(NotAKernel, match="outside the file"):
        pvh_kernel(bytes(image))


@pytest.mark.parametrize(
    "data",
    [b"", b"\x7fELF", b"\x7fELF\x01\x01" + bytes(100), elf(b"\x05\0\0\0"),
     elf(PVH)[:100]],
)  # fmt: skip
def test_truncated_or_foreign_elves_have_no_pvh_note(data: bytes) -> None:
    assert not has_pvh_note(data)


def test_the_probe_image_boots_its_kernel_through_pvh(probe_image: ImageInfo) -> None:
    """Debian's cloud kernel has the PVH entry point: the image keeps the ELF and boots it."""
    assert probe_image.boot == "pvh"
    assert probe_image.kernel.name == "vmlinux"
    kernel = probe_image.kernel.read_bytes()
    assert has_pvh_note(kernel)
