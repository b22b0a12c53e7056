"""Unit tests for vmcluster.guest.kmod: reading .modinfo from ELF64 modules, ordering modules.

The ELF files are built here with struct, so the tests need no kernel package.
"""

import struct
from collections.abc import Callable, Sequence

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vmcluster.guest.kmod import ModuleFormatError, dependencies, load_order, modinfo

SHT_PROGBITS = 1
SHT_STRTAB = 3
EHDR_SIZE = 64
SHDR_SIZE = 64


def _align(blob: bytearray, alignment: int = 8) -> None:
    blob.extend(b"\0" * (-len(blob) % alignment))


def build_elf(
    sections: Sequence[tuple[str, bytes]],
    *,
    shstrtab_index: int | None = None,
    ei_class: int = 2,
    ei_data: int = 1,
    strtab: bytes | None = None,
    name_offsets: dict[str, int] | None = None,
) -> bytes:
    """A minimal ELF64 little-endian relocatable file.

    Section 0 is the null section, then ``sections`` (name, data) in order, with the section-name
    string table ``.shstrtab`` inserted at ``shstrtab_index`` (default: last). ``strtab`` and
    ``name_offsets`` replace the generated string table and name offsets (for odd layouts).
    """
    named = [(name, data, SHT_PROGBITS) for name, data in sections]
    index = len(named) if shstrtab_index is None else shstrtab_index - 1
    named.insert(index, (".shstrtab", b"", SHT_STRTAB))
    if strtab is None:
        offsets: dict[str, int] = {}
        table = bytearray(b"\0")
        for name, _, _ in named:
            if name not in offsets:
                offsets[name] = len(table)
                table += name.encode() + b"\0"
        strtab = bytes(table)
    else:
        offsets = {}
    offsets.update(name_offsets or {})

    body = bytearray(EHDR_SIZE)
    placed: list[tuple[int, int, int, int]] = []  # name offset, type, file offset, size
    for name, data, sh_type in named:
        payload = strtab if sh_type == SHT_STRTAB else data
        _align(body)
        placed.append((offsets[name], sh_type, len(body), len(payload)))
        body += payload
    _align(body)
    shoff = len(body)
    body += bytes(SHDR_SIZE)  # the null section header
    for name_off, sh_type, offset, size in placed:
        body += struct.pack("<IIQQQQIIQQ", name_off, sh_type, 0, 0, offset, size, 0, 0, 1, 0)
    shnum = len(placed) + 1
    shstrndx = index + 1
    ident = b"\x7fELF" + bytes([ei_class, ei_data, 1]) + bytes(9)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, EHDR_SIZE, 0, 0, SHDR_SIZE, shnum, shstrndx
    )
    assert len(header) == EHDR_SIZE
    body[:EHDR_SIZE] = header
    return bytes(body)


def modinfo_bytes(*fields: str) -> bytes:
    return b"".join(f.encode() + b"\0" for f in fields)


def module(*fields: str, **kwargs: object) -> bytes:
    """A module with some ordinary sections and a .modinfo holding ``fields``."""
    sections = [
        (".text", b"\x90" * 13),
        (".modinfo", modinfo_bytes(*fields)),
        (".gnu.linkonce.this_module", b"\0" * 24),
    ]
    return build_elf(sections, **kwargs)  # type: ignore[arg-type]


VIRTIO_BLK = (
    "license=GPL",
    "description=Virtio block driver",
    "alias=virtio:d00000002v*",
    "depends=virtio,virtio_ring",
    "retpoline=Y",
    "intree=Y",
    "name=virtio_blk",
    "vermagic=6.1.0-18-amd64 SMP preempt mod_unload modversions ",
)


# ---------------------------------------------------------------------------- modinfo()


def test_builder_output_is_well_formed() -> None:
    blob = module("name=x")
    assert blob[:4] == b"\x7fELF"
    (shoff,) = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 0x3A)
    assert (shentsize, shnum, shstrndx) == (64, 5, 4)
    assert shoff + shnum * shentsize == len(blob)


def test_modinfo_reads_all_pairs() -> None:
    info = modinfo(module(*VIRTIO_BLK))
    assert info == {
        "license": "GPL",
        "description": "Virtio block driver",
        "alias": "virtio:d00000002v*",
        "depends": "virtio,virtio_ring",
        "retpoline": "Y",
        "intree": "Y",
        "name": "virtio_blk",
        "vermagic": "6.1.0-18-amd64 SMP preempt mod_unload modversions ",
    }


def test_modinfo_last_value_wins() -> None:
    info = modinfo(module("alias=first", "name=m", "alias=second", "alias=third"))
    assert info == {"alias": "third", "name": "m"}


def test_modinfo_value_may_contain_equals_and_be_empty() -> None:
    info = modinfo(module("parm=debug:level=verbose (int)", "depends=", "srcversion=ABC"))
    assert info == {"parm": "debug:level=verbose (int)", "depends": "", "srcversion": "ABC"}


def test_modinfo_skips_fields_without_equals_and_padding() -> None:
    data = b"\0\0junk\0name=m\0\0\0\0license=GPL\0\0\0"
    info = modinfo(build_elf([(".modinfo", data)]))
    assert info == {"name": "m", "license": "GPL"}


def test_modinfo_replaces_invalid_utf8() -> None:
    info = modinfo(build_elf([(".modinfo", b"author=J\xffrg\0name=m\0")]))
    assert info == {"author": "J\ufffdrg", "name": "m"}


def test_modinfo_empty_section_gives_empty_dict() -> None:
    assert modinfo(build_elf([(".text", b"x"), (".modinfo", b"")])) == {}


@pytest.mark.parametrize("shstrtab_index", [1, 2, 3, 4])
def test_modinfo_finds_section_wherever_the_string_table_is(shstrtab_index: int) -> None:
    assert modinfo(module("name=m", shstrtab_index=shstrtab_index)) == {"name": "m"}


def test_modinfo_matches_the_whole_section_name() -> None:
    sections = [
        (".modinfo.old", modinfo_bytes("name=wrong1")),
        (".modinf", modinfo_bytes("name=wrong2")),
        ("x.modinfo", modinfo_bytes("name=wrong3")),
        (".modinfo", modinfo_bytes("name=right")),
    ]
    assert modinfo(build_elf(sections)) == {"name": "right"}


def test_modinfo_follows_name_offsets_into_shared_strings() -> None:
    # ELF string tables may share suffixes: ".modinfo" is found at offset 2 of "x.modinfo".
    strtab = b"\0x.modinfo\0.shstrtab\0"
    elf = build_elf(
        [("decoy", modinfo_bytes("name=decoy")), ("real", modinfo_bytes("name=real"))],
        strtab=strtab,
        name_offsets={"decoy": 1, "real": 2, ".shstrtab": 11},
    )
    assert modinfo(elf) == {"name": "real"}


def test_modinfo_without_modinfo_section() -> None:
    elf = build_elf([(".text", b"\x90"), (".data", b"name=m\0")])
    with pytest.raises(ModuleFormatError, match=r"no \.modinfo section"):
        modinfo(elf)


def test_modinfo_without_any_section_but_the_string_table() -> None:
    with pytest.raises(ModuleFormatError, match=r"no \.modinfo section"):
        modinfo(build_elf([]))


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"ei_class": 1}, "32-bit"),
        ({"ei_class": 3}, "bad class"),
        ({"ei_data": 2}, "big-endian"),
        ({"ei_data": 0}, "no data encoding"),
    ],
)
def test_modinfo_rejects_other_elf_kinds(kwargs: dict[str, int], reason: str) -> None:
    with pytest.raises(ModuleFormatError, match="not a 64-bit little-endian ELF"):
        modinfo(module("name=m", **kwargs))


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x7f",
        b"\x7fEL",
        b"MZ\x90\x00" + bytes(100),
        b"\x00ELF\x02\x01" + bytes(100),
        b"#!/bin/sh\necho not a module\n",
        bytes(4096),
    ],
)
def test_modinfo_rejects_garbage(blob: bytes) -> None:
    with pytest.raises(ModuleFormatError):
        modinfo(blob)


def test_modinfo_rejects_every_truncation() -> None:
    blob = module(*VIRTIO_BLK)
    full = modinfo(blob)
    # The section headers are last and the string table's header is the very last one; only
    # its final 24 bytes (sh_link, sh_info, sh_addralign, sh_entsize) are never read.
    unread_tail = 24
    # Lengths 4 and 5 hit a known bug (IndexError), see test_modinfo_rejects_tiny_elf_prefix.
    for length in [*range(4), *range(6, len(blob))]:
        if length >= len(blob) - unread_tail:
            assert modinfo(blob[:length]) == full
        else:
            with pytest.raises(ModuleFormatError):
                modinfo(blob[:length])


@pytest.mark.parametrize("blob", [b"\x7fELF", b"\x7fELF\x02"])
def test_modinfo_rejects_tiny_elf_prefix(blob: bytes) -> None:
    with pytest.raises(ModuleFormatError):
        modinfo(blob)


def _patched(blob: bytes, fmt: str, offset: int, *values: int) -> bytes:
    out = bytearray(blob)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


@pytest.mark.parametrize(
    ("fmt", "offset", "values"),
    [
        ("<Q", 0x28, (10**9,)),  # section headers past the end of the file
        ("<Q", 0x28, (8,)),  # section headers inside the ELF header: junk offsets
        ("<H", 0x3C, (200,)),  # more sections than there are headers
        ("<H", 0x3E, (900,)),  # string table index out of range
    ],
)
def test_modinfo_rejects_corrupt_headers(fmt: str, offset: int, values: tuple[int, ...]) -> None:
    # A module without .modinfo, so that only noticing the damage can end the search.
    blob = build_elf([(".text", b"x" * 40), (".data", b"name=m\0")])
    with pytest.raises(ModuleFormatError, match=r"no \.modinfo"):
        modinfo(blob)
    with pytest.raises(ModuleFormatError, match="truncated or corrupt"):
        modinfo(_patched(blob, fmt, offset, *values))


def test_modinfo_rejects_name_offset_outside_string_table() -> None:
    elf = build_elf([(".modinfo", b"name=m\0")], name_offsets={".modinfo": 5000})
    with pytest.raises(ModuleFormatError, match="truncated or corrupt"):
        modinfo(elf)


def test_modinfo_rejects_unterminated_section_name() -> None:
    elf = build_elf(
        [(".modinfo", b"name=m\0")],
        strtab=b"\0.shstrtab\0.modinfo",  # last name has no NUL
        name_offsets={".shstrtab": 1, ".modinfo": 11},
    )
    with pytest.raises(ModuleFormatError, match="truncated or corrupt"):
        modinfo(elf)


def test_modinfo_rejects_huge_section_header_offset() -> None:
    blob = module("name=m")
    with pytest.raises(ModuleFormatError):
        modinfo(_patched(blob, "<Q", 0x28, 2**63))


@given(st.binary(max_size=300))
def test_modinfo_rejects_random_bytes(blob: bytes) -> None:
    assume(not (blob.startswith(b"\x7fELF") and len(blob) < 6))  # known bug, see above
    with pytest.raises(ModuleFormatError):
        modinfo(blob)


@settings(max_examples=300)
@given(
    position=st.integers(0, 10_000),
    junk=st.binary(min_size=1, max_size=8),
)
def test_modinfo_damaged_module_fails_cleanly(position: int, junk: bytes) -> None:
    blob = bytearray(module(*VIRTIO_BLK))
    position = 6 + position % (len(blob) - 6)  # keep the ELF identification intact
    blob[position : position + len(junk)] = junk
    # Corruption may go unnoticed, but it must never escape as another exception type;
    # offsets of 2**63 and more are excluded (known OverflowError bug, see above).
    (shoff,) = struct.unpack_from("<Q", blob, 0x28)
    if shoff >= 2**62:
        return
    try:
        info = modinfo(bytes(blob))
    except ModuleFormatError:
        return
    assert isinstance(info, dict)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in info.items())


def test_module_format_error_is_a_value_error() -> None:
    assert issubclass(ModuleFormatError, ValueError)


# ---------------------------------------------------------------------------- dependencies()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (VIRTIO_BLK, ["virtio", "virtio_ring"]),
        (("name=virtio_ring", "depends="), []),
        (("name=m",), []),
        (("depends=a",), ["a"]),
        (("depends=a,,b,",), ["a", "b"]),
        (("depends=a", "depends=b,c"), ["b", "c"]),
    ],
)
def test_dependencies(fields: tuple[str, ...], expected: list[str]) -> None:
    assert dependencies(module(*fields)) == expected


def test_dependencies_propagates_format_errors() -> None:
    with pytest.raises(ModuleFormatError):
        dependencies(b"not an elf file")


# ---------------------------------------------------------------------------- load_order()


def graph(edges: dict[str, list[str]]) -> Callable[[str], list[str]]:
    return lambda name: edges.get(name, [])


def test_load_order_dependencies_first() -> None:
    edges = {
        "virtio_blk": ["virtio", "virtio_ring"],
        "virtio_pci": ["virtio", "virtio_ring", "virtio_pci_modern_dev"],
        "virtio": [],
        "virtio_ring": ["virtio"],
    }
    order = load_order(["virtio_pci", "virtio_blk"], graph(edges))
    assert order == ["virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk"]


def test_load_order_keeps_wanted_order_for_independent_modules() -> None:
    assert load_order(["c", "a", "b"], graph({})) == ["c", "a", "b"]
    assert load_order(["b", "a"], graph({"a": ["x"], "b": ["y"]})) == ["y", "b", "x", "a"]


def test_load_order_shared_dependency_once() -> None:
    edges = {"a": ["base"], "b": ["base"], "c": ["a", "b", "base"]}
    order = load_order(["a", "b", "c"], graph(edges))
    assert order == ["base", "a", "b", "c"]


def test_load_order_diamond() -> None:
    edges = {"top": ["left", "right"], "left": ["bottom"], "right": ["bottom"]}
    assert load_order(["top"], graph(edges)) == ["bottom", "left", "right", "top"]


def test_load_order_wanted_twice_or_already_pulled_in() -> None:
    edges = {"a": ["b"]}
    assert load_order(["a", "b", "a"], graph(edges)) == ["b", "a"]


def test_load_order_empty() -> None:
    assert load_order([], graph({})) == []


@pytest.mark.parametrize(
    "edges",
    [
        {"a": ["a"]},
        {"a": ["b"], "b": ["a"]},
        {"a": ["b"], "b": ["c"], "c": ["a"]},
        {"a": ["ok", "b"], "b": ["c"], "c": ["b"]},
    ],
)
def test_load_order_cycle_raises(edges: dict[str, list[str]]) -> None:
    with pytest.raises(ValueError, match="module dependency cycle through"):
        load_order(["a"], graph(edges))


def test_load_order_cycle_error_is_not_a_format_error() -> None:
    with pytest.raises(ValueError, match="cycle") as info:
        load_order(["a"], graph({"a": ["b"], "b": ["a"]}))
    assert not isinstance(info.value, ModuleFormatError)


def test_load_order_errors_from_depends_of_propagate() -> None:
    def depends_of(name: str) -> list[str]:
        if name == "broken":
            raise ModuleFormatError("no .modinfo section")
        return ["broken"]

    with pytest.raises(ModuleFormatError):
        load_order(["a"], depends_of)


def test_load_order_from_real_module_bytes() -> None:
    modules = {
        "virtio": module("name=virtio", "depends="),
        "virtio_ring": module("name=virtio_ring", "depends=virtio"),
        "virtio_blk": module(*VIRTIO_BLK),
        "virtio_net": module("name=virtio_net", "depends=net_failover,virtio_ring,virtio"),
        "net_failover": module("name=net_failover", "depends=failover"),
        "failover": module("name=failover"),
    }
    order = load_order(["virtio_blk", "virtio_net"], lambda n: dependencies(modules[n]))
    assert order == [
        "virtio",
        "virtio_ring",
        "virtio_blk",
        "failover",
        "net_failover",
        "virtio_net",
    ]


def _closure(names: list[str], edges: dict[str, list[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(edges[name])
    return seen


@st.composite
def dags(draw: st.DrawFn) -> tuple[dict[str, list[str]], list[str]]:
    """A random DAG (node i only depends on nodes with a larger index) and a wanted list."""
    size = draw(st.integers(1, 15))
    names = [f"m{i}" for i in draw(st.permutations(range(size)))]
    edges: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        later = names[i + 1 :]
        edges[name] = draw(st.lists(st.sampled_from(later), unique=True)) if later else []
    wanted = draw(st.lists(st.sampled_from(names), min_size=1, max_size=size + 2))
    return edges, wanted


@settings(max_examples=300)
@given(dags())
def test_load_order_property(case: tuple[dict[str, list[str]], list[str]]) -> None:
    edges, wanted = case
    order = load_order(wanted, graph(edges))
    # Exactly the wanted modules and everything they need, each once.
    assert len(order) == len(set(order))
    assert set(order) == _closure(wanted, edges)
    # Every module comes after all its dependencies.
    position = {name: i for i, name in enumerate(order)}
    for name in order:
        for dep in edges[name]:
            assert position[dep] < position[name], (dep, name, order)
    # Wanted modules that no wanted module needs keep the order of their first mention.
    roots = [
        w
        for w in dict.fromkeys(wanted)
        if all(w not in _closure(edges[other], edges) for other in wanted)
    ]
    assert [n for n in order if n in roots] == roots


@given(dags())
def test_load_order_cycle_anywhere_is_found(case: tuple[dict[str, list[str]], list[str]]) -> None:
    edges, wanted = case
    # Close a cycle: a module reachable from the first wanted one depends on it again.
    reachable = sorted(_closure([wanted[0]], edges))
    target = reachable[-1]
    cyclic = {**edges, target: [*edges[target], wanted[0]]}
    with pytest.raises(ValueError, match="cycle"):
        load_order(wanted, graph(cyclic))
