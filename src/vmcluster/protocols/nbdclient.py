"""The client side of an NBD connection, sans-IO: bytes in, events and bytes out.

    conn = ClientConnection("lun1.g4")            # structured replies, base:allocation, GO
    for ev in conn.receive_data(chunk): ...       # StartTls, Negotiated / Listed / Described
    transport.write(conn.data_to_send())
    cookie = conn.request(Cmd.WRITE, offset, len(data), data=data, flags=CmdFlag.FUA)
    ... Reply(cookie, error, data, extents, message)

The handshake, in order: the greeting (fixed newstyle is required), the client flags, STARTTLS
if asked for, STRUCTURED_REPLY, SET_META_CONTEXT (only with structured replies), then GO with
NBD_INFO_BLOCK_SIZE (falling back to EXPORT_NAME on a server that does not know GO), or LIST or
INFO followed by ABORT. An option refused by the server raises :class:`OptionRefused` after an
ABORT is queued (send it, then close). Every reply is checked against the request it answers
(cookie in flight, data inside the request, no simple reply to a read once structured replies
are on); a breach raises :class:`RemoteProtocolError`. Requests the negotiated export does not
allow raise :class:`LocalProtocolError` and send nothing.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, auto

from vmcluster.protocols.nbdwire import (
    ALLOWED_FLAGS,
    ERROR_CHUNK,
    EXPORT_NAME_REPLY,
    EXPORT_NAME_ZEROES,
    EXTENT,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_PAYLOAD_BYTES,
    NBDMAGIC,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    OPTION_REPLY_MAGIC,
    REPLY_TYPE_ERROR_BIT,
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
    OptionRefused,
    RemoteProtocolError,
    Rep,
    ReplyFlag,
    ReplyType,
    Sink,
    TransmissionFlag,
    check_block_sizes,
    decode_string,
    is_error_reply,
)

MAX_OPTION_REPLY_BYTES = 1 << 20
_SIMPLE_SIZE = SIMPLE_REPLY.size
_CHUNK_SIZE = STRUCTURED_HEADER.size
_unpack_simple = SIMPLE_REPLY.unpack_from
_unpack_chunk = STRUCTURED_HEADER.unpack_from
_unpack_u32 = U32.unpack_from
_unpack_u64 = U64.unpack_from
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
_DONE = int(ReplyFlag.DONE)
MAX_BLOCK_STATUS_BYTES = 4 + 8 * (1 << 20)


class Mode(Enum):
    GO = auto()  # enter transmission on the export
    INFO = auto()  # describe the export, then abort
    LIST = auto()  # list the exports, then abort


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS was acknowledged: wrap the connection, then call ``tls_started()``."""


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Transmission can start on ``export``."""

    export: ExportInfo
    structured: bool
    contexts: dict[int, str]


@dataclass(frozen=True, slots=True)
class Described:
    """The answer to INFO (the ABORT that follows is queued)."""

    export: ExportInfo


@dataclass(frozen=True, slots=True)
class Listed:
    """The answer to LIST (the ABORT that follows is queued)."""

    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    """The whole answer to one request."""

    cookie: int
    error: int  # 0 or an Errno value
    data: bytes | bytearray = b""  # READ (a bytearray when it came in parts)
    extents: dict[int, list[tuple[int, int]]] | None = None  # BLOCK_STATUS: per context id
    message: str = ""


ClientEvent = StartTls | Negotiated | Described | Listed | Reply


class _State(Enum):
    GREETING = auto()
    OPTIONS = auto()
    AWAIT_TLS = auto()
    EXPORT_NAME = auto()  # waiting for the old-style reply to NBD_OPT_EXPORT_NAME
    TRANSMISSION = auto()
    DONE = auto()


@dataclass(slots=True)
class _InFlight:
    command: Cmd
    offset: int
    length: int
    data: bytearray | bytes | None = None  # READ's data being assembled
    error: int = 0
    message: str = ""
    extents: dict[int, list[tuple[int, int]]] | None = None
    covered: int = 0  # READ: bytes the data and hole chunks have covered so far


class ClientConnection:
    def __init__(
        self,
        export: str = "",
        *,
        mode: Mode = Mode.GO,
        structured: bool = True,
        contexts: Sequence[str] = (),
        tls: bool = False,
    ) -> None:
        self.export_name = export
        self._mode = mode
        self._want_structured = structured
        self._want_contexts = tuple(contexts)
        self._want_tls = tls
        self._state = _State.GREETING
        self._in = Buffer()
        self._out: list[bytes | bytearray] = []
        self._steps: list[Option] = []
        self._no_zeroes = False
        self.structured = False
        self.contexts: dict[int, str] = {}
        self.export: ExportInfo | None = None
        self._info: dict[str, object] = {}
        self._names: list[str] = []
        self._inflight: dict[int, _InFlight] = {}
        self._next_cookie = 1
        self._fast: dict[Cmd, tuple[int, int]] = {}
        self._align = 0
        self._disconnecting = False
        self._sink: Sink | None = None  # a read's data that came only in part
        self._sink_cookie = 0

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
    def ready(self) -> bool:
        return self._state is _State.TRANSMISSION

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def take_unparsed(self) -> bytes:
        return self._in.take(len(self._in))

    def tls_started(self) -> None:
        if self._state is not _State.AWAIT_TLS:
            raise LocalProtocolError("tls_started() without an acknowledged STARTTLS")
        self._state = _State.OPTIONS
        self._next_option()

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ClientEvent]:
        self._in.feed(data)
        events: list[ClientEvent] = []
        while True:
            state = self._state
            if state is _State.TRANSMISSION:
                if self._sink is not None:
                    if not self._sink_step(events):
                        break
                elif not self._reply_step(events):
                    break
            elif state is _State.OPTIONS:
                if not self._option_reply_step(events):
                    break
            elif state is _State.GREETING:
                if not self._greeting_step():
                    break
            elif state is _State.EXPORT_NAME:
                if not self._export_name_step(events):
                    break
            else:  # AWAIT_TLS: the rest is TLS's; DONE (after ABORT): the ACK, then nothing
                if state is _State.DONE:
                    self._in.skip(len(self._in))
                break
        return events

    # ----- handshake -----

    def _send_option(self, option: Option, data: bytes = b"") -> None:
        self._out.append(OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data)
        self._steps.append(option)

    def _greeting_step(self) -> bool:
        values = self._in.peek_struct(GREETING)
        if values is None:
            return False
        self._in.skip(GREETING.size)
        magic, opt_magic, flags = values
        if magic != NBDMAGIC:
            raise RemoteProtocolError(f"not an NBD server (magic {magic:#x})")
        if opt_magic != IHAVEOPT:
            raise RemoteProtocolError("NBD server speaks oldstyle negotiation, not newstyle")
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise RemoteProtocolError("NBD server does not offer fixed newstyle negotiation")
        client = ClientFlag.FIXED_NEWSTYLE
        if flags & HandshakeFlag.NO_ZEROES:
            client |= ClientFlag.NO_ZEROES
            self._no_zeroes = True
        self._out.append(U32.pack(client))
        self._state = _State.OPTIONS
        self._plan = self._option_plan()
        self._next_option()
        return True

    def _option_plan(self) -> list[Option]:
        plan: list[Option] = []
        if self._want_tls:
            plan.append(Option.STARTTLS)
        if self._mode is Mode.LIST:
            return [*plan, Option.LIST]
        if self._want_structured:
            plan.append(Option.STRUCTURED_REPLY)
            if self._want_contexts:
                plan.append(Option.SET_META_CONTEXT)
        plan.append(Option.GO if self._mode is Mode.GO else Option.INFO)
        return plan

    def _next_option(self) -> None:
        while self._plan:
            option = self._plan.pop(0)
            if option is Option.SET_META_CONTEXT and not self.structured:
                continue
            if option in (Option.STARTTLS, Option.LIST, Option.STRUCTURED_REPLY):
                self._send_option(option)
            elif option is Option.SET_META_CONTEXT:
                name = self.export_name.encode()
                body = U32.pack(len(name)) + name + U32.pack(len(self._want_contexts))
                for context in self._want_contexts:
                    raw = context.encode()
                    body += U32.pack(len(raw)) + raw
                self._send_option(option, body)
            else:  # GO or INFO
                self._info = {}
                name = self.export_name.encode()
                body = U32.pack(len(name)) + name + U16.pack(2)
                body += U16.pack(Info.BLOCK_SIZE) + U16.pack(Info.DESCRIPTION)
                self._send_option(option, body)
            return

    def _abort(self) -> None:
        self._out.append(OPTION_HEADER.pack(IHAVEOPT, Option.ABORT, 0))
        self._state = _State.DONE

    def _option_reply_step(self, events: list[ClientEvent]) -> bool:
        header = self._in.peek_struct(OPTION_REPLY_HEADER)
        if header is None:
            return False
        magic, option, rep, length = header
        if magic != OPTION_REPLY_MAGIC:
            raise RemoteProtocolError(f"NBD option reply with bad magic {magic:#x}")
        if length > MAX_OPTION_REPLY_BYTES:
            raise RemoteProtocolError(f"NBD option reply of {length} bytes: too large")
        if len(self._in) < OPTION_REPLY_HEADER.size + length:
            return False
        self._in.skip(OPTION_REPLY_HEADER.size)
        data = self._in.take(length)
        if not self._steps or option != self._steps[0]:
            raise RemoteProtocolError(f"NBD option reply to option {option}, not the one asked")
        self._option_reply(Option(option), rep, data, events)
        return True

    def _option_reply(self, option: Option, rep: int, data: bytes,
                      events: list[ClientEvent]) -> None:  # fmt: skip
        if is_error_reply(rep):
            self._steps.pop(0)
            message = decode_string(data, "error message") if data else ""
            if option is Option.STRUCTURED_REPLY and rep == Rep.ERR_UNSUP:
                self._next_option()  # an old server: simple replies, no block status
                return
            if option is Option.SET_META_CONTEXT:
                self.contexts = {}
                self._next_option()
                return
            if option is Option.GO and rep == Rep.ERR_UNSUP:
                name = self.export_name.encode()
                self._out.append(OPTION_HEADER.pack(IHAVEOPT, Option.EXPORT_NAME, len(name)) + name)
                self._state = _State.EXPORT_NAME
                return
            self._abort()
            raise OptionRefused(option, rep, message)
        if rep == Rep.ACK:
            self._steps.pop(0)
            self._option_acked(option, events)
        elif rep == Rep.INFO and option in (Option.GO, Option.INFO):
            self._info_reply(data)
        elif rep == Rep.META_CONTEXT and option is Option.SET_META_CONTEXT:
            if len(data) < 5:
                raise RemoteProtocolError("NBD metadata context reply too short")
            (context_id,) = U32.unpack_from(data)
            context = decode_string(data[4:], "metadata context name")
            if context not in self._want_contexts:
                raise RemoteProtocolError(f"NBD server selected a context not asked: {context}")
            self.contexts[context_id] = context
        elif rep == Rep.SERVER and option is Option.LIST:
            if len(data) < 4:
                raise RemoteProtocolError("NBD export list entry too short")
            (name_len,) = U32.unpack_from(data)
            if name_len > len(data) - 4:
                raise RemoteProtocolError("NBD export list entry: name beyond the reply")
            self._names.append(decode_string(data[4 : 4 + name_len], "export name"))
        else:
            raise RemoteProtocolError(f"NBD reply type {rep} unexpected for option {option}")

    def _option_acked(self, option: Option, events: list[ClientEvent]) -> None:
        if option is Option.STARTTLS:
            self._state = _State.AWAIT_TLS
            events.append(StartTls())
            return
        if option is Option.STRUCTURED_REPLY:
            self.structured = True
        elif option is Option.LIST:
            events.append(Listed(tuple(self._names)))
            self._abort()
            return
        elif option in (Option.GO, Option.INFO):
            export = self._export_from_info()
            if option is Option.INFO:
                events.append(Described(export))
                self._abort()
                return
            self._transmission(export, events)
            return
        self._next_option()

    def _info_reply(self, data: bytes) -> None:
        if len(data) < 2:
            raise RemoteProtocolError("NBD info reply too short")
        (kind,) = U16.unpack_from(data)
        if kind == Info.EXPORT:
            if len(data) != INFO_EXPORT.size:
                raise RemoteProtocolError("NBD_INFO_EXPORT of the wrong length")
            _, size, flags = INFO_EXPORT.unpack(data)
            self._info["size"], self._info["flags"] = size, flags
        elif kind == Info.BLOCK_SIZE:
            if len(data) != INFO_BLOCK_SIZE.size:
                raise RemoteProtocolError("NBD_INFO_BLOCK_SIZE of the wrong length")
            _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(data)
            try:
                check_block_sizes(minimum, preferred, maximum)
            except ValueError as exc:
                raise RemoteProtocolError(str(exc)) from None
            self._info["blocks"] = (minimum, preferred, maximum)
        elif kind == Info.DESCRIPTION:
            self._info["description"] = decode_string(data[2:], "export description")
        # NBD_INFO_NAME and unknown kinds are ignored, as the protocol asks.

    def _export_from_info(self) -> ExportInfo:
        if "size" not in self._info:
            raise RemoteProtocolError("NBD server accepted the export without NBD_INFO_EXPORT")
        size, flags = self._info["size"], self._info["flags"]
        assert isinstance(size, int)
        assert isinstance(flags, int)
        blocks = self._info.get("blocks", (1, 4096, MAX_PAYLOAD_BYTES))
        assert isinstance(blocks, tuple)
        minimum, preferred, maximum = blocks
        description = self._info.get("description", "")
        assert isinstance(description, str)
        return _export(self.export_name, size, flags, minimum, preferred, maximum, description,
                       tuple(self.contexts.values()))  # fmt: skip

    def _export_name_step(self, events: list[ClientEvent]) -> bool:
        need = EXPORT_NAME_REPLY.size + (0 if self._no_zeroes else EXPORT_NAME_ZEROES)
        if len(self._in) < need:
            return False
        values = self._in.peek_struct(EXPORT_NAME_REPLY)
        assert values is not None
        self._in.skip(need)
        size, flags = values
        self.structured = False  # the server saw no GO: it keeps to simple replies
        self.contexts = {}
        export = _export(self.export_name, size, flags, 1, 4096, MAX_PAYLOAD_BYTES, "", ())
        self._transmission(export, events)
        return True

    def _transmission(self, export: ExportInfo, events: list[ClientEvent]) -> None:
        if not export.flags & TransmissionFlag.HAS_FLAGS:
            raise RemoteProtocolError("NBD transmission flags without NBD_FLAG_HAS_FLAGS")
        self.export = export
        self._prepare_fast_path(export)
        self._state = _State.TRANSMISSION
        events.append(Negotiated(export, self.structured, dict(self.contexts)))

    # ----- transmission -----

    def request(
        self, command: Cmd, offset: int = 0, length: int = 0, *, flags: int = 0,
        data: bytes | bytearray = b"", cookie: int | None = None,
    ) -> int:  # fmt: skip
        """Queue one request; its cookie (``cookie`` or the next free one)."""
        export = self.export
        if self._state is not _State.TRANSMISSION or export is None:
            raise LocalProtocolError("NBD request before the handshake is done")
        fast = None if self._disconnecting else self._fast.get(command)
        if (
            fast is None
            or flags & ~fast[0]
            or ((offset | length) if command is Cmd.FLUSH
                else (offset < 0 or length < 0 or offset + length > export.size
                      or (offset | length) & self._align or length > fast[1]))
            or (len(data) != length if command is Cmd.WRITE else bool(data))
        ):  # fmt: skip
            self._check(export, command, flags, offset, length, data)
        if cookie is None:
            cookie = self._next_cookie
            self._next_cookie = (self._next_cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        if cookie in self._inflight:
            raise LocalProtocolError(f"cookie {cookie:#x} already in flight")
        header = REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length)
        self._out.append(header)
        if data:
            self._out.append(data)  # not joined: a vectored write sends both without a copy
        if command is Cmd.DISC:  # replies to what is in flight still come; nothing new goes
            self._disconnecting = True
            return cookie
        self._inflight[cookie] = _InFlight(command, offset, length)
        return cookie

    def _prepare_fast_path(self, export: ExportInfo) -> None:
        """Per command the flags and the largest length that need no further check."""
        self._align = export.min_block - 1
        self._fast = {}
        for cmd in Cmd:
            if not export.allows(cmd) or (cmd is Cmd.BLOCK_STATUS and not self.contexts):
                continue
            if cmd in WRITING_COMMANDS and export.read_only:
                continue
            mask = 0xFFFF if export.flags & TransmissionFlag.SEND_FUA else ~int(CmdFlag.FUA)
            longest = export.max_payload if cmd in (Cmd.READ, Cmd.WRITE) else 0xFFFFFFFF
            self._fast[cmd] = (mask, longest)

    def _check(self, export: ExportInfo, command: Cmd, flags: int, offset: int, length: int,
               data: bytes | bytearray) -> None:  # fmt: skip
        if self._disconnecting:
            raise LocalProtocolError(f"{command.name} after NBD_CMD_DISC")
        if not 0 <= flags <= 0xFFFF:
            raise LocalProtocolError(f"{command.name}: flags {flags:#x} out of range")
        if not 0 <= length <= 0xFFFFFFFF or not 0 <= offset < 1 << 64:
            raise LocalProtocolError(f"{command.name} at {offset}+{length} is beyond the export "
                                     "(out of the protocol's range)")  # fmt: skip
        if flags & ~int(ALLOWED_FLAGS[command]):
            raise LocalProtocolError(f"flags {flags:#x} not valid for {command.name}")
        if not export.allows(command):
            raise LocalProtocolError(f"the export does not support {command.name}")
        if command in WRITING_COMMANDS and export.read_only:
            raise LocalProtocolError(f"{command.name} on a read-only export")
        if command is Cmd.BLOCK_STATUS and not self.contexts:
            raise LocalProtocolError("BLOCK_STATUS without a negotiated metadata context")
        if flags & CmdFlag.FUA and not export.flags & TransmissionFlag.SEND_FUA:
            raise LocalProtocolError("FUA was not negotiated")
        if (len(data) if command is Cmd.WRITE else 0) != (length if command is Cmd.WRITE else 0):
            raise LocalProtocolError("WRITE's data must be exactly its length")
        if data and command is not Cmd.WRITE:
            raise LocalProtocolError(f"{command.name} carries no data")
        if command in (Cmd.FLUSH, Cmd.DISC):
            if offset or length:
                raise LocalProtocolError(f"{command.name} takes no offset or length")
            return
        if offset + length > export.size:
            raise LocalProtocolError(f"{command.name} at {offset}+{length} is beyond the export")
        if offset % export.min_block or length % export.min_block:
            raise LocalProtocolError(f"{command.name} not aligned to {export.min_block} bytes")
        if command in (Cmd.READ, Cmd.WRITE) and length > export.max_payload:
            raise LocalProtocolError(f"{command.name} larger than {export.max_payload} bytes")

    def _reply_step(self, events: list[ClientEvent]) -> bool:
        buf = self._in
        if len(buf.data) - buf.pos < 4:
            return False
        (magic,) = _unpack_u32(buf.data, buf.pos)
        if magic == SIMPLE_REPLY_MAGIC:
            return self._simple_reply(events)
        if magic == STRUCTURED_REPLY_MAGIC and self.structured:
            return self._chunk(events)
        raise RemoteProtocolError(f"NBD reply with bad magic {magic:#x}")

    def _simple_reply(self, events: list[ClientEvent]) -> bool:
        buf = self._in
        pos = buf.pos
        if len(buf.data) - pos < _SIMPLE_SIZE:
            return False
        _, error, cookie = _unpack_simple(buf.data, pos)
        pending = self._inflight.get(cookie)
        if pending is None:
            raise RemoteProtocolError(f"NBD reply to cookie {cookie:#x}, which is not in flight")
        command = pending.command
        if command is Cmd.READ and self.structured:
            raise RemoteProtocolError("NBD simple reply to a read with structured replies on")
        if command is Cmd.BLOCK_STATUS and not error:
            raise RemoteProtocolError("NBD simple success reply to BLOCK_STATUS")
        payload = pending.length if command is Cmd.READ and not error else 0
        end = pos + _SIMPLE_SIZE + payload
        if len(buf.data) < end:
            return False
        data = bytes(buf.data[pos + _SIMPLE_SIZE : end]) if payload else b""
        buf.pos = end
        del self._inflight[cookie]
        events.append(Reply(cookie, error, data))
        return True

    def _chunk(self, events: list[ClientEvent]) -> bool:
        buf = self._in
        pos = buf.pos
        if len(buf.data) - pos < _CHUNK_SIZE:
            return False
        _, flags, kind, cookie, length = _unpack_chunk(buf.data, pos)
        pending = self._inflight.get(cookie)
        if pending is None:
            raise RemoteProtocolError(f"NBD chunk for cookie {cookie:#x}, which is not in flight")
        limit = (self.export.max_payload if self.export else MAX_PAYLOAD_BYTES) + 64
        if length > max(limit, MAX_BLOCK_STATUS_BYTES):
            raise RemoteProtocolError(f"NBD reply chunk of {length} bytes: too large")
        start = pos + _CHUNK_SIZE
        end = start + length
        have = len(buf.data)
        if (
            kind == _OFFSET_DATA and flags & _DONE and pending.data is None and length > 8
            and length - 8 == pending.length and pending.command is Cmd.READ
            and have >= start + 8 and _unpack_u64(buf.data, start)[0] == pending.offset
            and not pending.error
        ):  # fmt: skip
            # The common case: the whole read in one final chunk.
            if have < end:  # the rest is still coming: straight into a buffer of its size
                buf.pos = start + 8
                self._sink, self._sink_cookie = Sink(length - 8), cookie
                return True
            data = bytes(buf.data[start + 8 : end])
            buf.pos = end
            del self._inflight[cookie]
            events.append(Reply(cookie, 0, data))
            return True
        if have < end:
            return False
        payload = bytes(buf.data[start:end])
        buf.pos = end
        self._apply_chunk(pending, kind, payload)
        if flags & ReplyFlag.DONE:
            del self._inflight[cookie]
            data = b""
            if pending.command is Cmd.READ and not pending.error:
                if pending.covered != pending.length:  # short, or chunks that overlap
                    raise RemoteProtocolError(f"NBD read reply covers {pending.covered} of "
                                              f"{pending.length} bytes")  # fmt: skip
                data = bytes(pending.data) if pending.data is not None else bytes(pending.length)
            complete = set(pending.extents or {}) == set(self.contexts)
            if pending.command is Cmd.BLOCK_STATUS and not pending.error and not complete:
                raise RemoteProtocolError("NBD block status reply misses a context")
            extents = pending.extents if not pending.error else None
            events.append(Reply(cookie, pending.error, data, extents, pending.message))
        return True

    def _sink_step(self, events: list[ClientEvent]) -> bool:
        sink = self._sink
        assert sink is not None
        if not sink.fill_from(self._in):
            return False
        self._sink = None
        del self._inflight[self._sink_cookie]
        events.append(Reply(self._sink_cookie, 0, sink.data))
        return True

    def _apply_chunk(self, pending: _InFlight, kind: int, payload: bytes) -> None:
        if kind == ReplyType.NONE:
            if payload:
                raise RemoteProtocolError("NBD_REPLY_TYPE_NONE with a payload")
        elif kind == ReplyType.OFFSET_DATA:
            if pending.command is not Cmd.READ or len(payload) < 9:
                raise RemoteProtocolError("NBD data chunk that answers no read")
            (offset,) = U64.unpack_from(payload)
            self._place(pending, offset, len(payload) - 8, payload, 8)
        elif kind == ReplyType.OFFSET_HOLE:
            if pending.command is not Cmd.READ or len(payload) != 12:
                raise RemoteProtocolError("NBD hole chunk that answers no read")
            offset, size = U64.unpack_from(payload)[0], U32.unpack_from(payload, 8)[0]
            if size == 0:
                raise RemoteProtocolError("NBD hole chunk of size 0")
            self._place(pending, offset, size, None, 0)
        elif kind == ReplyType.BLOCK_STATUS:
            malformed = len(payload) < 12 or (len(payload) - 4) % 8
            if pending.command is not Cmd.BLOCK_STATUS or malformed:
                raise RemoteProtocolError("NBD block status chunk malformed or unasked")
            (context_id,) = U32.unpack_from(payload)
            if context_id not in self.contexts:
                raise RemoteProtocolError(f"NBD block status for unknown context {context_id}")
            extents = [EXTENT.unpack_from(payload, pos) for pos in range(4, len(payload), 8)]
            if any(n == 0 for n, _ in extents):
                raise RemoteProtocolError("NBD block status extent of length 0")
            if pending.extents is None:
                pending.extents = {}
            pending.extents[context_id] = [(int(n), int(f)) for n, f in extents]
        elif kind & REPLY_TYPE_ERROR_BIT:
            if len(payload) < ERROR_CHUNK.size:
                raise RemoteProtocolError("NBD error chunk too short")
            error, msg_len = ERROR_CHUNK.unpack_from(payload)
            tail = 8 if kind == ReplyType.ERROR_OFFSET else 0
            if msg_len > len(payload) - ERROR_CHUNK.size - tail:
                raise RemoteProtocolError("NBD error chunk message beyond the chunk")
            start = ERROR_CHUNK.size
            message = payload[start : start + msg_len].decode(errors="replace")
            known = kind in (ReplyType.ERROR, ReplyType.ERROR_OFFSET) and error
            pending.error = pending.error or (error if known else Errno.EINVAL)
            pending.message = pending.message or message
        else:
            raise RemoteProtocolError(f"NBD reply chunk of unknown type {kind}")

    def _place(self, pending: _InFlight, offset: int, size: int, payload: bytes | None,
               start: int) -> None:  # fmt: skip
        if offset < pending.offset or offset + size > pending.offset + pending.length:
            raise RemoteProtocolError("NBD read chunk outside the request")
        pending.covered += size
        if (payload is not None and size == pending.length and start == 8 and
                pending.data is None):  # fmt: skip
            pending.data = memoryview(payload)[8:].tobytes()  # the common case: one chunk
            return
        if pending.data is None:
            pending.data = bytearray(pending.length)
        elif isinstance(pending.data, bytes):
            pending.data = bytearray(pending.data)
        if payload is not None:
            at = offset - pending.offset
            pending.data[at : at + size] = memoryview(payload)[start:]


def _export(name: str, size: int, flags: int, minimum: int, preferred: int, maximum: int,
            description: str, contexts: tuple[str, ...]) -> ExportInfo:  # fmt: skip
    try:
        return ExportInfo(name=name, size=size, flags=flags, min_block=minimum,
                          preferred_block=preferred, max_payload=maximum,
                          description=description, meta_contexts=contexts)  # fmt: skip
    except ValueError as exc:
        raise RemoteProtocolError(str(exc)) from None
