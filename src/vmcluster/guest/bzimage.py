"""The uncompressed kernel inside a bzImage, for a PVH boot.

QEMU boots an ELF kernel that carries a PVH entry point (the ``Xen`` ELF note of type
XEN_ELFNOTE_PHYS32_ENTRY) directly in 32-bit protected mode: no real-mode setup code and no
decompression inside the guest. Under TCG the decompressor alone takes about half a second of
every boot, so an image keeps the ELF next to the bzImage when the kernel allows it.

The bzImage header (Documentation/arch/x86/boot.rst) says where its compressed payload is: at
``(setup_sects + 1) * 512 + payload_offset``, ``payload_length`` bytes. The payload is the
compressed ``vmlinux``, followed by its uncompressed size as 4 little-endian bytes. Payloads in
gzip, xz and LZ4 (the kernel's legacy LZ4 framing) are understood; for another compression,
or a kernel without the PVH note, :func:`pvh_kernel` answers None and the image boots the
bzImage as before.
"""

import lzma
import struct
import zlib

import lz4.block

ELF_MAGIC = b"\x7fELF"
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20  # each block decompresses to at most 8 MiB
MAX_KERNEL_BYTES = 512 << 20


class NotAKernel(ValueError):
    """The bytes are not a bzImage (or its payload is damaged)."""


def pvh_kernel(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside ``bzimage`` if it has a PVH entry point and its compression is one
    that is understood; None otherwise. NotAKernel if ``bzimage`` is no bzImage at all."""
    payload = _payload(bzimage)
    elf = _decompress(payload)
    if elf is None:
        return None
    if len(payload) >= 4 and struct.unpack_from("<I", payload, len(payload) - 4)[0] != len(elf):
        raise NotAKernel(f"the kernel's payload decompresses to {len(elf)} bytes, not the "
                         "size its trailer gives")  # fmt: skip
    return elf if has_pvh_note(elf) else None


def _payload(bzimage: bytes) -> bytes:
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise NotAKernel("not a bzImage: no 'HdrS' boot header")
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:
        raise NotAKernel(f"boot protocol {version >> 8}.{version & 0xFF} has no payload fields")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    if length < 4 or start + length > len(bzimage):
        raise NotAKernel("the bzImage's payload lies outside the file")
    return bzimage[start : start + length]


def _decompress(payload: bytes) -> bytes | None:
    try:
        if payload.startswith(b"\x1f\x8b"):
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            data = inflater.decompress(payload, MAX_KERNEL_BYTES)
        elif payload.startswith(b"\xfd7zXZ\x00"):
            data = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload, MAX_KERNEL_BYTES)
        elif struct.unpack_from("<I", payload)[0] == LZ4_LEGACY_MAGIC:
            data = _lz4_legacy(payload)
        else:
            return None
    except (zlib.error, lzma.LZMAError, lz4.block.LZ4BlockError) as exc:
        raise NotAKernel(f"the kernel's payload does not decompress: {exc}") from exc
    return data


def _lz4_legacy(payload: bytes) -> bytes:
    """Blocks, each its compressed size (4 bytes, little-endian) and its data, after the magic;
    what is left when no whole block follows is the kernel's size trailer."""
    blocks, offset, total = [], 4, 0
    while offset + 4 <= len(payload):
        (size,) = struct.unpack_from("<I", payload, offset)
        if size == LZ4_LEGACY_MAGIC or offset + 4 + size > len(payload):
            break
        block = lz4.block.decompress(payload[offset + 4 : offset + 4 + size],
                                     uncompressed_size=LZ4_LEGACY_BLOCK)  # fmt: skip
        total += len(block)
        if total > MAX_KERNEL_BYTES:
            raise NotAKernel("the kernel's payload decompresses to more than 512 MiB")
        blocks.append(block)
        offset += 4 + size
    return b"".join(blocks)


def has_pvh_note(elf: bytes) -> bool:
    """Whether the 64-bit little-endian ELF ``elf`` has a Xen PHYS32_ENTRY note."""
    if len(elf) < 64 or not elf.startswith(ELF_MAGIC) or elf[4] != 2 or elf[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + 56 > len(elf):
            return False
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, at)
        if p_type == PT_NOTE and _notes_have_pvh(elf[p_offset : p_offset + p_filesz]):
            return True
    return False


def _notes_have_pvh(notes: bytes) -> bool:
    offset = 0
    while offset + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, offset)
        name = notes[offset + 12 : offset + 12 + namesz].rstrip(b"\0")
        if name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        offset += 12 + _aligned(namesz) + _aligned(descsz)
    return False


def _aligned(n: int) -> int:
    return (n + 3) & ~3
