"""HTTP/3 WebSockets (RFC 9220) at mitmproxy's HTTP/3 codecs.

mitmproxy's HTTP/3 connection (aioquic's `H3Connection`) advertises
SETTINGS_ENABLE_CONNECT_PROTOCOL, and mitmproxy's parser then refuses
`:protocol` by closing the whole QUIC connection: every other request on it
dies too. The same model as over HTTP/2 (`extconnect`, `common`):

- `WsH3Connection`: advertises RFC 9220 only when the bridge carries it;
  a request whose header block is malformed, or that the codec refuses, is an
  error of its own stream (RFC 9114 section 4.1.2), never of the connection;
  so is a malformed response (a 101, which HTTP/3 does not have; none at
  all before the stream's end); an interim 1xx is skipped, not taken for the
  response; a FIN that comes again is nothing (mitmproxy closes the
  connection for it); it remembers each read's events (a status read
  together with data).
- client side (`WsHttp3Server`): an extended CONNECT reaches the stream as
  the client sent it, ended at its headers; what the client sends before the
  status is kept (and relayed to an upstream stream that has the CONNECT);
  the stream's 2xx goes out with the stream left open; a reset after it is
  the client going away, and the WebSocket layer's close ends the stream in
  order (FIN, not a reset). A request with HTTP/1.1's connection fields is
  refused (RFC 9114 section 4.2), and a 1xx as the response a client is to
  get is a 502.
- a peer that does not read gets that stream reset once MAX_BUFFERED_BYTES
  wait for its QUIC window (`QuicBacklog`): aioquic grants the other side
  window as its data arrives, read or not, and keeps what it cannot send in
  the stream's send buffer, without bound.
- upstream side (`WsHttp3Client`): a WebSocket waits for the upstream's
  SETTINGS (RFC 9220 section 3) and goes out as an extended CONNECT if they
  enable it; else, or on H3_VERSION_FALLBACK, the stream takes it over TCP
  (`NeedsHttp1`). An HTTP/1.1 client's upgrade gets the 101 that answers its
  key for the upstream's 2xx.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pylsqpack
from aioquic.h3.connection import ErrorCode as H3ErrorCode
from aioquic.h3.connection import HeadersState, MessageError, Setting
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from mitmproxy import http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import _http2, _http3
from mitmproxy.proxy.layers.http import _http_h3
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.quic import (
    ClientQuicLayer, QuicConnectionClosed, QuicStreamDataReceived, QuicStreamEvent, QuicStreamReset, QuicStreamStopSending,
    ServerQuicLayer,
)
from mitmproxy.proxy.utils import expect

from ..core.extconnect import ClientSideStream, ClientStep, UpstreamPhase, UpstreamStream, stream_fields, upgrade_key
from ..core.streamfacts import SETTINGS, facts_for, facts_of
from .common import (
    Backlog, NeedsHttp1, _protocol, extended_connect, extended_connect_headers, handed_over,
    is_extended_connect, is_passthrough_close, not_reading, opens_websocket, over_bound, request_error, response_error,
    upstream_success, without_values,
)

HTTP3 = b"HTTP/3"
# pylsqpack, which aioquic encodes header sections with, writes one into a
# fixed buffer of 4096 bytes less a 16-byte prefix, and one field of at most
# 4096 bytes; a section past either raises in the middle of the encoder's
# work (and leaves the encoder in that header). mitmproxy re-encodes every
# header section it forwards to an HTTP/3 peer: one too large crashes its
# connection handler ("mitmproxy has crashed!", the stream never answered).
QPACK_SECTION_BYTES = 4096 - 16
QPACK_FIELD_OVERHEAD = 6  # a literal field's prefixes, at most; Huffman and the dynamic table only shrink it
TOO_LARGE = "header fields too large to encode for HTTP/3 (aioquic's QPACK encoder takes about 4 KB)"
# A request the proxy answers itself: the status, and why (logged).
Refusal = tuple[int, str]


def qpack_encodes(fields: list[tuple[bytes, bytes]]) -> bool:
    """Whether aioquic's QPACK encoder can encode these fields: surely when
    written out as literals they fit its buffer; else when a scratch
    encoder (no dynamic table, so never more than the connection's would
    write) manages them."""
    if sum(len(name) + len(value) + QPACK_FIELD_OVERHEAD for name, value in fields) <= QPACK_SECTION_BYTES:
        return True
    try:
        pylsqpack.Encoder().encode(0, fields)
    except (ValueError, RuntimeError):  # (pylsqpack's two ways of saying it does not fit)
        return False
    return True


def request_fields(request: http.Request) -> list[tuple[bytes, bytes]]:
    data = request.data
    return [(b":method", data.method), (b":scheme", data.scheme), (b":authority", data.authority),
            (b":path", data.path), *request.headers.fields]


def response_fields(response: http.Response) -> list[tuple[bytes, bytes]]:
    return [(b":status", b"%d" % response.status_code), *response.headers.fields]


class WsH3Connection(_http_h3.LayeredH3Connection):
    """mitmproxy's HTTP/3 connection, for the bridge's codecs."""

    def __init__(self, conn, is_client: bool, connect_protocol: bool,
                 screen: Callable[[HeadersReceived], Refusal | None] | None = None) -> None:
        # (set before the base class, which sends the SETTINGS as it starts)
        self.ws_connect_protocol = connect_protocol
        self.ws_screen = screen
        self.last_batch: list[H3Event] = []
        self.refusals: list[tuple[int, str]] = []  # (stream id, why), for the codec to log
        self.malformed_responses: dict[int, str] = {}  # stream id: why, for the codec to say
        super().__init__(conn, is_client)

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        if not self.ws_connect_protocol:
            # aioquic always advertises RFC 9220: a client that believes it
            # and finds the proxy cannot carry it has nowhere else to go.
            settings.pop(Setting.ENABLE_CONNECT_PROTOCOL, None)
        return settings

    def _handle_request_or_push_frame(self, frame_type, frame_data, stream, stream_ended) -> list[H3Event]:
        try:
            batch = super()._handle_request_or_push_frame(frame_type, frame_data, stream, stream_ended)
        except MessageError as e:
            # A malformed message is an error of its stream alone (RFC 9114
            # section 4.1.2); what else arrives on it goes nowhere.
            stream.headers_recv_state = HeadersState.AFTER_HEADERS
            if self._is_client:
                return self._malformed_response(stream.stream_id, without_values(e.reason_phrase))
            self.refuse(stream.stream_id, (400, f"malformed HTTP/3 request: {without_values(e.reason_phrase)}"))
            return []
        if not self._is_client:
            return batch
        head = next((e for e in batch if isinstance(e, HeadersReceived)), None)  # (trailers are TrailersReceived)
        problem = response_head_problem(head.headers, head.stream_ended) if head is not None else None
        if problem is INTERIM:
            # An interim response (RFC 9114 section 4.1), which mitmproxy
            # would take for the final one and the final one's HEADERS for
            # trailers: dropped, as mitmproxy's HTTP/2 drops them.
            stream.headers_recv_state = HeadersState.INITIAL
            return []
        if problem is not None:
            return self._malformed_response(stream.stream_id, problem)
        return batch

    def _ends_before_response(self, event: H3Event) -> bool:
        """A response stream's end before any response (aioquic hands on a
        lone FIN as empty data): mitmproxy's stream would wait on forever."""
        return (self._is_client and isinstance(event, DataReceived) and event.stream_ended
                and self._stream[event.stream_id].headers_recv_state == HeadersState.INITIAL)

    def _malformed_response(self, stream_id: int, why: str) -> list[H3Event]:
        """A response that breaks HTTP/3's rules: the stream gets an
        H3_MESSAGE_ERROR at the end of this read, and mitmproxy's codec a
        StreamClosed of it (`malformed_responses` says why). Only the first
        problem counts: the rest of the read is the same response's."""
        if stream_id in self.malformed_responses:
            return []
        self.malformed_responses[stream_id] = why
        return [_http_h3.StreamClosed(stream_id, H3ErrorCode.H3_MESSAGE_ERROR.value)]

    def handle_stream_event(self, event) -> list[H3Event]:
        if isinstance(event, QuicStreamDataReceived) and self._has_ended(event.stream_id):
            # The peer's FIN once more: QUIC repeats a final size whose
            # acknowledgement was lost (RFC 9000 section 4.5), and aioquic
            # hands it on again. mitmproxy's codec closes the whole QUIC
            # connection for it ("stream already ended"); the stream has had
            # its end, and there is nothing else to it (more bytes past the
            # FIN never get here: QUIC refuses them, FINAL_SIZE_ERROR).
            self.last_batch = []
            return []
        # A peer cancels a stream with RESET_STREAM and STOP_SENDING together
        # (RFC 9114 section 4.1.1); mitmproxy makes a StreamClosed of each
        # (_http_h3.LayeredH3Connection.handle_stream_event). Once the stream
        # is closed, by either side, the stream has had its end: a second one
        # would reach an upgraded stream's WebSocket layer as an error event,
        # which it does not take ("mitmproxy has crashed!").
        closed_already = (isinstance(event, (QuicStreamReset, QuicStreamStopSending))
                          and event.stream_id in self._closed_streams)
        batch = super().handle_stream_event(event)
        if closed_already:
            batch = []
        batch = [out for e in batch for out in
                 (self._malformed_response(e.stream_id, NO_RESPONSE) if self._ends_before_response(e) else [e])]
        for e in batch:
            if e.stream_id in self._closed_streams:
                continue
            if isinstance(e, _http_h3.StreamClosed) and e.stream_id in self.malformed_responses:
                self.give_up(e.stream_id, H3ErrorCode.H3_MESSAGE_ERROR.value)
            elif isinstance(e, HeadersReceived) and self.ws_screen is not None:
                refused = self.ws_screen(e)
                if refused is not None:
                    self.refuse(e.stream_id, refused)
        batch = [e for e in batch if not (isinstance(e, (HeadersReceived, DataReceived, _http_h3.TrailersReceived))
                                           and e.stream_id in self._closed_streams)]
        self.last_batch = batch
        return batch

    def close_stream(self, stream_id: int, error_code: int, stop_send: bool = True) -> None:
        # mitmproxy closes a stream the peer reset or stopped by resetting its
        # own side too. Where that side has already ended (its FIN sent: a
        # whole response, a refusal), there is nothing to reset, and aioquic
        # may have forgotten the stream once both ends were done: the reset
        # would be a ValueError in mitmproxy's QUIC layer ("mitmproxy has
        # crashed!"), as a client that cancels a request just answered does.
        stream = self._stream.get(stream_id)
        if (stream is None or stream_id in self._closed_streams
                or stream.headers_send_state is not HeadersState.AFTER_TRAILERS):
            super().close_stream(stream_id, error_code, stop_send)
            return
        self._closed_streams.add(stream_id)
        if stop_send:  # (mitmproxy's QUIC layer sends it only to a stream it still has)
            self._mock.stop_send(stream_id=stream_id, error_code=error_code)

    def get_open_stream_ids(self):
        # The streams mitmproxy's codec reports an error on when the
        # connection closes. mitmproxy's own test of a stream's receiving
        # side misses a FIN on DATA (headers_recv_state stays AFTER_HEADERS),
        # so a stream that ended both ways would get an error after its end:
        # one still in passthrough (an addon's 101) cannot take it.
        return (sid for sid in super().get_open_stream_ids()
                if not (self._has_ended(sid) and self._stream[sid].headers_send_state == HeadersState.AFTER_TRAILERS))

    def _has_ended(self, stream_id: int) -> bool:
        stream = self._stream.get(stream_id)
        return stream is not None and stream.ended

    def refuse(self, stream_id: int, refusal: Refusal) -> None:
        """Answer a request on its own stream, and read no more of it."""
        status, why = refusal
        self.refusals.append((stream_id, why))
        if not self.has_sent_headers(stream_id):
            self.send_headers(stream_id, [(b":status", b"%d" % status)], end_stream=True)
        self._closed_streams.add(stream_id)
        self._mock.stop_send(stream_id, H3ErrorCode.H3_NO_ERROR.value)

    def give_up(self, stream_id: int, code: int) -> None:
        """Reset a stream both ways (RESET_STREAM and STOP_SENDING, mitmproxy's
        close_stream) and read no more of it: its receiving side is done too,
        so the connection's close reports no error for it later. A sending
        side we ended (FIN) is not reset: aioquic forgets a stream once both
        its sides are done, and a reset then makes a new one, whose final
        size (0) the peer takes for an error of the whole connection."""
        stream = self._get_or_create_stream(stream_id)
        if stream.headers_send_state == HeadersState.AFTER_TRAILERS:
            self._closed_streams.add(stream_id)
            self._mock.stop_send(stream_id, code)
        else:
            self.close_stream(stream_id, code)
        stream.ended = True
        stream.headers_recv_state = HeadersState.AFTER_TRAILERS


class QuicBacklog(Backlog):
    """`Backlog` over QUIC. mitmproxy's HTTP/3 codec writes through to the
    QuicLayer of its connection, a layer above it (QuicLayer._handle_command:
    aioquic's send_stream_data), and aioquic keeps what the peer's window
    holds back, and what is not acknowledged yet, in the stream's send buffer
    (QuicStreamSender._buffer): that is what is counted."""

    def __init__(self, codec: _http3.Http3Connection) -> None:  # (Backlog's h2 buffers are not needed)
        self.later = {}
        self.codec = codec
        self.quic = None

    def over_cap(self, sid: int) -> bool:
        if self.quic is None:
            self.quic = next((layer.quic for layer in self.codec.context.layers
                              if isinstance(layer, (ClientQuicLayer, ServerQuicLayer)) and layer.conn is self.codec.conn),
                             None)
        stream = self.quic._streams.get(sid) if self.quic is not None else None
        return stream is not None and over_bound(len(stream.sender._buffer))


# The status an HTTP/3 client gets for a response the proxy cannot send it.
BAD_RESPONSE = 502
NOT_CARRIED = (501, "the proxy does not carry extended CONNECT over HTTP/3 here (ws_encode_h3)")


class QuietHttp3Server(_http3.Http3Server):
    """mitmproxy's client-facing HTTP/3 codec, which does not advertise RFC
    9220 and refuses an extended CONNECT on its own stream (mitmproxy would
    close the whole QUIC connection for it): with `ws_encode_h3` off, or
    when the rest of the bridge cannot be used on this mitmproxy."""

    ws_encode_bridge = True

    def __init__(self, context):
        super().__init__(context)
        self.h3_conn = WsH3Connection(self.conn, is_client=False, connect_protocol=False, screen=self._screen)

    @staticmethod
    def _screen(event: HeadersReceived) -> Refusal | None:
        return None if _protocol(event.headers) is None else NOT_CARRIED

    def _logged_refusals(self) -> layer.CommandGenerator[None]:
        for stream_id, why in self.h3_conn.refusals:
            yield commands.Log(f"ws_encode: refused HTTP/3 stream {stream_id}: {why}", logging.WARNING)
        self.h3_conn.refusals.clear()

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from super()._handle_event(event)
        yield from self._logged_refusals()


class WsHttp3Server(_http3.Http3Server):
    """mitmproxy's client-facing HTTP/3 codec, plus RFC 9220 WebSockets."""

    ws_encode_bridge = True

    def __init__(self, context):
        super().__init__(context)
        self.h3_conn = WsH3Connection(self.conn, is_client=False, connect_protocol=True, screen=self._screen)
        self.websockets: dict[int, ClientSideStream] = {}
        self.parsed: dict[int, http.Request] = {}  # requests the screen read, for parse_headers
        # streams whose response the proxy refused to send (a 1xx, a section too large to
        # encode): the rest of the response goes nowhere, until its end
        self.cut_off: set[int] = set()
        self.backlog = QuicBacklog(self)

    _logged_refusals = QuietHttp3Server._logged_refusals

    @expect(http_layers.HttpEvent, QuicStreamEvent, QuicConnectionClosed, events.Wakeup)
    def done(self, _) -> layer.CommandGenerator[None]:
        # What mitmproxy's codec becomes once its connection is closed, which
        # also takes the wakeup of an end deferred before the close.
        yield from ()

    def _screen(self, event: HeadersReceived) -> Refusal | None:
        """Every request's headers, before mitmproxy's codec reads them:
        the request, or why it is refused on its own stream."""
        if (problem := connection_specific(event.headers)) is not None:
            return 400, f"malformed HTTP/3 request: {problem}"
        if _protocol(event.headers) is not None:
            request = extended_connect(event.headers, HTTP3, self.context.options.websocket)
        else:
            try:
                request = _request(event.headers)
            except ValueError as e:
                request = 400, f"malformed HTTP/3 request headers: {without_values(str(e))}"
        if isinstance(request, tuple):
            return request
        self.parsed[event.stream_id] = request
        if is_extended_connect(request):
            self.websockets[event.stream_id] = facts_of(request).waiting_client
        return None

    def parse_headers(self, event: HeadersReceived) -> http_layers.RequestHeaders:
        request = self.parsed.pop(event.stream_id)
        # An extended CONNECT's request is whole at its headers: what the
        # client sends on the stream is the WebSocket's.
        return http_layers.RequestHeaders(event.stream_id, request,
                                          end_stream=event.stream_ended or event.stream_id in self.websockets)

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if (due := self.backlog.due(event)) is not None:
            yield http_layers.ReceiveHttp(due)
            return
        if isinstance(event, http_layers.HttpEvent) and event.stream_id in self.cut_off:
            if isinstance(event, (http_layers.ResponseEndOfMessage, http_layers.ResponseProtocolError)):
                self.cut_off.discard(event.stream_id)  # (the stream's last event: nothing more to drop)
            return
        if isinstance(event, http_layers.ResponseHeaders) and event.response.status_code < 200:
            yield from self._cut_off(event.stream_id, event.response.status_code)
            return
        ws = self.websockets.get(event.stream_id) if isinstance(event, http_layers.HttpEvent) else None
        if ws is not None:
            yield from self._from_stream(event, ws)
            return
        if isinstance(event, http_layers.ResponseHeaders) and not qpack_encodes(response_fields(event.response)):
            yield commands.Log(f"ws_encode: HTTP/3 stream {event.stream_id} gets 502: the upstream's response "
                               f"{TOO_LARGE}", logging.WARNING)
            if not event.end_stream:
                self.cut_off.add(event.stream_id)
            event = response_error(event.stream_id, f"the upstream's response {TOO_LARGE}")
        if isinstance(event, QuicConnectionClosed):
            yield from self.backlog.due_now()
        for command in super()._handle_event(event):
            if isinstance(command, http_layers.ReceiveHttp) and command.event.stream_id in self.websockets:
                yield from self._from_client(command.event, self.websockets[command.event.stream_id])
            else:
                yield command
        yield from self._logged_refusals()
        if isinstance(event, _http3.QuicConnectionClosed):
            self.websockets.clear()

    def _cut_off(self, sid: int, status: int) -> layer.CommandGenerator[None]:
        """A 1xx as the response an HTTP/3 client is to get (set by an addon,
        or a way around the upstream codecs' checks): HTTP/3 has no 101
        (RFC 9114 section 4.5), and a client waits on after any other 1xx.
        The client gets a 502 instead, and nothing more of the stream;
        mitmproxy's stream goes on as after the status it sent."""
        why = (f"the response is a {status}, which HTTP/3 does not have (RFC 9114 section 4.5)" if status == 101
               else f"the response is an interim {status}")
        self.websockets.pop(sid, None)
        self.cut_off.add(sid)
        self.h3_conn.refuse(sid, (BAD_RESPONSE, why))
        yield from self.h3_conn.transmit()
        yield from self._logged_refusals()

    def _from_client(self, event: http_layers.HttpEvent, ws: ClientSideStream) -> layer.CommandGenerator[None]:
        sid = event.stream_id
        if isinstance(event, http_layers.RequestHeaders):
            yield http_layers.ReceiveHttp(event)
            yield http_layers.ReceiveHttp(http_layers.RequestEndOfMessage(sid))
        elif isinstance(event, http_layers.RequestData) and ws.phase.before_status:
            relayed = ws.take(event.data)
            if relayed:
                upstream, upstream_sid = ws.relay
                yield http_layers.SendHttp(http_layers.RequestData(upstream_sid, relayed), upstream)
            if ws.over_cap:
                yield from self._reset(sid, ws, "more than the early data the proxy keeps, before the status")
        elif isinstance(event, http_layers.RequestEndOfMessage) and ws.phase.before_status:
            ws.ended_early = True
        elif isinstance(event, http_layers.RequestTrailers):
            # Only DATA may follow on a CONNECT stream (RFC 9114 section 4.4).
            yield from self._reset(sid, ws, "trailers on a WebSocket stream")
        elif isinstance(event, http_layers.RequestProtocolError) and ws.is_open:
            # After the status a reset is the client going away, which is
            # what the WebSocket layer understands.
            del self.websockets[sid]
            yield http_layers.ReceiveHttp(http_layers.RequestEndOfMessage(sid))
        else:
            if isinstance(event, http_layers.RequestProtocolError):
                del self.websockets[sid]
            yield http_layers.ReceiveHttp(event)

    def _from_stream(self, event: http_layers.HttpEvent, ws: ClientSideStream) -> layer.CommandGenerator[None]:
        sid = event.stream_id
        if ws.phase.before_status:
            if isinstance(event, http_layers.ResponseHeaders) and 200 <= event.response.status_code < 300:
                ws.step(ClientStep.STATUS_SENT)  # from now on the WebSocket layer carries the client's data
                headers = [(b":status", b"%d" % event.response.status_code), *stream_fields(event.response.headers.fields)]
                self.h3_conn.send_headers(sid, headers, end_stream=False)
                yield from self.h3_conn.transmit()
            else:
                # A refusal or an error: an ordinary response from here on.
                del self.websockets[sid]
                yield from super()._handle_event(event)
        elif isinstance(event, http_layers.ResponseEndOfMessage):
            # The stream ends the 2xx "message" once the WebSocket layer is
            # set up: hand over what the client sent before the status.
            yield from handed_over(ws, sid)
        elif isinstance(event, http_layers.ResponseProtocolError) and is_passthrough_close(event):
            # The WebSocket layer closed the client side: an orderly end (FIN).
            del self.websockets[sid]
            self.h3_conn.end_stream(sid)
            yield from self.h3_conn.transmit()
        else:
            yield from super()._handle_event(event)
            if isinstance(event, http_layers.ResponseData) and self.backlog.over_cap(sid):
                yield from self._reset(sid, ws, not_reading("client"), H3ErrorCode.H3_REQUEST_CANCELLED, later=True)

    def _reset(self, sid: int, ws: ClientSideStream, reason: str, code: H3ErrorCode = H3ErrorCode.H3_MESSAGE_ERROR,
               *, later: bool = False) -> layer.CommandGenerator[None]:
        yield commands.Log(f"ws_encode: reset HTTP/3 stream {sid}: {reason}", logging.WARNING)
        ws.facts.ended_by_proxy = reason
        del self.websockets[sid]
        self.h3_conn.give_up(sid, code.value)
        yield from self.h3_conn.transmit()
        end = http_layers.RequestEndOfMessage(sid) if ws.is_open else request_error(sid, reason)
        # A WebSocket layer that is sending right now must not be handed an
        # event (it is not re-entrant): then its peer's end comes next turn.
        yield self.backlog.defer(end) if later else http_layers.ReceiveHttp(end)


# What `response_head_problem` says of an interim (1xx) response, which is no problem.
INTERIM = "interim"
NO_RESPONSE = "the stream ended before a response"


def response_head_problem(headers: list[tuple[bytes, bytes]], ended: bool) -> str | None:
    """What is wrong with a received response head (INTERIM for a 1xx that
    is not the response yet), or None. aioquic checks only that a `:status`
    is there; mitmproxy's codec closes the whole QUIC connection for one that
    is not a number."""
    status = next((value for name, value in headers if name == b":status"), b"")
    if not (len(status) == 3 and status.isdigit()):
        return "a :status that is not three digits"
    if status == b"101":
        # The Upgrade mechanism is HTTP/1.1's (RFC 9114 section 4.5).
        return "101 Switching Protocols, which HTTP/3 does not have (RFC 9114 section 4.5)"
    if status.startswith(b"1"):
        # An interim response is followed by the response on the same stream.
        return f"an interim {status.decode()} response that ends the stream" if ended else INTERIM
    return None


# HTTP/1.1's connection fields, which no HTTP/3 message carries (RFC 9114
# section 4.2): a request with one is malformed, an error of its stream.
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})


def connection_specific(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The connection-specific field a received header block carries (`te`
    only as other than "trailers"), as a reason without its value; or None.
    (aioquic checks `transfer-encoding` against the value that only `te` may
    have, and lets the rest through.)"""
    for name, value in headers:
        if name in CONNECTION_SPECIFIC:
            return f"connection-specific field {name.decode()} (RFC 9114 section 4.2)"
        if name == b"te" and value.strip().lower() != b"trailers":
            return "te other than trailers (RFC 9114 section 4.2)"
    return None


def _request(headers: list[tuple[bytes, bytes]]) -> http.Request:
    """What mitmproxy's HTTP/3 server makes of a request's headers (ValueError if it cannot)."""
    host, port, method, scheme, authority, path, fields = _http2.parse_h2_request_headers(headers)
    return http.Request(host=host, port=port, method=method, scheme=scheme, authority=authority, path=path,
                        http_version=HTTP3, headers=fields, content=None, trailers=None,
                        timestamp_start=time.time(), timestamp_end=None)


class WsHttp3Client(_http3.Http3Client):
    """mitmproxy's upstream HTTP/3 codec, plus RFC 9220 WebSockets."""

    def __init__(self, context):
        super().__init__(context)
        self.h3_conn = WsH3Connection(self.conn, is_client=True, connect_protocol=False)
        self.held: list[http_layers.HttpEvent] = []  # WebSocket events before the upstream's SETTINGS
        self.websockets: dict[int, UpstreamStream] = {}  # by our stream id
        # their stream ids whose rest goes nowhere here: sent back for HTTP/1.1
        # over TCP, or refused as too large to encode
        self.refused: set[int] = set()
        self.closed = False
        self.backlog = QuicBacklog(self)

    done = WsHttp3Server.done

    @property
    def settings(self) -> dict[int, int] | None:
        return self.h3_conn.received_settings

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if (due := self.backlog.due(event)) is not None:
            yield http_layers.ReceiveHttp(due)
            return
        if isinstance(event, http_layers.HttpEvent):
            if event.stream_id in self.refused:
                return  # the rest of a request that went elsewhere
            if isinstance(event, http_layers.RequestHeaders) and not qpack_encodes(request_fields(event.request)):
                self.refused.add(event.stream_id)
                if (facts := facts_of(event.request)) is not None:  # a handshake the proxy ends, not the upstream
                    facts.ended_by_proxy = f"its request {TOO_LARGE}"
                yield commands.Log(f"ws_encode: HTTP/3 stream {event.stream_id} not sent upstream: its request "
                                   f"{TOO_LARGE}", logging.WARNING)
                yield http_layers.ReceiveHttp(response_error(event.stream_id, f"the request {TOO_LARGE}"))
                return
            if self._must_hold(event):
                if isinstance(event, http_layers.RequestHeaders):
                    facts_for(event.request).waiting(SETTINGS)
                self.held.append(event)
                return
            if isinstance(event, http_layers.RequestHeaders) and opens_websocket(event.request):
                if not self.settings.get(Setting.ENABLE_CONNECT_PROTOCOL):
                    self.refused.add(event.stream_id)
                    yield http_layers.ReceiveHttp(NeedsHttp1.on(event.stream_id))
                else:
                    yield from self._send_connect(event)
                return
            ws = self.websockets.get(self.our_stream_id.get(event.stream_id, -1))
            if ws is not None:
                yield from self._to_upstream(event, ws)
                return
        if isinstance(event, QuicConnectionClosed):
            yield from self.backlog.due_now()
        for command in super()._handle_event(event):
            if isinstance(command, http_layers.ReceiveHttp):
                yield from self._from_upstream(command.event)
            else:
                yield command
        if isinstance(event, QuicConnectionClosed):
            self.closed = True
        if self.held and (self.settings is not None or self.closed):
            held, self.held = self.held, []
            for e in held:
                if not self.closed:
                    yield from self._handle_event(e)
                elif isinstance(e, http_layers.RequestHeaders):
                    yield http_layers.ReceiveHttp(response_error(e.stream_id, "server closed connection before its SETTINGS"))

    def _must_hold(self, event: http_layers.HttpEvent) -> bool:
        if any(e.stream_id == event.stream_id for e in self.held):
            return True
        return (isinstance(event, http_layers.RequestHeaders) and self.settings is None and not self.closed
                and opens_websocket(event.request))

    def _ours(self, theirs: int) -> int:
        """Our stream id for the stream's, as mitmproxy's codec maps them."""
        ours = self.our_stream_id.get(theirs)
        if ours is None:
            ours = self.our_stream_id[theirs] = self.h3_conn.get_next_available_stream_id()
            self.their_stream_id[ours] = theirs
        return ours

    def _send_connect(self, event: http_layers.RequestHeaders) -> layer.CommandGenerator[None]:
        theirs = event.stream_id
        ours = self._ours(theirs)
        self.h3_conn.send_headers(ours, extended_connect_headers(event.request), end_stream=False)
        key = None if is_extended_connect(event.request) else upgrade_key(event.request.headers.fields)
        ws = self.websockets[ours] = UpstreamStream(facts_for(event.request), key)
        ws.facts.forwarded()  # really on its way now (it may have waited for SETTINGS)
        client_side = ws.facts.waiting_client
        relayed = client_side.relay_to(self.conn, theirs) if client_side is not None else None
        if relayed is not None:
            if relayed:
                self.h3_conn.send_data(ours, relayed)
            ws.relay_from = client_side
        yield from self.h3_conn.transmit()

    def _to_upstream(self, event: http_layers.HttpEvent, ws: UpstreamStream) -> layer.CommandGenerator[None]:
        theirs = event.stream_id  # (mitmproxy's codec renames the event as it sends it)
        ours = self.our_stream_id[theirs]
        if isinstance(event, http_layers.RequestEndOfMessage):
            return  # the CONNECT stream stays open for the WebSocket
        if isinstance(event, http_layers.RequestProtocolError) and is_passthrough_close(event):
            del self.websockets[ours]
            self.h3_conn.end_stream(ours)  # an orderly end (FIN), not a reset
            yield from self.h3_conn.transmit()
            return
        if isinstance(event, http_layers.RequestProtocolError):
            del self.websockets[ours]
        yield from super()._handle_event(event)
        if isinstance(event, http_layers.RequestData) and self.backlog.over_cap(ours):
            yield from self._give_up(theirs, ours, ws, not_reading("upstream"))

    def _give_up(self, theirs: int, ours: int, ws: UpstreamStream, reason: str) -> layer.CommandGenerator[None]:
        """The bridge ends an open upstream WebSocket stream itself: a reset
        both ways, and the stream sees its peer close on the next turn (the
        WebSocket layer is sending right now, and is not re-entrant)."""
        yield commands.Log(f"ws_encode: reset upstream HTTP/3 stream {ours}: {reason}", logging.WARNING)
        ws.facts.ended_by_proxy = reason
        del self.websockets[ours]
        self.h3_conn.give_up(ours, H3ErrorCode.H3_REQUEST_CANCELLED.value)
        yield from self.h3_conn.transmit()
        yield self.backlog.defer(http_layers.ResponseEndOfMessage(theirs))

    def _from_upstream(self, event: http_layers.HttpEvent) -> layer.CommandGenerator[None]:
        if event.stream_id in self.refused:
            return  # (what else the upstream says of a stream that went to HTTP/1.1: its STOP_SENDING)
        ours = self.our_stream_id.get(event.stream_id)
        ws = self.websockets.get(ours) if ours is not None else None
        malformed = self.h3_conn.malformed_responses.pop(ours, None)
        if malformed is not None:
            # (the stream's H3_MESSAGE_ERROR, as mitmproxy's codec reports it: "closed by client")
            why = f"malformed HTTP/3 response: {malformed}"
            yield commands.Log(f"ws_encode: reset upstream HTTP/3 stream {ours}: {why}", logging.WARNING)
            event = response_error(event.stream_id, f"ws_encode: {why}")
            if ws is not None:
                ws.facts.ended_by_proxy = why
        if ws is None:
            yield http_layers.ReceiveHttp(event)
        elif isinstance(event, http_layers.ResponseHeaders) and ws.phase is UpstreamPhase.WAITING:
            yield from self._status(event, ws, ours)
        elif isinstance(event, http_layers.ResponseProtocolError):
            del self.websockets[ours]
            yield from self._stream_gone(event, ws, ours)
        else:
            yield http_layers.ReceiveHttp(event)

    def _status(self, event: http_layers.ResponseHeaders, ws: UpstreamStream, ours: int) -> layer.CommandGenerator[None]:
        if ws.relay_from is not None:
            # Whatever the answer, the rest goes through mitmproxy's stream.
            ws.relay_from.step(ClientStep.UPSTREAM_ANSWERED)
        status = event.response.status_code
        ws.facts.upstream_status = status
        if not 200 <= status < 300:
            # A refusal: an ordinary response, and the CONNECT's end of request.
            del self.websockets[ours]
            self.h3_conn.end_stream(ours)
            yield from self.h3_conn.transmit()
            yield http_layers.ReceiveHttp(event)
            return
        ws.phase = UpstreamPhase.OPEN
        # The status came in the same read as the first response data: the
        # fingerprint of an encoder that buffers the status.
        ws.facts.status_with_data = any(isinstance(e, DataReceived) and e.stream_id == ours and e.data
                                        for e in self.h3_conn.last_batch)
        response = upstream_success(ws, status, event.response.headers, HTTP3)
        # The stream takes the WebSocket at the end of this status's message.
        yield http_layers.ReceiveHttp(http_layers.ResponseHeaders(event.stream_id, response, end_stream=False))
        yield http_layers.ReceiveHttp(http_layers.ResponseEndOfMessage(event.stream_id))

    def _stream_gone(self, event: http_layers.ResponseProtocolError, ws: UpstreamStream, ours: int) -> layer.CommandGenerator[None]:
        """The upstream reset the stream, or its connection went: an open
        WebSocket sees its peer close; a waiting handshake fails (or moves
        to HTTP/1.1 over TCP, for H3_VERSION_FALLBACK)."""
        if ws.is_open:
            yield http_layers.ReceiveHttp(http_layers.ResponseEndOfMessage(event.stream_id))
            return
        if ws.relay_from is not None:
            ws.relay_from.step(ClientStep.UPSTREAM_FAILED)
        if self._reset_code(ours) == H3ErrorCode.H3_VERSION_FALLBACK:
            self.refused.add(event.stream_id)
            yield http_layers.ReceiveHttp(NeedsHttp1.on(event.stream_id))
        else:
            yield http_layers.ReceiveHttp(event)

    def _reset_code(self, ours: int) -> int | None:
        for e in self.h3_conn.last_batch:
            if isinstance(e, _http_h3.StreamClosed) and e.stream_id == ours:
                return e.error_code
        return None
