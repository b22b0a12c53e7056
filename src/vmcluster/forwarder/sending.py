"""Handing a codec's queued chunks to a transport in one write."""

import asyncio

JOIN_BELOW_BYTES = 64 << 10


def send_chunks(transport: asyncio.Transport, out: list[bytes | bytearray]) -> None:
    """One write for every chunk (one segment where it fits). Small ones are joined: a copy of
    a few KiB costs less than uvloop's vectored write (a write context and a buffer list per
    call); large ones go vectored, without a copy of the payload."""
    if len(out) == 1:
        transport.write(out[0])
    elif sum(map(len, out)) < JOIN_BELOW_BYTES:
        transport.write(b"".join(out))
    else:
        transport.writelines(out)
