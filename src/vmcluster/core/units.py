"""Sizes as people write them ("256M", "1.5G", "512MiB") and as vmcluster stores them (bytes)."""

import re

from vmcluster.errors import InvalidInput

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TIB = 1024 * GIB

_UNITS = {"": 1, "B": 1, "K": KIB, "M": MIB, "G": GIB, "T": TIB}
_SIZE_RE = re.compile(
    r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:I?B)?|(B))?\s*", re.IGNORECASE | re.ASCII
)


def parse_size(text: str, *, what: str, default_unit: str = "") -> int:
    """Parse a size such as ``256M`` or ``1.5GiB`` into bytes (units are powers of 1024).

    A bare number is in ``default_unit`` ("" for bytes, "M" for MiB). The result must be a whole
    number of bytes. ``what`` names the value in the error message.
    """
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise InvalidInput(
            f"invalid {what} {text!r}: use a number with an optional unit K, M, G, T"
        )
    number, unit, byte_unit = match.group(1), (match.group(2) or "").upper(), match.group(3)
    has_unit = bool(unit or byte_unit)
    multiplier = _UNITS[unit] if has_unit else _UNITS[default_unit.upper()]
    whole, _, frac = number.partition(".")
    numerator = int(whole + frac) * multiplier
    denominator = 10 ** len(frac)
    if numerator % denominator:
        raise InvalidInput(f"invalid {what} {text!r}: not a whole number of bytes")
    return int(numerator // denominator)


def format_size(size_bytes: int) -> str:
    """The shortest exact form of a size: 268435456 -> '256M', 1536 -> '1536' (bytes)."""
    for unit, factor in (("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB)):
        if size_bytes >= factor and size_bytes % factor == 0:
            return f"{size_bytes // factor}{unit}"
    return str(size_bytes)


def human_size(size_bytes: int) -> str:
    """An approximate size for people: 1189979 -> '1.1 MiB'."""
    if size_bytes < KIB:
        return f"{size_bytes} B"
    for unit, factor in (("KiB", KIB), ("MiB", MIB), ("GiB", GIB)):
        shown = f"{size_bytes / factor:.1f}"
        if float(shown) < 1024:
            return f"{shown} {unit}"
    return f"{size_bytes / TIB:.1f} TiB"


_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*", re.IGNORECASE | re.ASCII)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_duration(text: str, *, what: str) -> float:
    """Parse a duration such as ``90``, ``90s``, ``10m`` or ``1.5h`` into seconds."""
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise InvalidInput(f"invalid {what} {text!r}: use a number of seconds, or with s, m, h")
    return float(match.group(1)) * _SECONDS[(match.group(2) or "").lower()]
