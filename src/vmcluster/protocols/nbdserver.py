"""The server side of an NBD connection, sans-IO: bytes in, events and bytes out.

    conn = ServerConnection(lookup=exports.get, names=lambda: exports)
    transport.write(conn.data_to_send())           # the greeting
    for ev in conn.receive_data(chunk): ...        # Ready, Request, Refused, Disconnect, StartTls
    conn.reply(cookie) / conn.reply_read(cookie, data) / conn.reply_error(cookie, errno)
    transport.write(conn.data_to_send())

Fixed newstyle only. Options: EXPORT_NAME, ABORT, LIST, STARTTLS, INFO, GO, STRUCTURED_REPLY,
LIST_META_CONTEXT and SET_META_CONTEXT (contexts are whatever the export names, in practice
``base:allocation``); anything else is answered ``NBD_REP_ERR_UNSUP``. In transmission every
request is checked against the export (command advertised, flags valid for the command, bounds,
minimum block alignment, maximum payload, read-only) and a bad one is answered with the error the
protocol names, without reaching the caller (a :class:`Refused` event says so). What cannot be
answered (bad magic, an option or payload too large to be anything but an attack, a cookie already
in flight) raises :class:`RemoteProtocolError`: the shell hard-disconnects.
"""

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum, auto

from vmcluster.protocols.nbdwire import (
    ALLOWED_FLAGS,
    CLIENT_FLAGS,
    ERROR_CHUNK,
    EXPORT_NAME_REPLY,
    EXPORT_NAME_ZEROES,
    EXTENT,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_OPTION_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_STRING_BYTES,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_HEADER,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    U64,
    WRITING_COMMANDS,
    Buffer,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    ExportInfo,
    HandshakeFlag,
    Info,
    LocalProtocolError,
    Option,
    RemoteProtocolError,
    Rep,
    ReplyFlag,
    ReplyType,
    Sink,
    TransmissionFlag,
    decode_string,
)

_REQUEST_SIZE = REQUEST.size
_unpack_request = REQUEST.unpack_from
_WRITE, _DISC, _FLUSH = int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH)
MAX_OPTIONS = 1024  # options in one handshake before the client is taken for a denial of service
_KNOWN_CLIENT_FLAGS = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
_ALIGNED = frozenset({Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE,
                      Cmd.BLOCK_STATUS})  # fmt: skip


class TlsPolicy(Enum):
    NONE = auto()  # STARTTLS refused (NBD_REP_ERR_POLICY)
    ALLOWED = auto()  # STARTTLS accepted, plain clients served too
    REQUIRED = auto()  # everything but STARTTLS and ABORT refused until TLS runs


class _State(Enum):
    CLIENT_FLAGS = auto()
    OPTIONS = auto()
    AWAIT_TLS = auto()  # STARTTLS acknowledged; the shell wraps the socket, then tls_started()
    TRANSMISSION = auto()
    CLOSED = auto()


@dataclass(frozen=True, slots=True)
class Ready:
    """The handshake is over: transmission on ``export``."""

    export: ExportInfo
    structured: bool
    contexts: dict[int, str]  # negotiated metadata contexts by id


@dataclass(frozen=True, slots=True)
class Request:
    """A valid request for the caller to carry out, then answer with the same cookie."""

    cookie: int
    command: Cmd
    flags: int
    offset: int
    length: int
    data: bytes | bytearray = b""  # WRITE's payload (a bytearray when it came in parts)


@dataclass(frozen=True, slots=True)
class Refused:
    """A request the codec answered itself with ``error`` (it never reaches the caller)."""

    cookie: int
    command: int
    error: Errno
    reason: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client ended the session (NBD_CMD_DISC, NBD_OPT_ABORT) or must be dropped (an
    unknown export through NBD_OPT_EXPORT_NAME): send what is queued, then close."""

    reason: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS was acknowledged: wrap the connection, then call ``tls_started()``."""


ServerEvent = Ready | Request | Refused | Disconnect | StartTls


@dataclass(slots=True)
class _Pending:
    command: Cmd
    offset: int
    length: int


@dataclass(slots=True)
class _Negotiation:
    structured: bool = False
    context_export: str | None = None
    contexts: dict[int, str] = field(default_factory=dict)


class ServerConnection:
    """One client's connection. ``lookup(name)`` gives an export (None: unknown); ``names()``
    the exports NBD_OPT_LIST shows."""

    def __init__(
        self,
        lookup: Callable[[str], ExportInfo | None],
        *,
        names: Callable[[], Iterable[str]] = lambda: (),
        tls: TlsPolicy = TlsPolicy.NONE,
    ) -> None:
        self._lookup = lookup
        self._names = names
        self._tls = tls
        self._tls_active = False
        self._state = _State.CLIENT_FLAGS
        self._in = Buffer()
        self._out: list[bytes | bytearray] = []
        self._no_zeroes = False
        self._options = 0
        self._neg = _Negotiation()
        self.export: ExportInfo | None = None
        self.structured = False
        self.contexts: dict[int, str] = {}
        self._pending: dict[int, _Pending] = {}
        self._fast: dict[int, tuple[Cmd, int, int]] = {}
        self._size = 0
        self._align = 0
        self._sink: Sink | None = None  # a write's payload that came only in part
        self._sink_header: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
        self._sink_limit = 0  # the export's maximum payload
        flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        self._out.append(GREETING.pack(NBDMAGIC, IHAVEOPT, flags))

    # ----- I/O edges -----

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        first = self._out[0]
        data = first if len(self._out) == 1 and type(first) is bytes else b"".join(self._out)
        self._out.clear()
        return data

    def chunks_to_send(self) -> list[bytes | bytearray]:
        """What :meth:`data_to_send` gives, unjoined (for a vectored write: no copy)."""
        out, self._out = self._out, []
        return out

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def take_unparsed(self) -> bytes:
        """Bytes received after STARTTLS, which belong to the TLS layer."""
        return self._in.take(len(self._in))

    def tls_started(self) -> None:
        if self._state is not _State.AWAIT_TLS:
            raise LocalProtocolError("tls_started() without an acknowledged STARTTLS")
        self._tls_active = True
        self._neg = _Negotiation()  # nothing negotiated before TLS survives it
        self._state = _State.OPTIONS

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ServerEvent]:
        if self._state is _State.CLOSED:
            return []
        self._in.feed(data)
        events: list[ServerEvent] = []
        while True:
            state = self._state
            if state is _State.TRANSMISSION:
                if self._sink is not None:
                    if not self._sink_step(events):
                        break
                elif not self._transmission_step(events):
                    break
            elif state is _State.OPTIONS:
                if not self._option_step(events):
                    break
            elif state is _State.CLIENT_FLAGS:
                if not self._client_flags_step():
                    break
            else:  # CLOSED, or AWAIT_TLS: the rest is TLS's
                break
        return events

    # ----- handshake -----

    def _client_flags_step(self) -> bool:
        values = self._in.peek_struct(CLIENT_FLAGS)
        if values is None:
            return False
        self._in.skip(CLIENT_FLAGS.size)
        (flags,) = values
        if flags & ~int(_KNOWN_CLIENT_FLAGS):
            raise RemoteProtocolError(f"NBD client sent unknown client flags {flags:#x}")
        self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self._state = _State.OPTIONS
        return True

    def _option_step(self, events: list[ServerEvent]) -> bool:
        header = self._in.peek_struct(OPTION_HEADER)
        if header is None:
            return False
        magic, option, length = header
        if magic != IHAVEOPT:
            raise RemoteProtocolError(f"NBD option with bad magic {magic:#x}")
        if length > MAX_OPTION_BYTES:
            raise RemoteProtocolError(f"NBD option {option} of {length} bytes: too large")
        if len(self._in) < OPTION_HEADER.size + length:
            return False
        self._in.skip(OPTION_HEADER.size)
        data = self._in.take(length)
        self._options += 1
        if self._options > MAX_OPTIONS:
            raise RemoteProtocolError(f"NBD client sent more than {MAX_OPTIONS} options")
        self._option(option, data, events)
        return True

    def _reply(self, option: int, rep: Rep, data: bytes = b"") -> None:
        self._out.append(OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, rep, len(data)))
        if data:
            self._out.append(data)

    def _error(self, option: int, rep: Rep, message: str) -> None:
        self._reply(option, rep, message.encode()[:MAX_STRING_BYTES])

    def _option(self, option: int, data: bytes, events: list[ServerEvent]) -> None:
        if option == Option.ABORT:
            self._reply(option, Rep.ACK)
            self._close(events, "client aborted the handshake")
            return
        if option == Option.STARTTLS:
            self._starttls(data, events)
            return
        if self._tls is TlsPolicy.REQUIRED and not self._tls_active:
            if option == Option.EXPORT_NAME:
                self._close(events, "TLS required before NBD_OPT_EXPORT_NAME")
            else:
                self._error(option, Rep.ERR_TLS_REQD, "this server requires TLS")
            return
        if option == Option.EXPORT_NAME:
            self._export_name(data, events)
        elif option in (Option.INFO, Option.GO):
            self._info_or_go(option, data, events)
        elif option == Option.LIST:
            if data:
                self._error(option, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
                return
            for name in self._names():
                raw = name.encode()
                self._reply(option, Rep.SERVER, U32.pack(len(raw)) + raw)
            self._reply(option, Rep.ACK)
        elif option == Option.STRUCTURED_REPLY:
            if data:
                self._error(option, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self._neg.structured:
                self._error(option, Rep.ERR_INVALID, "structured replies already negotiated")
            else:
                self._neg.structured = True
                self._reply(option, Rep.ACK)
        elif option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            self._meta_context(option, data)
        else:
            self._error(option, Rep.ERR_UNSUP, f"option {option} is not supported")

    def _starttls(self, data: bytes, events: list[ServerEvent]) -> None:
        option = Option.STARTTLS
        if data:
            self._error(option, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        elif self._tls_active:
            self._error(option, Rep.ERR_INVALID, "TLS is already running")
        elif self._tls is TlsPolicy.NONE:
            self._error(option, Rep.ERR_POLICY, "TLS is not configured on this server")
        else:
            self._reply(option, Rep.ACK)
            self._state = _State.AWAIT_TLS
            events.append(StartTls())

    def _export_name(self, data: bytes, events: list[ServerEvent]) -> None:
        name = decode_string(data, "export name")
        export = self._lookup(name)
        if export is None:  # no way to answer an error here: the protocol says drop it
            self._close(events, f"unknown export {name!r} asked through NBD_OPT_EXPORT_NAME")
            return
        self._neg.structured = False  # EXPORT_NAME clients get simple replies (what they expect)
        export = self._shown(export)
        self._out.append(EXPORT_NAME_REPLY.pack(export.size, export.flags))
        if not self._no_zeroes:
            self._out.append(bytes(EXPORT_NAME_ZEROES))
        self._enter_transmission(export, {}, events)

    def _info_or_go(self, option: int, data: bytes, events: list[ServerEvent]) -> None:
        parsed = _parse_info_request(data)
        if parsed is None:
            self._error(option, Rep.ERR_INVALID, "malformed NBD_OPT_INFO/GO data")
            return
        name, requests = parsed
        export = self._lookup(name)
        if export is None:
            self._error(option, Rep.ERR_UNKNOWN, f"no export named {name!r}")
            return
        export = self._shown(export)
        self._reply(option, Rep.INFO, INFO_EXPORT.pack(Info.EXPORT, export.size, export.flags))
        block_sizes = INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, export.min_block,
                                           export.preferred_block, export.max_payload)  # fmt: skip
        self._reply(option, Rep.INFO, block_sizes)
        if Info.NAME in requests:
            self._reply(option, Rep.INFO, U16.pack(Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in requests and export.description:
            raw = export.description.encode()[:MAX_STRING_BYTES]
            self._reply(option, Rep.INFO, U16.pack(Info.DESCRIPTION) + raw)
        if option == Option.GO and export.min_block > 1 and Info.BLOCK_SIZE not in requests:
            self._error(
                option,
                Rep.ERR_BLOCK_SIZE_REQD,
                f"export {name!r} has a minimum block size of {export.min_block}",
            )
            return  # fmt: skip
        self._reply(option, Rep.ACK)
        if option == Option.GO:
            contexts = self._neg.contexts if self._neg.context_export == name else {}
            self._enter_transmission(export, contexts, events)

    def _meta_context(self, option: int, data: bytes) -> None:
        if not self._neg.structured:
            self._error(option, Rep.ERR_INVALID, "negotiate structured replies first")
            return
        parsed = _parse_meta_request(data)
        if parsed is None:
            self._error(option, Rep.ERR_INVALID, "malformed metadata context request")
            return
        name, queries = parsed
        export = self._lookup(name)
        if export is None:
            self._error(option, Rep.ERR_UNKNOWN, f"no export named {name!r}")
            return
        available = export.meta_contexts
        if option == Option.LIST_META_CONTEXT:
            chosen = [c for c in available if not queries or any(_matches(q, c) for q in queries)]
        else:
            chosen = [c for c in available if c in queries]
        contexts = {index: context for index, context in enumerate(chosen, start=1)}
        for context_id, context in contexts.items():
            self._reply(option, Rep.META_CONTEXT, U32.pack(context_id) + context.encode())
        self._reply(option, Rep.ACK)
        if option == Option.SET_META_CONTEXT:
            self._neg.context_export = name
            self._neg.contexts = contexts

    def _enter_transmission(
        self, export: ExportInfo, contexts: dict[int, str], events: list[ServerEvent]
    ) -> None:
        self.export = export
        self.structured = self._neg.structured
        self.contexts = dict(contexts)
        self._prepare_fast_path(export)
        self._state = _State.TRANSMISSION
        events.append(Ready(export=export, structured=self.structured, contexts=self.contexts))

    def _close(self, events: list[ServerEvent], reason: str) -> None:
        self._state = _State.CLOSED
        events.append(Disconnect(reason))

    # ----- transmission -----

    def _transmission_step(self, events: list[ServerEvent]) -> bool:
        buf = self._in
        pos = buf.pos
        if len(buf.data) - pos < _REQUEST_SIZE:
            return False
        magic, flags, command, cookie, offset, length = _unpack_request(buf.data, pos)
        if magic != REQUEST_MAGIC:
            raise RemoteProtocolError(f"NBD request with bad magic {magic:#x}")
        payload = length if command == _WRITE else 0
        if payload > MAX_PAYLOAD_BYTES:
            raise RemoteProtocolError(f"NBD write of {length} bytes: too large to take")
        if len(buf.data) - pos < _REQUEST_SIZE + payload:
            if len(buf.data) - pos == _REQUEST_SIZE or not payload or payload > self._sink_limit:
                return False  # a write over the export's maximum grows only as bytes come
            # The rest of the payload is still coming: straight into a buffer of its size.
            buf.pos = pos + _REQUEST_SIZE
            self._sink = Sink(payload)
            self._sink_header = (flags, command, cookie, offset, length)
            return True
        buf.pos = pos + _REQUEST_SIZE + payload
        data = bytes(buf.data[pos + _REQUEST_SIZE : buf.pos]) if payload else b""
        return self._request(events, flags, command, cookie, offset, length, data)

    def _sink_step(self, events: list[ServerEvent]) -> bool:
        sink = self._sink
        assert sink is not None
        if not sink.fill_from(self._in):
            return False
        self._sink = None
        flags, command, cookie, offset, length = self._sink_header
        return self._request(events, flags, command, cookie, offset, length, sink.data)

    def _request(self, events: list[ServerEvent], flags: int, command: int, cookie: int,
                 offset: int, length: int, data: bytes | bytearray) -> bool:  # fmt: skip
        if cookie in self._pending:
            raise RemoteProtocolError(f"NBD cookie {cookie:#x} is already in flight")
        if command == _DISC:
            self._close(events, "client disconnected (NBD_CMD_DISC)")
            return False
        fast = self._fast.get(command)
        if (
            fast is None
            or flags & ~fast[1]
            or ((offset | length) if command == _FLUSH
                else (offset + length > self._size or (offset | length) & self._align
                      or length > fast[2]))
        ):  # fmt: skip
            problem = self._check(command, flags, offset, length)
            if problem is not None:
                error, reason = problem
                self._send_error(cookie, command, error, reason)
                events.append(Refused(cookie, command, error, reason))
                return True
        cmd = Cmd(command) if fast is None else fast[0]
        self._pending[cookie] = _Pending(cmd, offset, length)
        events.append(Request(cookie, cmd, flags, offset, length, data))
        return True

    def _prepare_fast_path(self, export: ExportInfo) -> None:
        """Per command: the flags allowed and the largest length, for the requests that need
        no check beyond bounds and alignment (the others take :meth:`_check`'s slow path)."""
        self._size = export.size
        self._align = export.min_block - 1
        self._sink_limit = export.max_payload
        negotiated = 0
        for flag, needs in ((CmdFlag.FUA, TransmissionFlag.SEND_FUA),
                            (CmdFlag.DF, TransmissionFlag.SEND_DF),
                            (CmdFlag.FAST_ZERO, TransmissionFlag.SEND_FAST_ZERO)):  # fmt: skip
            if export.flags & needs:
                negotiated |= int(flag)
        self._fast = {}
        for cmd in Cmd:
            if cmd is Cmd.DISC or not export.allows(cmd):
                continue
            if cmd is Cmd.BLOCK_STATUS and not self.contexts:
                continue
            if cmd in WRITING_COMMANDS and export.read_only:
                continue
            mask = int(ALLOWED_FLAGS[cmd]) & (
                negotiated | ~int(CmdFlag.FUA | CmdFlag.DF | CmdFlag.FAST_ZERO)
            )
            longest = export.max_payload if cmd in (Cmd.READ, Cmd.WRITE) else 0xFFFFFFFF
            self._fast[int(cmd)] = (cmd, mask, longest)  # fmt: skip

    def _check(
        self, command: int, flags: int, offset: int, length: int
    ) -> tuple[Errno, str] | None:
        export = self.export
        assert export is not None
        if command not in Cmd._value2member_map_:
            return Errno.EINVAL, f"unknown command {command}"
        cmd = Cmd(command)
        if flags & ~int(ALLOWED_FLAGS[cmd]):
            return Errno.EINVAL, f"flags {flags:#x} not valid for {cmd.name}"
        for flag, needs in ((CmdFlag.FUA, TransmissionFlag.SEND_FUA),
                            (CmdFlag.DF, TransmissionFlag.SEND_DF),
                            (CmdFlag.FAST_ZERO, TransmissionFlag.SEND_FAST_ZERO)):  # fmt: skip
            if flags & flag and not export.flags & needs:
                return Errno.EINVAL, f"{flag.name} was not negotiated"
        if not export.allows(cmd):
            return Errno.EINVAL, f"{cmd.name} is not supported by this export"
        if cmd is Cmd.BLOCK_STATUS and not self.contexts:
            return Errno.EINVAL, "BLOCK_STATUS without a negotiated metadata context"
        if cmd in WRITING_COMMANDS and export.read_only:
            return Errno.EPERM, "the export is read-only"
        if cmd is Cmd.FLUSH:
            if offset or length:
                return Errno.EINVAL, "FLUSH with a nonzero offset or length"
            return None
        if offset + length > export.size:
            error = Errno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
            return error, f"{cmd.name} at {offset}+{length} is beyond the end ({export.size})"
        if cmd in _ALIGNED and (offset % export.min_block or length % export.min_block):
            return Errno.EINVAL, f"{cmd.name} not aligned to {export.min_block} bytes"
        if cmd in (Cmd.READ, Cmd.WRITE) and length > export.max_payload:
            return Errno.EINVAL, f"{cmd.name} of {length} bytes exceeds {export.max_payload}"
        return None

    def _shown(self, export: ExportInfo) -> ExportInfo:
        """The export as this client sees it: SEND_DF only with structured replies."""
        if self._neg.structured or not export.flags & TransmissionFlag.SEND_DF:
            return export
        return dataclasses.replace(export, flags=export.flags & ~int(TransmissionFlag.SEND_DF))

    def _pending_of(self, cookie: int) -> _Pending:
        pending = self._pending.get(cookie)
        if pending is None:
            raise LocalProtocolError(f"reply to cookie {cookie:#x}, which is not in flight")
        return pending

    def _send_error(self, cookie: int, command: int, error: Errno, message: str) -> None:
        if self.structured:
            raw = message.encode()[:MAX_STRING_BYTES]
            payload = ERROR_CHUNK.pack(error, len(raw)) + raw
            self._out.append(
                STRUCTURED_HEADER.pack(
                    STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.ERROR, cookie, len(payload)
                )
            )
            self._out.append(payload)  # fmt: skip
        else:
            self._out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie))

    def reply(self, cookie: int) -> None:
        """Success for any request but READ and BLOCK_STATUS."""
        pending = self._pending_of(cookie)
        if pending.command in (Cmd.READ, Cmd.BLOCK_STATUS):
            raise LocalProtocolError(f"{pending.command.name} needs reply_read/reply_block_status")
        del self._pending[cookie]
        self._out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))

    def reply_error(self, cookie: int, error: Errno, message: str = "") -> None:
        pending = self._pending_of(cookie)
        if error == 0:
            raise LocalProtocolError("reply_error with error 0")
        del self._pending[cookie]
        self._send_error(cookie, pending.command, error, message)

    def reply_read(self, cookie: int, data: bytes | bytearray) -> None:
        pending = self._pending_of(cookie)
        if pending.command is not Cmd.READ or len(data) != pending.length:
            raise LocalProtocolError(f"read reply of {len(data)} bytes to {pending}")
        del self._pending[cookie]
        if not self.structured:
            self._out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
            self._out.append(data)
        elif not data:
            self._out.append(STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE,
                                                    ReplyType.NONE, cookie, 0))  # fmt: skip
        else:
            header = STRUCTURED_HEADER.pack(
                STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.OFFSET_DATA, cookie, 8 + len(data)
            )
            self._out.append(header + U64.pack(pending.offset))
            self._out.append(data)  # fmt: skip

    def reply_block_status(self, cookie: int, extents: dict[int, list[tuple[int, int]]]) -> None:
        """One chunk per negotiated context: (length, status flags) extents from the offset."""
        pending = self._pending_of(cookie)
        if pending.command is not Cmd.BLOCK_STATUS or set(extents) != set(self.contexts):
            raise LocalProtocolError("block status reply must cover every negotiated context")
        items = sorted(extents.items())
        if any(not ranges or any(n <= 0 for n, _ in ranges) for _, ranges in items):
            raise LocalProtocolError("block status needs nonzero extents")
        del self._pending[cookie]
        for index, (context_id, ranges) in enumerate(items):
            body = U32.pack(context_id) + b"".join(EXTENT.pack(n, f) for n, f in ranges)
            flags = ReplyFlag.DONE if index == len(items) - 1 else 0
            self._out.append(
                STRUCTURED_HEADER.pack(
                    STRUCTURED_REPLY_MAGIC, flags, ReplyType.BLOCK_STATUS, cookie, len(body)
                )
            )
            self._out.append(body)  # fmt: skip


def _parse_info_request(data: bytes) -> tuple[str, set[int]] | None:
    if len(data) < 6:
        return None
    (name_len,) = U32.unpack_from(data)
    if name_len > len(data) - 6:
        return None
    try:
        name = decode_string(data[4 : 4 + name_len], "export name")
    except RemoteProtocolError:
        return None
    pos = 4 + name_len
    (count,) = U16.unpack_from(data, pos)
    pos += 2
    if len(data) != pos + 2 * count:
        return None
    return name, {U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)}


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    if len(data) < 8:
        return None
    (name_len,) = U32.unpack_from(data)
    if name_len > len(data) - 8:
        return None
    try:
        name = decode_string(data[4 : 4 + name_len], "export name")
        pos = 4 + name_len
        (count,) = U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            if pos + 4 > len(data):
                return None
            (qlen,) = U32.unpack_from(data, pos)
            pos += 4
            if pos + qlen > len(data):
                return None
            queries.append(decode_string(data[pos : pos + qlen], "metadata context query"))
            pos += qlen
    except RemoteProtocolError:
        return None
    if pos != len(data):
        return None
    return name, queries


def _matches(query: str, context: str) -> bool:
    """LIST_META_CONTEXT: an exact name, or a namespace alone (``base:``) for all of it."""
    return query == context or (query.endswith(":") and context.startswith(query))
