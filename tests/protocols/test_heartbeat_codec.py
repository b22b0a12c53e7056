"""Unit tests for vmcluster.protocols.heartbeat: the datagram codec and the replay guard."""

import hashlib
import hmac
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmcluster.protocols.heartbeat import (
    MAC_BYTES,
    MAGIC,
    MAX_NAME_BYTES,
    VERSION,
    Heartbeat,
    HeartbeatError,
    ReplayGuard,
    decode,
    encode,
)

KEY = b"k" * 32
OTHER_KEY = b"x" * 32
CLUSTER = "prod"


def beat(**changes: Any) -> Heartbeat:
    fields: dict[str, Any] = {
        "cluster": CLUSTER,
        "node": "n1",
        "network": "cluster1",
        "incarnation": 7,
        "seq": 42,
    }
    fields.update(changes)
    return Heartbeat(**fields)


def sign(body: bytes, key: bytes = KEY) -> bytes:
    """A datagram with ``body`` and a valid MAC: reaches the parser behind the MAC check."""
    return body + hmac.new(key, body, hashlib.sha256).digest()


def name_field(raw: bytes) -> bytes:
    return bytes([len(raw)]) + raw


def header(*, magic: bytes = MAGIC, version: int = VERSION, flags: int = 0) -> bytes:
    return struct.pack("!4sBBQQ", magic, version, flags, 7, 42)


def body_of(*names: bytes, magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    return header(magic=magic, version=version) + b"".join(name_field(n) for n in names)


# --- encode / decode ---------------------------------------------------------------------------


@pytest.mark.parametrize("paused", [False, True])
def test_round_trip(paused: bool) -> None:
    heartbeat = beat(paused=paused)
    assert decode(encode(heartbeat, KEY), KEY, cluster=CLUSTER) == heartbeat


def test_paused_flag_is_on_the_wire() -> None:
    running = encode(beat(paused=False), KEY)
    paused = encode(beat(paused=True), KEY)
    assert running[5] == 0
    assert paused[5] == 1
    assert decode(paused, KEY, cluster=CLUSTER).paused is True
    assert decode(running, KEY, cluster=CLUSTER).paused is False


def test_layout_matches_the_documented_format() -> None:
    datagram = encode(beat(), KEY)
    expected_body = body_of(b"prod", b"n1", b"cluster1")
    assert datagram == sign(expected_body)
    assert len(datagram) == len(expected_body) + MAC_BYTES


def test_extreme_counters_round_trip() -> None:
    for incarnation, seq in [(0, 0), (2**64 - 1, 2**64 - 1)]:
        heartbeat = beat(incarnation=incarnation, seq=seq)
        assert decode(encode(heartbeat, KEY), KEY, cluster=CLUSTER) == heartbeat


@pytest.mark.parametrize(("incarnation", "seq"), [(-1, 0), (0, -1), (2**64, 0), (0, 2**64)])
def test_counters_outside_64_bits_are_refused(incarnation: int, seq: int) -> None:
    with pytest.raises(ValueError, match="64 bits"):
        beat(incarnation=incarnation, seq=seq)


def test_wrong_key_is_rejected() -> None:
    datagram = encode(beat(), KEY)
    with pytest.raises(HeartbeatError, match="MAC"):
        decode(datagram, OTHER_KEY, cluster=CLUSTER)


def test_another_clusters_name_is_rejected() -> None:
    datagram = encode(beat(cluster="staging"), KEY)
    with pytest.raises(HeartbeatError, match="another cluster"):
        decode(datagram, KEY, cluster=CLUSTER)


def test_every_single_byte_corruption_is_rejected() -> None:
    datagram = encode(beat(paused=True), KEY)
    accepted = []
    for position in range(len(datagram)):
        for value in range(256):
            if value == datagram[position]:
                continue
            corrupt = bytearray(datagram)
            corrupt[position] = value
            try:
                decode(bytes(corrupt), KEY, cluster=CLUSTER)
            except HeartbeatError:
                continue
            accepted.append((position, value))
    assert accepted == []


def test_every_truncation_is_rejected() -> None:
    datagram = encode(beat(), KEY)
    for length in range(len(datagram)):
        with pytest.raises(HeartbeatError):
            decode(datagram[:length], KEY, cluster=CLUSTER)


def test_trailing_bytes_are_rejected_even_when_signed() -> None:
    body = body_of(b"prod", b"n1", b"cluster1") + b"\x00"
    with pytest.raises(HeartbeatError, match="trailing"):
        decode(sign(body), KEY, cluster=CLUSTER)


def test_bad_magic_is_rejected() -> None:
    datagram = sign(body_of(b"prod", b"n1", b"cluster1", magic=b"VMHX"))
    with pytest.raises(HeartbeatError, match="magic"):
        decode(datagram, KEY, cluster=CLUSTER)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_other_versions_are_rejected(version: int) -> None:
    datagram = sign(body_of(b"prod", b"n1", b"cluster1", version=version))
    with pytest.raises(HeartbeatError, match="version"):
        decode(datagram, KEY, cluster=CLUSTER)


@pytest.mark.parametrize("field", ["cluster", "node", "network"])
def test_names_of_63_bytes_are_accepted(field: str) -> None:
    longest = "a" * MAX_NAME_BYTES
    heartbeat = beat(**{field: longest})
    cluster = longest if field == "cluster" else CLUSTER
    assert decode(encode(heartbeat, KEY), KEY, cluster=cluster) == heartbeat


@pytest.mark.parametrize("field", ["cluster", "node", "network"])
def test_names_of_64_bytes_are_refused_at_construction(field: str) -> None:
    with pytest.raises(ValueError, match="1-63 bytes"):
        beat(**{field: "a" * (MAX_NAME_BYTES + 1)})


def test_name_limit_counts_utf8_bytes_not_characters() -> None:
    # "é" is two bytes in UTF-8: 31 of them (62 bytes) fit, 32 (64 bytes) do not.
    fits = beat(node="é" * 31)
    assert decode(encode(fits, KEY), KEY, cluster=CLUSTER).node == "é" * 31
    with pytest.raises(ValueError, match="1-63 bytes"):
        beat(node="é" * 32)


@pytest.mark.parametrize("field", ["cluster", "node", "network"])
def test_empty_names_are_refused_at_construction(field: str) -> None:
    with pytest.raises(ValueError, match="1-63 bytes"):
        beat(**{field: ""})


def test_oversized_or_empty_names_in_a_signed_datagram_are_rejected() -> None:
    for names in [
        (b"prod", b"a" * 64, b"cluster1"),
        (b"prod", b"", b"cluster1"),
        (b"prod", b"n1", b""),
    ]:
        with pytest.raises(HeartbeatError, match="1-63 bytes"):
            decode(sign(body_of(*names)), KEY, cluster=CLUSTER)


def test_unencodable_names_are_refused_at_construction() -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - UnicodeEncodeError is a ValueError
        beat(node="n\udcff")


@pytest.mark.parametrize("position", [0, 1, 2])
def test_non_utf8_names_are_rejected(position: int) -> None:
    names = [b"prod", b"n1", b"cluster1"]
    names[position] = b"\xff\xfe"
    with pytest.raises(HeartbeatError, match="UTF-8"):
        decode(sign(body_of(*names)), KEY, cluster=CLUSTER)


def test_a_name_running_past_the_body_is_rejected() -> None:
    body = header() + name_field(b"prod") + name_field(b"n1") + bytes([9]) + b"cluster1"
    with pytest.raises(HeartbeatError, match="truncated"):
        decode(sign(body), KEY, cluster=CLUSTER)


def test_a_missing_name_is_rejected() -> None:
    # Long enough to pass the length check, but the third name's length byte is missing.
    body = header() + name_field(b"prod") + name_field(b"n1-long-name")
    with pytest.raises(HeartbeatError, match="truncated"):
        decode(sign(body), KEY, cluster=CLUSTER)


# --- fuzz --------------------------------------------------------------------------------------

names_1_to_63 = st.text(min_size=1, max_size=63).filter(lambda s: len(s.encode()) <= 63)


@given(
    node=names_1_to_63,
    network=names_1_to_63,
    cluster=names_1_to_63,
    incarnation=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    paused=st.booleans(),
)
def test_any_valid_heartbeat_round_trips(
    node: str, network: str, cluster: str, incarnation: int, seq: int, paused: bool
) -> None:
    heartbeat = Heartbeat(
        cluster=cluster,
        node=node,
        network=network,
        incarnation=incarnation,
        seq=seq,
        paused=paused,
    )
    assert decode(encode(heartbeat, KEY), KEY, cluster=cluster) == heartbeat


def _decode_or_reject(datagram: bytes) -> None:
    try:
        result = decode(datagram, KEY, cluster=CLUSTER)
    except HeartbeatError:
        return
    assert isinstance(result, Heartbeat)
    assert result.cluster == CLUSTER


# Byte strings of every length, not only the short ones hypothesis favours.
any_bytes = st.integers(0, 160).flatmap(lambda n: st.binary(min_size=n, max_size=n))


@given(any_bytes)
def test_decode_of_arbitrary_bytes_raises_only_heartbeat_error(datagram: bytes) -> None:
    _decode_or_reject(datagram)


@given(any_bytes)
def test_decode_of_arbitrary_signed_bytes_raises_only_heartbeat_error(body: bytes) -> None:
    _decode_or_reject(sign(body))


@given(flags=st.integers(0, 255), tail=any_bytes)
def test_decode_of_signed_bodies_behind_a_valid_header_raises_only_heartbeat_error(
    flags: int, tail: bytes
) -> None:
    _decode_or_reject(sign(header(flags=flags) + tail))


# Name fields that are often almost right: our cluster's name, empty or oversized names,
# invalid UTF-8, length bytes a little off, missing or extra fields, trailing junk.
name_bytes = st.one_of(
    st.just(CLUSTER.encode()),
    st.just(b""),
    st.just(b"a" * 63),
    st.just(b"a" * 64),
    st.just(b"\xff"),
    st.binary(max_size=70),
    st.text(max_size=40).map(str.encode),
)
length_errors = st.one_of(st.just(0), st.integers(-2, 2))
fields = st.lists(st.tuples(name_bytes, length_errors), max_size=4)
junk = st.one_of(st.just(b""), st.binary(min_size=1, max_size=3))


@given(names=st.tuples(name_bytes, name_bytes, name_bytes), flags=st.integers(0, 255))
def test_decode_of_three_signed_name_fields_raises_only_heartbeat_error(
    names: tuple[bytes, bytes, bytes], flags: int
) -> None:
    body = header(flags=flags) + b"".join(bytes([len(n) % 256]) + n for n in names)
    _decode_or_reject(sign(body))


@given(fields=fields, flags=st.integers(0, 255), junk=junk)
def test_decode_of_malformed_signed_name_fields_raises_only_heartbeat_error(
    fields: list[tuple[bytes, int]], flags: int, junk: bytes
) -> None:
    body = header(flags=flags)
    for raw, length_error in fields:
        body += bytes([(len(raw) + length_error) % 256]) + raw
    _decode_or_reject(sign(body + junk))


# --- replay guard ------------------------------------------------------------------------------


def test_guard_accepts_increasing_seq() -> None:
    guard = ReplayGuard()
    assert [guard.accept(beat(seq=s)) for s in [1, 2, 3, 10]] == [True] * 4


def test_guard_rejects_duplicates() -> None:
    guard = ReplayGuard()
    assert guard.accept(beat(seq=5)) is True
    assert guard.accept(beat(seq=5)) is False


def test_guard_rejects_older_seq() -> None:
    guard = ReplayGuard()
    assert guard.accept(beat(seq=5)) is True
    assert guard.accept(beat(seq=4)) is False
    assert guard.accept(beat(seq=6)) is True


def test_guard_accepts_a_newer_incarnation_restarting_at_1() -> None:
    guard = ReplayGuard()
    assert guard.accept(beat(incarnation=7, seq=1000)) is True
    assert guard.accept(beat(incarnation=8, seq=1)) is True
    assert guard.accept(beat(incarnation=8, seq=2)) is True
    assert guard.accept(beat(incarnation=8, seq=1)) is False


def test_guard_rejects_an_older_incarnation() -> None:
    guard = ReplayGuard()
    assert guard.accept(beat(incarnation=8, seq=1)) is True
    assert guard.accept(beat(incarnation=7, seq=1000)) is False
    assert guard.accept(beat(incarnation=8, seq=2)) is True


def test_guard_tracks_node_network_pairs_independently() -> None:
    guard = ReplayGuard()
    assert guard.accept(beat(node="n1", network="cluster1", seq=10)) is True
    # The same (incarnation, seq) on another network or from another node is new.
    assert guard.accept(beat(node="n1", network="cluster2", seq=10)) is True
    assert guard.accept(beat(node="n2", network="cluster1", seq=10)) is True
    # Each pair keeps its own position.
    assert guard.accept(beat(node="n1", network="cluster2", seq=3)) is False
    assert guard.accept(beat(node="n2", network="cluster1", seq=11)) is True
    assert guard.accept(beat(node="n1", network="cluster1", seq=10)) is False
    assert guard.accept(beat(node="n1", network="cluster1", seq=11)) is True


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5)), max_size=40))
def test_guard_accepts_exactly_the_strictly_newer_heartbeats(
    arrivals: list[tuple[int, int]],
) -> None:
    guard = ReplayGuard()
    best: tuple[int, int] | None = None
    for incarnation, seq in arrivals:
        expected = best is None or (incarnation, seq) > best
        assert guard.accept(beat(incarnation=incarnation, seq=seq)) is expected
        if expected:
            best = (incarnation, seq)
