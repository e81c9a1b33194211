"""WebSocket-over-HTTP/3 (RFC 9220) test peers.

A server and a client that speak WebSockets over HTTP/3 extended CONNECT
(``:method CONNECT`` + ``:protocol websocket``) on aioquic, mitmproxy's own
QUIC and HTTP/3 library, with wsproto for the frames: the HTTP/3 twins of
`h2ws`, with the same API, so a test can run the same scenario over both.

The server can reproduce the fault ws-encode diagnoses: a response encoder
that holds the ``:status 200`` of an extended CONNECT until the first body
bytes exist. The echo only speaks after the client's first message, so a
client that waits for the status before speaking stalls. It can also refuse
(a plain status, a stream reset such as H3_VERSION_FALLBACK), leave
SETTINGS_ENABLE_CONNECT_PROTOCOL out, and stop reading a WebSocket (`?deaf`)
so its QUIC flow-control window stays shut.

The client waits for the server's SETTINGS and sends an extended CONNECT
only when they enable it (RFC 9220 §3); `send_request`/`send_stream_bytes`
send anything at all, for fuzzing. It reports how every stream ended
(FIN, RESET_STREAM, STOP_SENDING, each with its code) and whether and how
the whole QUIC connection closed (`closed`), which a proxy must not do for
one bad request.

Everything listens and connects on UDP 127.0.0.1 only (hosts are IP
literals). Library use::

    certfile, keyfile = make_self_signed_cert(tmpdir)
    async with H3WebSocketServer(certfile, keyfile) as server:      # port 0: server.port
        async with H3WebSocketClient("127.0.0.1", server.port) as client:
            ws = await client.open_websocket("/", "localhost")
            assert await ws.wait_status(5) == 200
            await ws.send_text("hello")
            assert await ws.receive(5) == "hello"
            await ws.close()

Command line (in an environment with ws-encode installed, such as .venv-mitmproxy12)::

    python -m wspeers.h3ws server --port 8443 --withhold
    python -m wspeers.h3ws client --url https://127.0.0.1:8443/ --accept-encoding gzip
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import ipaddress
import ssl
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Union

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer
from aioquic.h3.connection import ErrorCode, FrameType, H3Connection, HeadersState, Setting, encode_frame
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionIdIssued,
    ConnectionIdRetired,
    ConnectionTerminated,
    ProtocolNegotiated,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from aioquic.quic.packet import (
    PACKET_TYPE_INITIAL,
    QuicErrorCode,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.packet_builder import QuicDeliveryState
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from wsproto.connection import ConnectionType

from . import streams
from .h2ws import GET_BODY, LISTEN_HOST, REJECTION_BODY, make_self_signed_cert
from .messages import MessageConnection
from .streams import (
    DEFAULT_TIMEOUT,
    ClientStream,
    Headers,
    StreamResetError,
    WebSocketClosed,
    WebSocketOnStream,
    split_pseudo,
    wait_first,
)

__all__ = [
    "ClientWebSocket",
    "ConnectProtocolNotEnabled",
    "ConnectionClosed",
    "ErrorCode",
    "Exchange",
    "H3Peer",
    "H3WebSocketClient",
    "H3WebSocketServer",
    "HeldWindowQuic",
    "PeerEvent",
    "QuicListener",
    "StreamAborted",
    "StreamResetError",
    "WebSocketClosed",
    "classify_request",
    "error_name",
    "make_self_signed_cert",
    "main",
    "qpack_literals",
    "server_configuration",
    "spki_sha256",
]

# Only "h3": aioquic 1.1 also offers drafts 29-32, which 1.2 dropped.
ALPN = ["h3"]

RawHeaders = list[tuple[bytes, bytes]]


def spki_sha256(certfile: str) -> str:
    """The base64 SHA-256 of a PEM certificate's public key (its
    SubjectPublicKeyInfo): what Chromium's --ignore-certificate-errors-spki-list
    takes, the one way to make it trust a self-signed certificate over QUIC."""
    with open(certfile, "rb") as f:
        key = x509.load_pem_x509_certificate(f.read()).public_key()
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def error_name(code: int) -> str:
    """An HTTP/3 or QUIC error code as its name and number, e.g. H3_VERSION_FALLBACK (0x110)."""
    for names in (ErrorCode, QuicErrorCode):
        try:
            return f"{names(code).name} (0x{code:x})"
        except ValueError:
            continue
    return f"0x{code:x}"


# --------------------------------------------------------------------------
# What happens on a connection, as the peers' handlers see it
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamAborted:
    """The peer aborted one direction of a stream: "reset" (RESET_STREAM: it
    stopped sending to us) or "stop_sending" (STOP_SENDING: it will not read
    what we send; aioquic then resets our side by itself)."""

    stream_id: int
    frame: str
    code: int

    def __str__(self) -> str:
        return f"stream {self.stream_id}: {self.frame} {error_name(self.code)}"


@dataclass(frozen=True)
class ConnectionClosed:
    """How the whole QUIC connection ended. `initiator` is "peer" (its
    CONNECTION_CLOSE), "us" (close() here: our code, or our HTTP/3 layer
    answering the peer's protocol error) or "aioquic" (ended without a
    CONNECTION_CLOSE: the idle timeout, a stateless reset; `reason` says which)."""

    error_code: int
    reason: str
    initiator: str

    def __str__(self) -> str:
        return f"connection closed by {self.initiator} with {error_name(self.error_code)}: {self.reason!r}"


@dataclass(frozen=True)
class SettingsReceived:
    """The peer's SETTINGS frame (RFC 9114 §7.2.4), as {identifier: value}."""

    settings: dict[int, int]


PeerEvent = Union[H3Event, StreamAborted, ConnectionClosed, SettingsReceived, StreamDataReceived]


# --------------------------------------------------------------------------
# QUIC and HTTP/3, from aioquic
# --------------------------------------------------------------------------


class HeldWindowQuic(QuicConnection):
    """aioquic's QUIC connection, with a receive window that stays shut on
    the streams in `unread_streams`, and `closing`: how the connection
    ended, known the moment it starts closing (aioquic reports
    ConnectionTerminated only after the closing period, three PTOs later)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.unread_streams: set[int] = set()
        self.closing: Optional[ConnectionClosed] = None

    def close(self, error_code: int = QuicErrorCode.NO_ERROR, frame_type: Optional[int] = None,
              reason_phrase: str = "") -> None:
        # aioquic's H3Connection closes through here too, when the peer breaks HTTP/3.
        super().close(error_code=error_code, frame_type=frame_type, reason_phrase=reason_phrase)
        self._note_closing("us")

    def _handle_connection_close_frame(self, context, frame_type, buf) -> None:
        super()._handle_connection_close_frame(context, frame_type, buf)
        self._note_closing("peer")

    def _note_closing(self, initiator: str) -> None:
        # Whoever set aioquic's pending ConnectionTerminated (_close_event, the
        # same in 1.1 and 1.2) first closed the connection.
        if self.closing is None and self._close_event is not None:
            self.closing = ConnectionClosed(self._close_event.error_code, self._close_event.reason_phrase, initiator)

    def _write_stream_limits(self, builder, space, stream) -> None:
        # aioquic raises a stream's MAX_STREAM_DATA once the peer has used half
        # of it, whether anyone read the bytes or not (quic/connection.py,
        # _write_stream_limits, the same in 1.1 and 1.2): an unread stream
        # keeps the window it has, as a server that stopped reading would.
        if stream.stream_id not in self.unread_streams:
            super()._write_stream_limits(builder, space, stream)


class _H3Layer(H3Connection):
    """aioquic's HTTP/3 connection; its SETTINGS always say
    ENABLE_CONNECT_PROTOCOL=1 (h3/connection.py, _get_local_settings), this
    one can leave the setting out."""

    def __init__(self, quic: QuicConnection, enable_connect_protocol: bool = True) -> None:
        self._enable_connect_protocol = enable_connect_protocol  # read by __init__'s first SETTINGS
        super().__init__(quic)

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        if not self._enable_connect_protocol:
            del settings[Setting.ENABLE_CONNECT_PROTOCOL]
        return settings


# A stream's sending side, in H3Peer._send_side: absent until its first
# HEADERS (or raw bytes) went out, then OPEN, then CLOSED by our FIN, our
# reset or the peer's STOP_SENDING. aioquic asserts on a write after CLOSED.
OPEN, CLOSED = "open", "closed"


class H3Peer(QuicConnectionProtocol):
    """One QUIC connection carrying HTTP/3, feeding `on_event` every event:
    aioquic's HTTP/3 events (HeadersReceived, DataReceived), and what its
    H3Connection leaves out: StreamAborted, SettingsReceived, ConnectionClosed
    (once, as closing begins), and the StreamDataReceived of streams nobody
    reads (see `stop_reading`).

    Writes go through `send_headers`/`send_data`/`end_stream`/`abort`, which
    do nothing once the stream's sending side is closed. `router` is the
    QuicListener that routes a server's datagrams here.
    """

    def __init__(self, quic: HeldWindowQuic, on_event: Callable[[PeerEvent], None], *,
                 enable_connect_protocol: bool = True, router: Optional[QuicListener] = None) -> None:
        super().__init__(quic)
        self.quic = quic
        self.on_event = on_event
        self.alpn: Optional[str] = None
        self.remote_address = None  # where the last datagram came from
        self.closed: Optional[ConnectionClosed] = None
        self._enable_connect_protocol = enable_connect_protocol
        self._router = router
        self._send_side: dict[int, str] = {}
        self._transmit_scheduled = False
        # A client sends its SETTINGS with its first flight, as aioquic's
        # examples do; a server once ALPN has chosen HTTP/3.
        self.h3: Optional[_H3Layer] = _H3Layer(quic, enable_connect_protocol) if quic.configuration.is_client else None

    # -- output -------------------------------------------------------------

    def can_send(self, stream_id: int) -> bool:
        return self.closed is None and self._send_side.get(stream_id) == OPEN

    def send_headers(self, stream_id: int, headers: RawHeaders, end_stream: bool = False) -> bool:
        """Send a HEADERS frame (the first opens the stream's sending side);
        False if that side is closed."""
        if self.h3 is None or self.closed is not None or self._send_side.get(stream_id) == CLOSED:
            return False
        self.h3.send_headers(stream_id, headers, end_stream=end_stream)
        self._sent(stream_id, end_stream)
        return True

    def send_interim(self, stream_id: int, status: str) -> bool:
        """A HEADERS frame with only `:status`, before the response's own: an
        interim response (RFC 9114 section 4.1), or a status HTTP/3 does not
        have (101, "abc"). aioquic would take the response's HEADERS for
        trailers."""
        if not self.send_headers(stream_id, [(b":status", status.encode())]):
            return False
        self.h3._stream[stream_id].headers_send_state = HeadersState.INITIAL
        return True

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> bool:
        if self.h3 is None or not self.can_send(stream_id):
            return False
        if data:
            self.h3.send_data(stream_id, data, end_stream=end_stream)
        elif end_stream:
            self.quic.send_stream_data(stream_id, b"", end_stream=True)  # a bare FIN, no empty DATA frame
        self._sent(stream_id, end_stream)
        return True

    def end_stream(self, stream_id: int) -> bool:
        return self.send_data(stream_id, b"", end_stream=True)

    def repeat_fin(self, stream_id: int) -> None:
        """Our FIN on a stream we ended, once more: what a retransmission
        does when the first one's acknowledgement was lost (RFC 9000 section
        4.5 lets a final size arrive again; only a different one is an error)."""
        self.transmit()  # the first FIN goes out now, if it has not yet
        sender = self.quic._streams[stream_id].sender
        final_size = sender._buffer_fin
        assert final_size is not None, "the stream has not ended"
        sender.on_data_delivery(QuicDeliveryState.LOST, final_size, final_size, fin=True)
        self.transmit_soon()

    def send_raw(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """Bytes as they are on a new request stream (frames of any kind, valid or not)."""
        self.quic.send_stream_data(stream_id, data, end_stream=end_stream)
        self._sent(stream_id, end_stream)

    def abort(self, stream_id: int, code: int) -> None:
        """A stream error (RFC 9114 §8): RESET_STREAM for what we send, and
        STOP_SENDING for what we would read, both with `code`."""
        if self.closed is not None:
            return
        if self._send_side.get(stream_id) != CLOSED:
            self.quic.reset_stream(stream_id, code)
            self._send_side[stream_id] = CLOSED
        try:
            self.quic.stop_stream(stream_id, code)
        except ValueError:
            pass  # aioquic already dropped the stream: the peer's side had ended
        self.transmit_soon()

    def _sent(self, stream_id: int, end_stream: bool) -> None:
        self._send_side[stream_id] = CLOSED if end_stream else OPEN
        self.transmit_soon()

    def transmit_soon(self) -> None:
        """Send what is queued once the current callback is done, so that
        the HEADERS and DATA written in one step leave in one flight."""
        if not self._transmit_scheduled:
            self._transmit_scheduled = True
            asyncio.get_running_loop().call_soon(self._transmit_now)

    def _transmit_now(self) -> None:
        self._transmit_scheduled = False
        self.transmit()

    def close_connection(self, code: int = ErrorCode.H3_NO_ERROR, reason: str = "") -> None:
        self.quic.close(error_code=code, reason_phrase=reason)
        self.transmit()
        self._report_closing()

    def stop_reading(self, stream_id: int) -> None:
        """From now on the stream's data is neither parsed nor given a larger
        window: its sender runs into QUIC flow control."""
        self.quic.unread_streams.add(stream_id)

    # -- input --------------------------------------------------------------

    def datagram_received(self, data, addr) -> None:
        self.remote_address = addr
        super().datagram_received(data, addr)
        self._report_closing()

    def _report_closing(self) -> None:
        if self.closed is None and self.quic.closing is not None:
            self.closed = self.quic.closing
            self.on_event(self.closed)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated):
            self.alpn = event.alpn_protocol
            if self.h3 is None and event.alpn_protocol in ALPN:
                self.h3 = _H3Layer(self.quic, self._enable_connect_protocol)
        elif isinstance(event, ConnectionIdIssued) and self._router is not None:
            self._router.route(event.connection_id, self)
        elif isinstance(event, ConnectionIdRetired) and self._router is not None:
            self._router.unroute(event.connection_id)
        elif isinstance(event, ConnectionTerminated):
            if self._router is not None:
                self._router.forget(self)
            if self.closed is None:  # ended without a CONNECTION_CLOSE either way
                self.closed = ConnectionClosed(event.error_code, event.reason_phrase, "aioquic")
                self.on_event(self.closed)
            return
        elif isinstance(event, StreamReset):
            self.on_event(StreamAborted(event.stream_id, "reset", event.error_code))
        elif isinstance(event, StopSendingReceived):
            self._send_side[event.stream_id] = CLOSED
            self.on_event(StreamAborted(event.stream_id, "stop_sending", event.error_code))
        elif isinstance(event, StreamDataReceived) and event.stream_id in self.quic.unread_streams:
            self.on_event(event)
            return
        if self.h3 is None:
            return
        had_settings = self.h3.received_settings is not None
        for h3_event in self.h3.handle_event(event):
            self.on_event(h3_event)
        if not had_settings and self.h3.received_settings is not None:
            self.on_event(SettingsReceived(dict(self.h3.received_settings)))


class QuicListener(asyncio.DatagramProtocol):
    """A QUIC server's UDP socket: each datagram goes to the H3Peer its
    destination connection ID names; an Initial with an unknown one starts a
    connection, `make_peer(quic, listener)` its H3Peer. What aioquic's
    asyncio QuicServer does, with our QuicConnection (HeldWindowQuic) and
    without Retry or session tickets."""

    def __init__(self, configuration: QuicConfiguration,
                 make_peer: Callable[[HeldWindowQuic, QuicListener], H3Peer]) -> None:
        self.configuration = configuration
        self._make_peer = make_peer
        self._routes: dict[bytes, H3Peer] = {}
        self.transport: Optional[asyncio.DatagramTransport] = None

    @property
    def peers(self) -> set[H3Peer]:
        return set(self._routes.values())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr) -> None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=self.configuration.connection_id_length)
        except ValueError:
            return  # not QUIC
        supported = self.configuration.supported_versions
        if header.version is not None and header.version not in supported:
            self.transport.sendto(encode_quic_version_negotiation(
                source_cid=header.destination_cid, destination_cid=header.source_cid,
                supported_versions=supported), addr)
            return
        peer = self._routes.get(header.destination_cid)
        # RFC 9000 §14.1: a client's first datagram is padded to 1200 bytes.
        if peer is None and len(data) >= SMALLEST_MAX_DATAGRAM_SIZE and header.packet_type == PACKET_TYPE_INITIAL:
            quic = HeldWindowQuic(configuration=self.configuration,
                                  original_destination_connection_id=header.destination_cid)
            peer = self._make_peer(quic, self)
            peer.connection_made(self.transport)
            self.route(header.destination_cid, peer)
            self.route(quic.host_cid, peer)
        if peer is not None:
            peer.datagram_received(data, addr)

    def route(self, connection_id: bytes, peer: H3Peer) -> None:
        self._routes[connection_id] = peer

    def unroute(self, connection_id: bytes) -> None:
        self._routes.pop(connection_id, None)

    def forget(self, peer: H3Peer) -> None:
        for connection_id in [cid for cid, routed in self._routes.items() if routed is peer]:
            del self._routes[connection_id]

    async def close(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Close every connection (H3_NO_ERROR), give them `timeout` to
        finish closing, then the socket."""
        waits = []
        for peer in self.peers:
            peer.close_connection()
            waits.append(asyncio.ensure_future(peer.wait_closed()))
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=timeout)
            for wait in pending:
                wait.cancel()
        if self.transport is not None:
            self.transport.close()


def server_configuration(certfile: str, keyfile: str) -> QuicConfiguration:
    configuration = QuicConfiguration(is_client=False, alpn_protocols=ALPN)
    configuration.load_cert_chain(certfile, keyfile)
    return configuration


async def listen(configuration: QuicConfiguration, make_peer, port: int = 0) -> QuicListener:
    """A QuicListener bound to UDP 127.0.0.1:`port` (0: any free one)."""
    _transport, listener = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: QuicListener(configuration, make_peer), local_addr=(LISTEN_HOST, port))
    return listener


# Local UDP ports each destination has seen from this process (see client_endpoint).
_PORTS_USED: collections.defaultdict[tuple, set[int]] = collections.defaultdict(set)


async def client_endpoint(make_peer: Callable[[], asyncio.DatagramProtocol], remote: tuple,
                          remote_addr: bool = False) -> tuple[asyncio.DatagramTransport, asyncio.DatagramProtocol]:
    """A client's UDP socket towards `remote`, from a local port this process has
    not used towards it before (`remote_addr`: the socket connected to it).

    mitmproxy (11 and 12) keys a UDP connection by its address pair, and keeps
    the pair after the QUIC connection on it has ended: a new connection from the
    same port gets no answer, for minutes. The system picks a random
    free port for each socket, so among a few hundred connections to one proxy
    two now and then share one."""
    loop = asyncio.get_running_loop()
    used = _PORTS_USED[remote]
    refused: list[asyncio.DatagramTransport] = []  # held open while choosing, so the system picks another
    try:
        while True:
            kwargs = {"remote_addr": remote} if remote_addr else {"local_addr": (LISTEN_HOST, 0)}
            transport, peer = await loop.create_datagram_endpoint(make_peer, **kwargs)
            port = transport.get_extra_info("sockname")[1]
            if port not in used:
                used.add(port)
                return transport, peer
            refused.append(transport)
    finally:
        for transport in refused:
            transport.close()


# --------------------------------------------------------------------------
# Requests, as a server sees them
# --------------------------------------------------------------------------


def _prefixed_integer(value: int, prefix_bits: int, first_byte_flags: int) -> bytes:
    """An integer with an N-bit prefix (RFC 9204 §4.1.1, as RFC 7541 §5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first_byte_flags | value])
    encoded, value = bytearray([first_byte_flags | limit]), value - limit
    while value >= 0x80:
        encoded.append(0x80 | value & 0x7F)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def qpack_literals(fields: RawHeaders) -> bytes:
    """A QPACK field section of literal field lines with literal names
    (RFC 9204 §4.5.6) only: no table, no Huffman coding, so any decoder
    reads it and nothing refuses a field on the way out (pylsqpack's encoder,
    behind aioquic's send_headers, refuses an empty name). ls-qpack's
    decoder (aioquic's, so mitmproxy's too) fails on an empty name, on a
    field over 64 KiB and on a section with no field at all (the same two
    bytes its own encoder writes for one): QPACK_DECOMPRESSION_FAILED, a
    connection error."""
    # The prefix (§4.5.1): Required Insert Count 0 and Delta Base 0, the dynamic table unused.
    section = bytearray(b"\x00\x00")
    for name, value in fields:
        section += _prefixed_integer(len(name), 3, 0x20) + name  # 001, N=0, H=0, the name's length
        section += _prefixed_integer(len(value), 7, 0x00) + value  # H=0, the value's length
    return bytes(section)


def decode_headers(headers: RawHeaders) -> Headers:
    # Names lowercased, so that tests need not care about a peer's spelling.
    return [(name.decode("latin-1").lower(), value.decode("utf-8", "replace")) for name, value in headers]


def classify_request(pseudo: dict[str, str], connect_protocol_enabled: bool) -> str:
    """What a request is, by its pseudo-header fields: "extended-connect",
    "connect" (a plain one, RFC 9114 §4.4), "request", or "malformed: why"
    (a stream error of type H3_MESSAGE_ERROR, RFC 9114 §4.1.2).

    aioquic's own checks (h3/connection.py, validate_request_headers) accept
    :protocol on any method and a CONNECT with neither :scheme nor :path;
    the rules of RFC 8441 §4, which RFC 9220 §3 adopts, are here.
    """
    method, has_protocol = pseudo.get(":method"), ":protocol" in pseudo
    if has_protocol and method != "CONNECT":
        return "malformed: :protocol on a request that is not a CONNECT"
    if has_protocol and not connect_protocol_enabled:
        return "malformed: :protocol, although SETTINGS_ENABLE_CONNECT_PROTOCOL was not sent"
    if has_protocol and not (pseudo.get(":scheme") and pseudo.get(":path")):
        return "malformed: an extended CONNECT without :scheme and :path"
    if has_protocol:
        return "extended-connect"
    if method == "CONNECT":
        return "connect"
    return "request"


def query_of(path: str) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(urllib.parse.urlsplit(path).query, keep_blank_values=True)


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


class _ServerWebSocket:
    """Server-side state of one accepted extended CONNECT stream."""

    def __init__(self, stream_id: int, withheld_status: Optional[RawHeaders]) -> None:
        self.stream_id = stream_id
        self.connection = MessageConnection(ConnectionType.SERVER)
        # The response headers a buffering encoder is sitting on, if any.
        self.withheld_status = withheld_status


class _ServerConnection:
    """The server's side of one QUIC connection: answers requests, echoes WebSockets."""

    def __init__(self, server: H3WebSocketServer, index: int) -> None:
        self._server = server
        self.index = index
        self.peer: Optional[H3Peer] = None
        self._websockets: dict[int, _ServerWebSocket] = {}
        self._answered: set[int] = set()  # request streams already seen

    def on_event(self, event: PeerEvent) -> None:
        if isinstance(event, HeadersReceived):
            if event.stream_id not in self._answered:  # else trailers
                self._answered.add(event.stream_id)
                self._on_request(event.stream_id, decode_headers(event.headers))
            ws = self._websockets.get(event.stream_id)
            if ws is not None and event.stream_ended:
                self._end_websocket(ws)
        elif isinstance(event, DataReceived):
            ws = self._websockets.get(event.stream_id)
            if ws is not None:
                self._on_websocket_data(ws, event.data)
                if event.stream_ended:
                    self._end_websocket(ws)
        elif isinstance(event, StreamDataReceived):  # a stream nobody reads
            self._server.unread_bytes[(self.index, event.stream_id)] += len(event.data)
            self._server._changed()
        elif isinstance(event, StreamAborted):
            self._websockets.pop(event.stream_id, None)
        elif isinstance(event, ConnectionClosed):
            self._websockets.clear()
            self._server.closed_connections.append(event)
            self._server._changed()

    def _on_request(self, stream_id: int, headers: Headers) -> None:
        server = self._server
        pseudo, regular = split_pseudo(headers)
        server.requests.append({"connection": self.index, "stream_id": stream_id, "alpn": self.peer.alpn,
                                "pseudo": pseudo, "headers": regular})
        server._changed()
        kind = classify_request(pseudo, server.enable_connect_protocol)
        if kind.startswith("malformed"):
            self.peer.abort(stream_id, ErrorCode.H3_MESSAGE_ERROR)
            return
        path = urllib.parse.urlsplit(pseudo.get(":path", "")).path
        for status in server.heads_before.get(path, ()):
            self.peer.send_interim(stream_id, status)
        if path in server.unanswered:
            self.peer.send_raw(stream_id, b"", end_stream=True)  # (a FIN, before any HEADERS too)
        elif kind == "extended-connect":
            self._on_extended_connect(stream_id, pseudo, regular)
        elif kind == "connect":
            self._respond(stream_id, 405, b"plain CONNECT is not supported\n")
        else:
            content_type, body = server.pages.get(path, ("text/plain", GET_BODY))
            self._respond(stream_id, 200, body, content_type=content_type)

    def _respond(self, stream_id: int, status: int, body: bytes, extra: Headers = (),
                 content_type: str = "text/plain") -> None:
        headers = [(":status", str(status)), ("content-type", content_type),
                   ("content-length", str(len(body))), *extra]
        self.peer.send_headers(stream_id, _encode(headers))
        self.peer.send_data(stream_id, body, end_stream=True)

    def _on_extended_connect(self, stream_id: int, pseudo: dict[str, str], regular: Headers) -> None:
        server = self._server
        if server.reset_after_connect:
            self.peer.abort(stream_id, server.reset_code)
            return
        if pseudo[":protocol"] != "websocket":
            # RFC 9220 §3: an unknown :protocol SHOULD get 501.
            self._respond(stream_id, 501, b"only :protocol websocket is supported\n")
            return
        if not 200 <= server.status < 300:
            self._respond(stream_id, server.status, REJECTION_BODY, server.response_headers)
            return
        status_headers = _encode([(":status", str(server.status)), *server.response_headers])
        wants_encoding = any(name == "accept-encoding" for name, _ in regular)
        if server.withhold_status_when_encoding and wants_encoding:
            # The fault: an encoder that emits headers only with the first body bytes.
            self._websockets[stream_id] = _ServerWebSocket(stream_id, status_headers)
            return
        self.peer.send_headers(stream_id, status_headers)
        if "deaf" in query_of(pseudo[":path"]):
            self.peer.stop_reading(stream_id)  # and never echoes: not one of _websockets
        else:
            self._websockets[stream_id] = _ServerWebSocket(stream_id, None)

    # -- WebSocket echo ------------------------------------------------------

    def _on_websocket_data(self, ws: _ServerWebSocket, data: bytes) -> None:
        for reply, last in ws.connection.echo(data):
            self._send_websocket(ws, reply, end_stream=last)

    def _send_websocket(self, ws: _ServerWebSocket, data: bytes, end_stream: bool = False) -> None:
        self._release_status(ws)
        self.peer.send_data(ws.stream_id, bytes(data), end_stream=end_stream)
        if end_stream:
            self._websockets.pop(ws.stream_id, None)  # our side is done; what still comes is ignored

    def _end_websocket(self, ws: _ServerWebSocket) -> None:
        # The client's FIN (RFC 9220 §3: an orderly TCP close): end ours too.
        # A buffering encoder flushes its headers when the body ends, too.
        self._release_status(ws)
        self.peer.end_stream(ws.stream_id)
        self._websockets.pop(ws.stream_id, None)

    def _release_status(self, ws: _ServerWebSocket) -> None:
        # Right before body bytes: HEADERS and DATA leave in one flight (transmit_soon).
        if ws.withheld_status is not None:
            self.peer.send_headers(ws.stream_id, ws.withheld_status)
            ws.withheld_status = None


def _encode(headers: Headers) -> RawHeaders:
    return [(name.encode(), value.encode()) for name, value in headers]


class H3WebSocketServer:
    """RFC 9220 echo server on UDP 127.0.0.1 (QUIC, ALPN "h3").

    Answers an extended CONNECT with `status` and then echoes every
    WebSocket message; one whose path has `?deaf` is never read (its QUIC
    window stays shut; `unread_bytes[(connection, stream_id)]` counts what
    arrived anyway). `heads_before[path]` are `:status` values sent first,
    each in a HEADERS frame of its own (103 interim responses, a 101); a
    request for a path in `unanswered` gets only those, and the stream's end. Any other request gets 200 with `pages[path]` as
    (content type, body), or "ok". Every request is recorded in `requests`
    as {"connection", "stream_id", "alpn", "pseudo": {name: value},
    "headers": [(name, value), ...]} with lowercased names;
    `closed_connections` holds how each connection ended.

    A request that breaks RFC 9220's rules (classify_request) costs only its
    stream (H3_MESSAGE_ERROR). One that aioquic's own checks refuse (an
    uppercase name, a pseudo-header field after a regular one or twice, a
    forbidden character) closes the whole connection with H3_MESSAGE_ERROR:
    aioquic's H3Connection.handle_event does that where RFC 9114 §4.1.2 asks
    for a stream error, and this server (and the lab's HTTP/3 side) keeps it.
    """

    def __init__(
        self,
        certfile: str,
        keyfile: str,
        *,
        port: int = 0,
        enable_connect_protocol: bool = True,
        withhold_status_when_encoding: bool = False,
        reset_after_connect: bool = False,
        reset_code: int = ErrorCode.H3_REQUEST_CANCELLED,
        status: int = 200,
        response_headers: Optional[Headers] = None,
        pages: Optional[dict[str, tuple[str, bytes]]] = None,
        heads_before: Optional[dict[str, Sequence[str]]] = None,
        unanswered: Sequence[str] = (),
    ) -> None:
        self.configuration = server_configuration(certfile, keyfile)
        self.enable_connect_protocol = enable_connect_protocol
        self.withhold_status_when_encoding = withhold_status_when_encoding
        self.reset_after_connect = reset_after_connect
        # e.g. H3_VERSION_FALLBACK, to send a client to HTTP/1.1 (RFC 9114 §8.1)
        self.reset_code = reset_code
        self.status = status
        self.response_headers: Headers = [(n.lower(), v) for n, v in (response_headers or [])]
        self.pages = dict(pages or {})
        # {path: :status values}, each sent as a HEADERS frame of its own
        # before the answer to a request for the path: interim responses
        # (103), or what HTTP/3 does not have (101, "abc").
        self.heads_before = dict(heads_before or {})
        # Paths whose streams end after those HEADERS, with no response.
        self.unanswered = frozenset(unanswered)
        self.requests: list[dict] = []
        self.closed_connections: list[ConnectionClosed] = []
        self.unread_bytes: collections.Counter = collections.Counter()
        self.connections_accepted = 0
        self._requested_port = port
        self._listener: Optional[QuicListener] = None
        self._change = asyncio.Event()

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("server not started")
        return self._listener.transport.get_extra_info("sockname")[1]

    def _make_peer(self, quic: HeldWindowQuic, listener: QuicListener) -> H3Peer:
        connection = _ServerConnection(self, self.connections_accepted)
        self.connections_accepted += 1
        connection.peer = H3Peer(quic, connection.on_event, router=listener,
                                 enable_connect_protocol=self.enable_connect_protocol)
        return connection.peer

    async def start(self) -> H3WebSocketServer:
        self._listener = await listen(self.configuration, self._make_peer, self._requested_port)
        return self

    async def stop(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Close every connection with H3_NO_ERROR, then the socket."""
        if self._listener is not None:
            await self._listener.close(timeout)
            self._listener = None

    async def __aenter__(self) -> H3WebSocketServer:
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    def _changed(self) -> None:
        self._change.set()

    async def wait_until(self, condition: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT) -> None:
        """Return once `condition()` holds, checked after each request,
        unread byte or closed connection; asyncio.TimeoutError otherwise."""

        async def watch() -> None:
            while not condition():
                self._change.clear()
                await self._change.wait()

        await asyncio.wait_for(watch(), timeout)


# --------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------

class ConnectProtocolNotEnabled(ConnectionError):
    """The server's SETTINGS do not enable extended CONNECT, so RFC 9220 §3
    (RFC 8441 §3) forbids sending one."""


class Exchange(ClientStream):
    """A request stream of the client and its answer (ClientWebSocket is one
    too), with HTTP/3's ways for each direction to end. `ended_with`, how
    receiving ended first: "end_stream" (the peer's FIN), "reset:<code>" (its
    RESET_STREAM), "local_reset:<code>" (our reset()) or "connection_lost".
    `send_closed_by`, why nothing can be sent any more: "stop_sending:<code>"
    (the peer's STOP_SENDING), "local_reset:<code>" or "connection_lost"
    (our own FIN is `_end_sent`). All of them go into `events` as they happen.
    """

    def __init__(self, client: H3WebSocketClient, stream_id: int) -> None:
        super().__init__(stream_id)
        self._client = client
        self.send_closed_by: Optional[str] = None

    async def reset(self, code: int = ErrorCode.H3_REQUEST_CANCELLED) -> None:
        """Cancel the request (RFC 9114 §4.1.1): RESET_STREAM and STOP_SENDING with `code`."""
        if self.ended_with is not None and (self._end_sent or self.send_closed_by):
            return  # both directions are over: nothing to reset
        self._client._peer.abort(self.stream_id, code)
        self._client._streams.pop(self.stream_id, None)
        self._on_send_closed(f"local_reset:{int(code)}")
        self._on_ended(f"local_reset:{int(code)}")

    def repeat_fin(self) -> None:
        """Our FIN once more, on the stream we ended (H3Peer.repeat_fin)."""
        self._client._peer.repeat_fin(self.stream_id)

    def _ended_error(self, what: str) -> WebSocketClosed:
        for reason in (self.ended_with, self.send_closed_by):
            kind, _, code = (reason or "").partition(":")
            if kind in ("reset", "local_reset", "stop_sending"):
                return StreamResetError(self.stream_id, int(code), by_peer=kind != "local_reset")
        closed = self._client.closed
        return WebSocketClosed(f"stream {self.stream_id} ended ({self.ended_with}) {what}"
                               + (f"; {closed}" if closed else ""))

    # -- called by the client's dispatch ------------------------------------

    def _on_aborted(self, event: StreamAborted) -> None:
        if event.frame == "reset":
            self._on_ended(f"reset:{event.code}")
        else:
            self._on_send_closed(f"stop_sending:{event.code}")

    def _on_connection_lost(self) -> None:
        self._on_send_closed("connection_lost")
        self._on_ended("connection_lost")

    def _on_send_closed(self, how: str) -> None:
        if self.send_closed_by is None and not self._end_sent:
            self.send_closed_by = how
            if how.startswith("stop_sending"):
                self.events.append(how)


class ClientWebSocket(Exchange, WebSocketOnStream):
    """One WebSocket on an H3WebSocketClient connection (see Exchange and
    WebSocketOnStream for what it records). Sends never wait: aioquic buffers
    what QUIC flow control holds back; `timeout` keeps h2ws's signatures."""

    def _dead(self) -> Optional[str]:
        return self.send_closed_by or (self.ended_with if self.ended_with not in (None, "end_stream") else None)

    async def _send_frames(self, frames: list[bytes], timeout: float) -> None:
        self._check_sendable()
        if not self._client._peer.send_data(self.stream_id, b"".join(frames)):
            raise self._ended_error("while sending")

    def _send_now(self, frame: bytes, end_stream: bool = False) -> None:
        self._client._peer.send_data(self.stream_id, bytes(frame), end_stream=end_stream)
        self._end_sent = self._end_sent or end_stream

    def _end_our_side(self) -> None:
        # RFC 9220 §3: an orderly close is the stream's FIN.
        if not (self._end_sent or self._dead()):
            self._send_now(b"", end_stream=True)


class H3WebSocketClient:
    """HTTP/3 client that opens RFC 9220 WebSockets, ordinary requests and
    anything else on one QUIC connection.

    Certificate verification is off: it talks to test servers and to
    proxies that mint certificates with their own CA. `events` records every
    event of the connection in order (aioquic's HTTP/3 events, StreamAborted,
    SettingsReceived, ConnectionClosed); `settings` is the server's SETTINGS;
    `closed` says how the connection ended, once it has.
    """

    def __init__(self, host: str, port: int, *, server_hostname: Optional[str] = None) -> None:
        self.host = host
        self.port = port
        self.server_hostname = server_hostname or host
        self.events: list[PeerEvent] = []
        self.settings: Optional[dict[int, int]] = None
        self._peer: Optional[H3Peer] = None
        self._transport: Optional[asyncio.DatagramTransport] = None
        self._streams: dict[int, Exchange] = {}
        self._settings_received = asyncio.Event()
        self.connection_lost = asyncio.Event()

    @property
    def closed(self) -> Optional[ConnectionClosed]:
        return self._peer.closed if self._peer else None

    @property
    def server_enables_connect_protocol(self) -> bool:
        return (self.settings or {}).get(Setting.ENABLE_CONNECT_PROTOCOL) == 1

    async def connect(self, timeout: float = DEFAULT_TIMEOUT) -> H3WebSocketClient:
        """Handshake (ALPN h3) and wait for the server's SETTINGS."""
        if self._peer is not None:
            raise RuntimeError("already connected")
        ipaddress.ip_address(self.host)  # a ValueError for a name: QUIC paths are addresses, none is resolved here
        configuration = QuicConfiguration(is_client=True, alpn_protocols=ALPN,
                                          server_name=self.server_hostname, verify_mode=ssl.CERT_NONE)
        quic = HeldWindowQuic(configuration=configuration)
        self._transport, self._peer = await client_endpoint(lambda: H3Peer(quic, self._dispatch),
                                                            (self.host, self.port))
        self._peer.connect((self.host, self.port))
        await wait_first(self._settings_received, self.connection_lost, timeout=timeout)
        if not self._settings_received.is_set():
            raise ConnectionError(f"the connection ended before the server's SETTINGS arrived: {self.closed}")
        return self

    async def open_websocket(
        self,
        path: str,
        authority: str,
        headers: Optional[Headers] = None,
        scheme: str = "https",
        data_before_status: Optional[bytes] = None,
        protocol: str = "websocket",
    ) -> ClientWebSocket:
        """Send an extended CONNECT (without FIN) and return the WebSocket.

        Raises ConnectProtocolNotEnabled, sending nothing, unless the
        server's SETTINGS said ENABLE_CONNECT_PROTOCOL=1 (send_request sends
        one anyway). `data_before_status` (UTF-8) goes out as a masked text
        frame right behind the HEADERS, without waiting for the response.
        `protocol` other than "websocket" is for provoking refusals.
        """
        self._require_open()
        if not self.server_enables_connect_protocol:
            value = (self.settings or {}).get(Setting.ENABLE_CONNECT_PROTOCOL, "absent")
            raise ConnectProtocolNotEnabled(
                f"not sending an extended CONNECT: the server's SETTINGS_ENABLE_CONNECT_PROTOCOL is {value}, "
                "and RFC 9220 §3 needs 1")
        request = streams.extended_connect(path, authority, scheme, protocol, headers or [])
        ws = ClientWebSocket(self, self._next_stream_id())
        self._streams[ws.stream_id] = ws
        self._peer.send_headers(ws.stream_id, _encode(request))
        if data_before_status is not None:
            ws._send_now(ws._frames.send_data(data_before_status.decode("utf-8")))
        return ws

    async def get(
        self,
        path: str,
        authority: str,
        headers: Optional[Headers] = None,
        scheme: str = "https",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> tuple[int, bytes]:
        """An ordinary GET on the same connection; returns (status, body)."""
        exchange = self.send_request(_encode(streams.get_request(path, authority, scheme, headers or [])))
        await exchange.wait_ended(timeout)
        if exchange.status is None or exchange.ended_with != "end_stream":
            raise exchange._ended_error("before the response was complete")
        return exchange.status, bytes(exchange.response_body)

    def send_request(self, headers: RawHeaders, *, data: bytes = b"", end_stream: bool = True) -> Exchange:
        """A new request stream with `headers` exactly as given, in order,
        then `data` as one DATA frame: pseudo-header fields anywhere,
        repeated or unknown, empty or uppercase names, any bytes at all
        (QPACK literals, `qpack_literals`: nothing checks them on the way out)."""
        frames = encode_frame(FrameType.HEADERS, qpack_literals(headers))
        return self.send_stream_bytes(frames + (encode_frame(FrameType.DATA, data) if data else b""),
                                      end_stream=end_stream)

    def send_stream_bytes(self, data: bytes, *, end_stream: bool = True) -> Exchange:
        """A new request stream carrying `data` as it is: frames of any type,
        a HEADERS frame whose field section QPACK cannot decode, or no frame at all."""
        self._require_open()
        exchange = Exchange(self, self._next_stream_id())
        self._streams[exchange.stream_id] = exchange
        self._peer.send_raw(exchange.stream_id, data, end_stream=end_stream)
        exchange._end_sent = end_stream
        return exchange

    async def close(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Close the connection (H3_NO_ERROR) and wait until QUIC is done with it."""
        if self._peer is None:
            return
        if not self.connection_lost.is_set():
            self._peer.close_connection()
        try:
            await asyncio.wait_for(self._peer.wait_closed(), timeout)
        except asyncio.TimeoutError:
            pass  # QUIC's closing period (three PTOs) outlasted `timeout`: the socket closes all the same
        finally:
            self._transport.close()

    async def __aenter__(self) -> H3WebSocketClient:
        # Also usable as `async with await client.connect():`.
        return self if self._peer is not None else await self.connect()

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def _require_open(self) -> None:
        if self._peer is None:
            raise RuntimeError("not connected; call connect() first")
        if self.connection_lost.is_set():
            raise ConnectionError(f"the QUIC connection is closed: {self.closed}")

    def _next_stream_id(self) -> int:
        return self._peer.quic.get_next_available_stream_id()

    # -- events -------------------------------------------------------------

    def _dispatch(self, event: PeerEvent) -> None:
        self.events.append(event)
        if isinstance(event, SettingsReceived):
            self.settings = event.settings
            self._settings_received.set()
        elif isinstance(event, ConnectionClosed):
            self.connection_lost.set()
            for stream in self._streams.values():
                stream._on_connection_lost()
            self._streams.clear()
            return
        stream = self._streams.get(getattr(event, "stream_id", None))
        if stream is None:
            return
        if isinstance(event, HeadersReceived) and stream.status is None:  # else trailers
            stream._on_response(decode_headers(event.headers))
        elif isinstance(event, DataReceived):
            stream._on_data(event.data)
        elif isinstance(event, StreamAborted):
            stream._on_aborted(event)
        if getattr(event, "stream_ended", False):
            stream._on_ended("end_stream")
        if stream.ended_with is not None and (stream._end_sent or stream.send_closed_by):
            del self._streams[stream.stream_id]


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _error_code(text: str) -> int:
    try:
        return ErrorCode[text].value
    except KeyError:
        try:
            return int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an HTTP/3 error code name or number, got {text!r}")


async def _serve_forever(args: argparse.Namespace) -> None:
    server = H3WebSocketServer(
        *streams.server_files(args, make_self_signed_cert),
        port=args.port,
        enable_connect_protocol=not args.no_connect_protocol,
        withhold_status_when_encoding=args.withhold,
        reset_after_connect=args.reset_code is not None,
        reset_code=args.reset_code or ErrorCode.H3_REQUEST_CANCELLED,
        status=args.status,
        response_headers=args.header,
    )
    await streams.serve_until_cancelled(server, f"listening on udp {LISTEN_HOST}:{{port}} (QUIC, HTTP/3)")


async def _run_client(args: argparse.Namespace) -> int:
    # A server whose SETTINGS leave extended CONNECT out gets none: open_websocket says why.
    return await streams.echo_client(args, H3WebSocketClient, (OSError, ValueError, asyncio.TimeoutError))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m wspeers.h3ws",
                                     description="RFC 9220 (WebSockets over HTTP/3) test peers, UDP on 127.0.0.1.")
    commands = parser.add_subparsers(dest="command", required=True)

    server = commands.add_parser("server", help="run an RFC 9220 echo server until Ctrl-C")
    streams.add_server_arguments(server, "UDP")
    server.add_argument(
        "--reset-code",
        type=_error_code,
        metavar="CODE",
        help="answer every extended CONNECT with RESET_STREAM and STOP_SENDING with this code "
        "(a name such as H3_VERSION_FALLBACK, or a number such as 0x110)",
    )

    client = commands.add_parser("client", help="open one WebSocket, send a message and print the echo",
                                 description=streams.CLIENT_EXIT_STATUS)
    streams.add_client_arguments(client)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    return streams.run(_build_parser().parse_args(argv), _serve_forever, _run_client)


if __name__ == "__main__":
    sys.exit(main())
