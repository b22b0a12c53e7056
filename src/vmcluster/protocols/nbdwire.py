"""The NBD protocol's wire format: magics, codes, flags, the fixed structures, and errors.

Pure. Shared by the server side (:mod:`vmcluster.protocols.nbdserver`) and the client side
(:mod:`vmcluster.protocols.nbdclient`) of vmcluster's NBD codec, which follows the protocol of
https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md (fixed newstyle only).

Two kinds of protocol error, as in every codec of this project:

- :class:`RemoteProtocolError`: the peer broke the protocol (bad magic, impossible lengths,
  a reply to no request). The connection cannot go on: the shell hard-disconnects.
- :class:`LocalProtocolError`: our own side asked for something the protocol or the negotiated
  state forbids (a request in the handshake, a read past the export's end). A bug of the caller;
  nothing was sent.
"""

import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

# ----- magics -----

NBDMAGIC = 0x4E42444D41474943  # b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # b"IHAVEOPT": newstyle greeting and every option's header
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# ----- sizes and limits -----

MAX_STRING_BYTES = 4096  # export names, descriptions, error messages, context names
MAX_OPTION_BYTES = 65536  # an option's data; longer is taken as an attack (hard disconnect)
MAX_PAYLOAD_BYTES = 1 << 25  # 32 MiB: the largest READ/WRITE the protocol says never to refuse
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
SECTOR_BYTES = 512


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Rep(IntEnum):
    """Option reply types; those with bit 31 set are errors."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9


def is_error_reply(rep: int) -> bool:
    return bool(rep & _ERR)


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


# Which command flags each command may carry (FUA is accepted on all, as the protocol asks).
ALLOWED_FLAGS: dict[Cmd, CmdFlag] = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}

# The transmission flag a server sets to allow a command (None: always allowed).
COMMAND_NEEDS: dict[Cmd, TransmissionFlag | None] = {
    Cmd.READ: None,
    Cmd.WRITE: None,
    Cmd.DISC: None,
    Cmd.FLUSH: TransmissionFlag.SEND_FLUSH,
    Cmd.TRIM: TransmissionFlag.SEND_TRIM,
    Cmd.CACHE: TransmissionFlag.SEND_CACHE,
    Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
    Cmd.BLOCK_STATUS: None,  # needs a negotiated metadata context instead
}

WRITING_COMMANDS = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})


class ReplyFlag(IntFlag):
    DONE = 1 << 0


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_TYPE_ERROR_BIT = 1 << 15


class Errno(IntEnum):
    """The protocol's error values (a reply's ``error``)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0  # base:allocation status bits
STATE_ZERO = 1 << 1

# ----- fixed structures (network byte order) -----

GREETING = struct.Struct("!QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct("!I")
OPTION_HEADER = struct.Struct("!QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct("!QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct("!QH")  # size, transmission flags (+124 zeroes unless NO_ZEROES)
EXPORT_NAME_ZEROES = 124
REQUEST = struct.Struct("!IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct("!IIQ")  # magic, error, cookie
STRUCTURED_HEADER = struct.Struct("!IHHQI")  # magic, flags, type, cookie, length
INFO_EXPORT = struct.Struct("!HQH")  # type, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct("!HIII")  # type, minimum, preferred, maximum payload
U16 = struct.Struct("!H")
U32 = struct.Struct("!I")
U64 = struct.Struct("!Q")
EXTENT = struct.Struct("!II")  # length, status flags
ERROR_CHUNK = struct.Struct("!IH")  # error, message length


class NbdError(Exception):
    """Root of the codec's errors."""


class RemoteProtocolError(NbdError):
    """The peer sent something the protocol forbids; the connection must be dropped."""


class LocalProtocolError(NbdError):
    """Our own side asked for something the protocol or the negotiated state forbids."""


class OptionRefused(NbdError):
    """The server answered an option with an error reply (export unknown, policy, ...)."""

    def __init__(self, option: int, reply: int, message: str) -> None:
        self.option = option
        self.reply = reply
        self.message = message
        name = Rep(reply).name if reply in Rep._value2member_map_ else hex(reply)
        super().__init__(f"NBD server refused option {option}: {name}" +
                         (f" ({message})" if message else ""))  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class ExportInfo:
    """One export as the handshake describes it: size, transmission flags, block sizes."""

    name: str
    size: int
    flags: int = TransmissionFlag.HAS_FLAGS
    min_block: int = DEFAULT_MIN_BLOCK
    preferred_block: int = DEFAULT_PREFERRED_BLOCK
    max_payload: int = MAX_PAYLOAD_BYTES
    description: str = ""
    meta_contexts: tuple[str, ...] = field(default=())  # contexts a client may select

    def __post_init__(self) -> None:
        if len(self.name.encode()) > MAX_STRING_BYTES:
            raise ValueError(f"NBD export name longer than {MAX_STRING_BYTES} bytes")
        if not 0 <= self.size < 2**63:
            raise ValueError(f"NBD export {self.name!r}: size {self.size} out of range")
        check_block_sizes(self.min_block, self.preferred_block, self.max_payload)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.READ_ONLY)

    def allows(self, command: Cmd) -> bool:
        needs = COMMAND_NEEDS[command]
        return needs is None or bool(self.flags & needs)


def check_block_sizes(minimum: int, preferred: int, maximum: int) -> None:
    """The protocol's rules for NBD_INFO_BLOCK_SIZE (ValueError if broken)."""
    if minimum < 1 or minimum > 65536 or minimum & (minimum - 1):
        raise ValueError(f"NBD minimum block size {minimum} is not a power of 2 up to 64 KiB")
    if preferred < max(minimum, SECTOR_BYTES) or preferred & (preferred - 1):
        raise ValueError(f"NBD preferred block size {preferred} is not a power of 2 >= 512")
    if maximum < preferred or maximum > 0xFFFFFFFF:
        raise ValueError(f"NBD maximum payload {maximum} is below the preferred block size")
    if maximum % minimum:
        raise ValueError(f"NBD maximum payload {maximum} is not a multiple of {minimum}")


def decode_string(raw: bytes | bytearray | memoryview, what: str) -> str:
    if len(raw) > MAX_STRING_BYTES:
        raise RemoteProtocolError(f"NBD {what} longer than {MAX_STRING_BYTES} bytes")
    try:
        return bytes(raw).decode()
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"NBD {what} is not UTF-8") from None


class Buffer:
    """Received bytes not parsed yet; consumed from the front without quadratic copying.

    ``data[pos:]`` is what is left; the codecs read ``data`` and ``pos`` directly on their hot
    paths (a method call per field costs more than the parsing). A read that leaves nothing
    over is kept as it came (``bytes``: no copy); only a remainder that more bytes must join is
    copied, once, into a bytearray of the buffer's own."""

    __slots__ = ("_owned", "data", "pos")

    def __init__(self) -> None:
        self.data: bytes | bytearray = b""
        self.pos = 0
        self._owned = False  # data is a bytearray of ours, which may grow

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.pos == len(self.data):  # all consumed: take the new bytes as they are
            self.data = data if type(data) is bytes else bytes(data)
            self.pos = 0
            self._owned = False
            return
        if not self._owned:
            self.data = bytearray(memoryview(self.data)[self.pos :])
            self.pos = 0
            self._owned = True
        elif self.pos > 1 << 16:
            del self.data[: self.pos]  # type: ignore[union-attr]  # owned: a bytearray
            self.pos = 0
        self.data += data

    def __len__(self) -> int:
        return len(self.data) - self.pos

    def peek_struct(self, fmt: struct.Struct) -> tuple[int, ...] | None:
        if len(self.data) - self.pos < fmt.size:
            return None
        values: tuple[int, ...] = fmt.unpack_from(self.data, self.pos)
        return values

    def take(self, count: int) -> bytes:
        assert count <= len(self.data) - self.pos
        pos = self.pos
        self.pos = pos + count
        return bytes(self.data[pos : pos + count])

    def skip(self, count: int) -> None:
        assert count <= len(self.data) - self.pos
        self.pos += count


class Sink:
    """A payload that came only in part (a 1 MiB read or write arrives in several reads): the
    rest is copied straight into a buffer of its final size as it comes, instead of joining
    the pieces first and copying the whole out after. Its size is checked before it exists."""

    __slots__ = ("data", "filled")

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.filled = 0

    def fill_from(self, buf: Buffer) -> bool:
        """Move what ``buf`` holds of the payload; True once it is all here."""
        count = min(len(buf.data) - buf.pos, len(self.data) - self.filled)
        if count:
            filled, pos = self.filled, buf.pos
            with memoryview(buf.data) as view:
                self.data[filled : filled + count] = view[pos : pos + count]
            self.filled = filled + count
            buf.pos = pos + count
        return self.filled == len(self.data)
