"""Unit tests for vmcluster.core.units: parsing and formatting sizes."""

import re
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmcluster.core.units import GIB, KIB, MIB, TIB, format_size, human_size, parse_size
from vmcluster.errors import InvalidInput

FACTORS = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": TIB}


def test_unit_constants_are_powers_of_1024() -> None:
    assert (KIB, MIB, GIB, TIB) == (2**10, 2**20, 2**30, 2**40)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("1", 1),
        ("1536", 1536),
        ("10B", 10),
        ("10b", 10),
        ("1K", KIB),
        ("1k", KIB),
        ("1KB", KIB),
        ("1KiB", KIB),
        ("1kib", KIB),
        ("256M", 256 * MIB),
        ("256m", 256 * MIB),
        ("256MB", 256 * MIB),
        ("512MiB", 512 * MIB),
        ("512MIB", 512 * MIB),
        ("2G", 2 * GIB),
        ("1.5G", 3 * GIB // 2),
        ("1.5GiB", 3 * GIB // 2),
        ("3T", 3 * TIB),
        ("0.5K", 512),
        ("1.25K", 1280),
        ("1.0", 1),
        ("2.000", 2),
        ("007M", 7 * MIB),
        (" 2 G ", 2 * GIB),
        ("\t64 MiB\n", 64 * MIB),
        ("0M", 0),
    ],
)
def test_parse_size_accepts(text: str, expected: int) -> None:
    assert parse_size(text, what="size") == expected


@pytest.mark.parametrize(
    ("text", "default_unit", "expected"),
    [
        ("256", "M", 256 * MIB),
        ("256", "m", 256 * MIB),
        ("1.5", "M", 3 * MIB // 2),
        ("4", "G", 4 * GIB),
        ("256", "", 256),
        ("256B", "M", 256),  # an explicit byte suffix beats the default unit
        ("256b", "M", 256),
        ("256K", "M", 256 * KIB),
        ("2G", "M", 2 * GIB),
    ],
)
def test_parse_size_default_unit(text: str, default_unit: str, expected: int) -> None:
    assert parse_size(text, what="memory", default_unit=default_unit) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "M",
        "abc",
        "-1",
        "+1",
        "-1M",
        "1.",
        ".5",
        "1..5",
        "1.5.2",
        "1e3",
        "0x10",
        "1,5M",
        "1 .5M",
        "1KK",
        "1MiBB",
        "1BB",
        "1P",
        "1PiB",
        "1 MB extra",
        "1 2",
        "M1",
    ],
)
def test_parse_size_rejects_malformed(text: str) -> None:
    with pytest.raises(InvalidInput, match="use a number with an optional unit") as info:
        parse_size(text, what="disk size")
    message = str(info.value)
    assert message.startswith(f"invalid disk size {text!r}")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "default_unit"),
    [("1.5", ""), ("0.1K", ""), ("1.5B", ""), ("0.0000001M", ""), ("1.5", "B"), ("1.0000001", "M")],
)
def test_parse_size_rejects_fractional_bytes(text: str, default_unit: str) -> None:
    with pytest.raises(InvalidInput, match="not a whole number of bytes") as info:
        parse_size(text, what="size", default_unit=default_unit)
    assert repr(text) in str(info.value)


@given(
    number=st.integers(min_value=0, max_value=10**9),
    unit=st.sampled_from(["", "K", "M", "G", "T"]),
    suffix=st.sampled_from(["", "B", "iB", "b", "ib"]),
    lower=st.booleans(),
    space=st.sampled_from(["", " ", "  "]),
)
def test_parse_size_integer_with_unit(
    number: int, unit: str, suffix: str, lower: bool, space: str
) -> None:
    if unit == "" and suffix.lower() == "ib":
        suffix = "B"
    unit_text = unit.lower() if lower else unit
    text = f"{number}{space}{unit_text}{suffix}"
    assert parse_size(text, what="size") == number * FACTORS[unit]


@given(
    whole=st.integers(min_value=0, max_value=10**6),
    frac=st.text(alphabet="0123456789", min_size=1, max_size=8),
    unit=st.sampled_from(["", "K", "M", "G", "T"]),
)
def test_parse_size_decimal_is_exact(whole: int, frac: str, unit: str) -> None:
    exact = Fraction(f"{whole}.{frac}") * FACTORS[unit]
    text = f"{whole}.{frac}{unit}"
    if exact.denominator == 1:
        assert parse_size(text, what="size") == exact.numerator
    else:
        with pytest.raises(InvalidInput, match="not a whole number of bytes"):
            parse_size(text, what="size")


@given(st.integers(min_value=0, max_value=2**62))
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size), what="size") == size


@given(st.integers(min_value=0, max_value=2**62))
def test_format_size_uses_largest_exact_unit(size: int) -> None:
    text = format_size(size)
    match = re.fullmatch(r"(\d+)([KMGT]?)", text)
    assert match is not None, text
    number, unit = int(match.group(1)), match.group(2)
    assert number * FACTORS[unit] == size
    if unit != "T":
        # No larger unit would have been exact (unless the number would be zero).
        bigger = ["K", "M", "G", "T"][["", "K", "M", "G"].index(unit) :]
        for other in bigger:
            assert size < FACTORS[other] or size % FACTORS[other] != 0


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, "0"),
        (1, "1"),
        (1023, "1023"),
        (1024, "1K"),
        (1536, "1536"),
        (1025, "1025"),
        (MIB, "1M"),
        (268435456, "256M"),
        (MIB + KIB, "1025K"),
        (GIB, "1G"),
        (3 * GIB // 2, "1536M"),
        (TIB, "1T"),
        (1024 * TIB, "1024T"),
        (64 * TIB, "64T"),
    ],
)
def test_format_size_examples(size: int, expected: str) -> None:
    assert format_size(size) == expected


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1189979, "1.1 MiB"),
        (MIB, "1.0 MiB"),
        (10 * MIB + 512 * KIB, "10.5 MiB"),
        (GIB, "1.0 GiB"),
        (3 * GIB, "3.0 GiB"),
        (TIB, "1.0 TiB"),
        (5 * TIB + TIB // 2, "5.5 TiB"),
        (2048 * TIB, "2048.0 TiB"),
    ],
)
def test_human_size_examples(size: int, expected: str) -> None:
    assert human_size(size) == expected


@given(st.integers(min_value=0, max_value=2**60))
def test_human_size_is_close_to_the_value(size: int) -> None:
    text = human_size(size)
    match = re.fullmatch(r"(\d+(?:\.\d)?) (B|KiB|MiB|GiB|TiB)", text)
    assert match is not None, text
    factor = {"B": 1, "KiB": KIB, "MiB": MIB, "GiB": GIB, "TiB": TIB}[match.group(2)]
    shown = float(match.group(1)) * factor
    # One decimal place: the shown value is within 0.05 of a unit of the true one.
    assert abs(shown - size) <= 0.05 * factor + 0.5
    if match.group(2) == "B":
        assert size < 1024
        assert "." not in match.group(1)


@pytest.mark.parametrize("text", ["10iB", "10i", "\u0661\u0662M", "1 KiBB"])
def test_parse_size_rejects_malformed_units_and_non_ascii_digits(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid disk size"):
        parse_size(text, what="disk size")


@pytest.mark.parametrize(
    ("size", "shown"),
    [(1023, "1023 B"), (1048575, "1.0 MiB"), (1536, "1.5 KiB"), (3 * 1024**4, "3.0 TiB")],
)
def test_human_size_never_shows_1024_of_a_unit(size: int, shown: str) -> None:
    assert human_size(size) == shown
