"""Cluster heartbeats: small UDP datagrams, authenticated with HMAC-SHA256 and the cluster key.

    offset  size  field
    0       4     magic b"VMHB"
    4       1     version (1)
    5       1     flags (bit 0: the sender is paused)
    6       8     incarnation (u64, new each time the sender's agent starts)
    14      8     seq (u64, grows by one per datagram per network)
    22      1+n   cluster name (u8 length, UTF-8)
    ...     1+n   sender node name
    ...     1+n   network name
    ...     32    HMAC-SHA256(key, everything before)

A receiver drops datagrams with a bad MAC, another cluster's name, or a (incarnation, seq) it has
already seen from that sender on that network (replay): see :class:`ReplayGuard`.
"""

import hashlib
import hmac
import struct
from dataclasses import dataclass

MAGIC = b"VMHB"
VERSION = 1
MAC_BYTES = 32
MAX_NAME_BYTES = 63
FLAG_PAUSED = 0x01
_HEADER = struct.Struct("!4sBBQQ")


class HeartbeatError(ValueError):
    """A datagram that is not a valid heartbeat of this cluster."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    cluster: str
    node: str
    network: str
    incarnation: int
    seq: int
    paused: bool = False

    def __post_init__(self) -> None:
        for field_name in ("cluster", "node", "network"):
            value = getattr(self, field_name)
            if not value or len(value.encode()) > MAX_NAME_BYTES:
                raise ValueError(f"heartbeat {field_name} must be 1-{MAX_NAME_BYTES} bytes")
        if not 0 <= self.incarnation < 2**64 or not 0 <= self.seq < 2**64:
            raise ValueError("heartbeat incarnation and seq must fit in 64 bits")


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def encode(heartbeat: Heartbeat, key: bytes) -> bytes:
    flags = FLAG_PAUSED if heartbeat.paused else 0
    body = bytearray(_HEADER.pack(MAGIC, VERSION, flags, heartbeat.incarnation, heartbeat.seq))
    for name in (heartbeat.cluster, heartbeat.node, heartbeat.network):
        raw = name.encode()
        body += bytes([len(raw)]) + raw
    return bytes(body) + _mac(key, bytes(body))


def decode(datagram: bytes, key: bytes, *, cluster: str) -> Heartbeat:
    """The heartbeat in ``datagram``; HeartbeatError if it is malformed, forged or foreign."""
    if len(datagram) < _HEADER.size + 3 + MAC_BYTES:
        raise HeartbeatError("datagram too short")
    body, mac = datagram[:-MAC_BYTES], datagram[-MAC_BYTES:]
    magic, version, flags, incarnation, seq = _HEADER.unpack_from(body)
    if magic != MAGIC:
        raise HeartbeatError("not a heartbeat (bad magic)")
    if version != VERSION:
        raise HeartbeatError(f"unsupported heartbeat version {version}")
    if not hmac.compare_digest(mac, _mac(key, body)):
        raise HeartbeatError("bad MAC (wrong cluster key or corrupted)")
    names = []
    offset = _HEADER.size
    for _ in range(3):
        if offset >= len(body):
            raise HeartbeatError("truncated heartbeat")
        length = body[offset]
        raw = body[offset + 1 : offset + 1 + length]
        if len(raw) != length:
            raise HeartbeatError("truncated heartbeat")
        try:
            names.append(raw.decode())
        except UnicodeDecodeError:
            raise HeartbeatError("heartbeat name is not UTF-8") from None
        offset += 1 + length
    if offset != len(body):
        raise HeartbeatError("trailing bytes in heartbeat")
    if names[0] != cluster:
        raise HeartbeatError(f"heartbeat from another cluster ({names[0]!r})")
    try:
        return Heartbeat(cluster=names[0], node=names[1], network=names[2], seq=seq,
                         incarnation=incarnation, paused=bool(flags & FLAG_PAUSED))  # fmt: skip
    except ValueError as exc:
        raise HeartbeatError(str(exc)) from None


class ReplayGuard:
    """Accepts each (sender, network) heartbeat once, in increasing order per incarnation.

    A sender's new incarnation (its agent restarted) is accepted when it is larger than the last
    one seen; the sequence then starts over.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[int, int]] = {}

    def accept(self, heartbeat: Heartbeat) -> bool:
        key = (heartbeat.node, heartbeat.network)
        current = (heartbeat.incarnation, heartbeat.seq)
        last = self._last.get(key)
        if last is not None and current <= last:
            return False
        self._last[key] = current
        return True
