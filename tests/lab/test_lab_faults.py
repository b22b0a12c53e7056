"""Unit tests for the pure helpers of vmcluster.lab.faults: describe() and _burst_bytes()."""

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmcluster.errors import InvalidInput
from vmcluster.lab.faults import _burst_bytes, describe

# ----- describe -----


@pytest.mark.parametrize(
    ("fault", "text"),
    [
        ({"kind": "crash", "host": "n1", "at": 1700000000.5}, "crash n1"),
        ({"kind": "link", "host": "a2", "network": "storage-b"}, "link a2 storage-b down"),
        ({"kind": "partition", "a": ["n1"], "b": ["n2", "n3"]}, "partition n1 / n2 n3"),
        (
            {"kind": "partition", "a": ["n1", "witness"], "b": ["n2"]},
            "partition n1 witness / n2",
        ),
        ({"kind": "freeze", "host": "n3", "role": "agent"}, "freeze n3 (agent)"),
        ({"kind": "freeze", "host": "witness", "role": "etcd"}, "freeze witness (etcd)"),
        (
            {"kind": "slow", "host": "n2", "network": "cluster1", "rate": "1mbit"},
            "slow n2 cluster1 1mbit",
        ),
    ],
)
def test_describe_each_kind(fault: dict[str, Any], text: str) -> None:
    assert describe(fault) == text


def test_describe_unknown_kind_shows_the_record() -> None:
    fault = {"kind": "meteor", "host": "n1"}
    assert describe(fault) == str(fault)


def test_describe_does_not_change_the_fault() -> None:
    fault = {"kind": "partition", "a": ["n1"], "b": ["n2"]}
    describe(fault)
    assert fault == {"kind": "partition", "a": ["n1"], "b": ["n2"]}


# ----- _burst_bytes -----


@pytest.mark.parametrize(
    ("rate", "bits_per_s"),
    [
        ("1mbit", 1e6),
        ("500kbit", 5e5),
        ("1.5gbit", 1.5e9),
        ("8kbit", 8e3),
        ("8000bit", 8e3),
        ("10mbit", 1e7),
        ("100mbit", 1e8),
        ("2gbit", 2e9),
        ("0.5mbit", 5e5),
        ("12.8kbit", 12.8e3),
        ("1280kbit", 1.28e6),
    ],
)
def test_burst_bytes_valid_rates(rate: str, bits_per_s: float) -> None:
    burst = _burst_bytes(rate)
    assert isinstance(burst, int)
    assert burst >= 1600
    ten_ms = bits_per_s / 8 * 0.010
    if ten_ms >= 1600:
        assert abs(burst - ten_ms) <= 1, (rate, burst, ten_ms)
    else:
        assert burst == 1600


def test_burst_bytes_concrete_values() -> None:
    assert _burst_bytes("1mbit") == 1600  # 1250 bytes in 10 ms: at least one packet
    assert _burst_bytes("8kbit") == 1600
    assert _burst_bytes("10mbit") == 12500
    assert _burst_bytes("1.5gbit") == 1_875_000
    assert _burst_bytes("1gbit") == 1_250_000


@pytest.mark.parametrize(
    "rate",
    [
        "fast",
        "1mb",
        "7kbit",
        "",
        "7999bit",
        "0mbit",
        "0.001mbit",
        "mbit",
        "1 mbit",
        "1mbit ",
        "1Mbit",
        "-1mbit",
        "1e6bit",
        "1.mbit",
        ".5mbit",
        "1mbps",
        "1tbit",
        "\u0661mbit",  # an Arabic-Indic digit one: not ASCII
    ],
)
def test_burst_bytes_invalid_rates(rate: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(f"invalid rate {rate!r}")):
        _burst_bytes(rate)


def test_burst_bytes_too_slow_says_the_minimum() -> None:
    with pytest.raises(InvalidInput, match="at least 8kbit"):
        _burst_bytes("7kbit")


def test_burst_bytes_bad_syntax_says_the_units() -> None:
    with pytest.raises(InvalidInput, match=r"bit, kbit, mbit or gbit"):
        _burst_bytes("1mb")


@given(
    st.integers(min_value=8, max_value=10**7).map(lambda k: f"{k}kbit")
    | st.integers(min_value=8000, max_value=10**10).map(lambda b: f"{b}bit")
)
def test_burst_bytes_is_ten_ms_or_one_packet(rate: str) -> None:
    bits = int(rate.removesuffix("kbit")) * 1000 if rate.endswith("kbit") else int(rate[:-3])
    burst = _burst_bytes(rate)
    assert burst == max(1600, bits // 800)


@given(st.integers(min_value=1, max_value=7999))
def test_burst_bytes_refuses_below_8kbit(bits: int) -> None:
    with pytest.raises(InvalidInput, match=re.escape(f"invalid rate '{bits}bit'")):
        _burst_bytes(f"{bits}bit")
