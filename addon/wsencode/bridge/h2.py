"""HTTP/2 WebSockets (RFC 8441) at mitmproxy's HTTP/2 codecs.

Stock mitmproxy cannot carry a WebSocket over HTTP/2 (mitmproxy issue #4607):
its HTTP/2 server never advertises SETTINGS_ENABLE_CONNECT_PROTOCOL and
rejects `:protocol`.

- client side (`WsHttp2Server`): advertises RFC 8441; an extended CONNECT
  with `:protocol: websocket` reaches the stream as the client sent it
  (`extconnect`), ended at its headers; the stream's 2xx goes out with the
  stream left open; resets and closes after it reach the WebSocket layer as
  the peer closing, and an orderly close ends the stream with END_STREAM.
  DATA the client sends before the status goes straight to an upstream
  stream that has the CONNECT (whole messages only), and is otherwise kept
  and handed to the WebSocket layer after the status (`ClientSideStream`).
  A malformed request is a stream error, not a connection error (RFC 9113
  section 8.1.1).
- upstream side (`WsHttp2Client`): a WebSocket waits for the server's first
  SETTINGS (RFC 8441 section 3) and goes out as an extended CONNECT if the
  server advertises 0x8; else, or on HTTP_1_1_REQUIRED, the stream is told
  to take it over HTTP/1.1 (`NeedsHttp1`). An HTTP/1.1 client's upgrade gets
  the 101 whose accept answers its key for the upstream's 2xx.
- a peer that does not read gets that stream reset once MAX_BUFFERED_BYTES
  wait for its window (`Backlog`), since mitmproxy's HTTP/2 codec buffers
  without bound and never holds the other side back.
"""

from __future__ import annotations

import copy
import logging
import time

import h2.errors
import h2.events
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http2
from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection

from ..core.extconnect import (
    MAX_EARLY_BYTES, ClientSideStream, ClientStep, UpstreamPhase, UpstreamStream, stream_fields,
    upgrade_key,
)
from ..core.streamfacts import QUEUED, SETTINGS, facts_for, facts_of
from .common import (
    Backlog, NeedsHttp1, _close_open_websockets, _forget_if_closed, _protocol, extended_connect,
    extended_connect_headers, handed_over, is_extended_connect, is_passthrough_close, malformed, not_reading,
    opens_websocket, request_error, response_error, upstream_success,
)

class WsHttp2Server(_http2.Http2Server):
    """mitmproxy's client-facing HTTP/2 codec, plus RFC 8441 WebSockets."""

    def __init__(self, context):
        super().__init__(context)
        self.h2_conn.local_settings.enable_connect_protocol = 1
        # Applied at once and sent with the preface (h2 sends acknowledged values).
        self.h2_conn.local_settings.acknowledge()
        self.websockets: dict[int, ClientSideStream] = {}
        # h2 makes a malformed request a connection error, which would take
        # every other stream down with it; RFC 9113 section 8.1.1 makes it a
        # stream error. So this connection validates request headers itself.
        self.validate_requests = self.h2_conn.config.validate_inbound_headers
        self.h2_conn.config = copy.copy(self.h2_conn.config)
        self.h2_conn.config.validate_inbound_headers = False
        self.backlog = Backlog(self.h2_conn)

    def handle_h2_event(self, event: h2.events.Event) -> layer.CommandGenerator[bool]:
        if self.validate_requests and isinstance(event, (h2.events.RequestReceived, h2.events.TrailersReceived)):
            problem = malformed(event.headers, trailers=isinstance(event, h2.events.TrailersReceived))
            if problem:
                yield from self._reset(event.stream_id, f"malformed request headers: {problem}")
                return False
        if isinstance(event, h2.events.RequestReceived) and _protocol(event.headers) is not None:
            yield from self._extended_connect(event)
            return False
        ws = self.websockets.get(getattr(event, "stream_id", 0))
        if ws is None:
            return (yield from super().handle_h2_event(event))
        sid = event.stream_id
        if ws.phase.before_status and isinstance(event, h2.events.DataReceived):
            yield from self._early_data(sid, ws, event)
            return False
        if ws.phase.before_status and isinstance(event, h2.events.StreamEnded):
            ws.ended_early = True
            return False
        if isinstance(event, h2.events.TrailersReceived):
            # Only DATA may follow on a CONNECT stream (RFC 9113 section 8.5).
            yield from self._reset(sid, "trailers on a WebSocket stream")
            return False
        if ws.is_open and isinstance(event, h2.events.StreamReset):
            # After the upgrade a reset is the peer going away, which is what
            # the WebSocket layer understands; as an error it would crash it.
            del self.websockets[sid]
            self.streams.pop(sid, None)
            yield http_layers.ReceiveHttp(http_layers.RequestEndOfMessage(sid))
            return False
        done = yield from super().handle_h2_event(event)
        if self.is_closed(sid):
            self.websockets.pop(sid, None)
        return done

    def _early_data(self, sid: int, ws: ClientSideStream, event: h2.events.DataReceived) -> layer.CommandGenerator[None]:
        self.h2_conn.acknowledge_received_data(event.flow_controlled_length, sid)
        relayed = ws.take(event.data)
        if relayed:
            upstream, upstream_sid = ws.relay
            yield http_layers.SendHttp(http_layers.RequestData(upstream_sid, relayed), upstream)
        if ws.over_cap:
            yield from self._reset(sid, f"more than {MAX_EARLY_BYTES} bytes of data before the status")

    def _extended_connect(self, event: h2.events.RequestReceived) -> layer.CommandGenerator[None]:
        sid = event.stream_id
        request = extended_connect(event.headers, b"HTTP/2.0", self.context.options.websocket)
        if isinstance(request, tuple):
            yield from self._refuse(sid, *request)
            return
        self.websockets[sid] = facts_of(request).waiting_client
        self.streams[sid] = _http2.StreamState.HEADERS_RECEIVED
        # The request is whole at its headers: what the client sends on the
        # stream is the WebSocket's, kept here until its status.
        yield http_layers.ReceiveHttp(http_layers.RequestHeaders(sid, request, end_stream=True))
        yield http_layers.ReceiveHttp(http_layers.RequestEndOfMessage(sid))

    def _reset(
        self, sid: int, reason: str, code: int = h2.errors.ErrorCodes.PROTOCOL_ERROR, *, later: bool = False
    ) -> layer.CommandGenerator[None]:
        yield commands.Log(f"ws_encode: reset HTTP/2 stream {sid}: {reason}", logging.WARNING)
        self.h2_conn.reset_stream(sid, code)
        ws = self.websockets.pop(sid, None)
        if ws is not None:
            ws.facts.ended_by_proxy = reason
        if self.streams.pop(sid, None) is not None:
            # The WebSocket layer understands only the peer going away.
            end = http_layers.RequestEndOfMessage(sid) if ws is not None and ws.is_open else request_error(sid, reason)
            yield self.backlog.defer(end) if later else http_layers.ReceiveHttp(end)
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())

    def _refuse(self, sid: int, status: int, reason: str) -> layer.CommandGenerator[None]:
        yield commands.Log(f"ws_encode: refused HTTP/2 stream {sid}: {reason}", logging.WARNING)
        self.h2_conn.send_headers(sid, [(b":status", b"%d" % status)], end_stream=True)
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if (due := self.backlog.due(event)) is not None:
            yield http_layers.ReceiveHttp(due)
            return
        ws = self.websockets.get(event.stream_id) if isinstance(event, http_layers.HttpEvent) else None
        if ws is None:
            if isinstance(event, http_layers.ResponseHeaders) and event.response.status_code == 101:
                # HTTP/2 has no 101; stock mitmproxy crashes trying to send one.
                event = response_error(event.stream_id, "upstream switched protocols on a request that did not ask for a WebSocket")
            yield from super()._handle_event(event)
        elif ws.phase.before_status:
            if isinstance(event, http_layers.ResponseHeaders) and 200 <= event.response.status_code < 300:
                yield from self._send_success(event)
            else:
                # A refusal or an error: an ordinary response from here on.
                del self.websockets[event.stream_id]
                yield from super()._handle_event(event)
        elif isinstance(event, http_layers.ResponseEndOfMessage):
            # The stream ends the 2xx "message" once the WebSocket layer is set
            # up; on HTTP/2 that would close the stream. Instead, hand over
            # what the client sent before the status.
            yield from handed_over(ws, event.stream_id)
        elif isinstance(event, http_layers.ResponseProtocolError) and is_passthrough_close(event):
            # The WebSocket layer closed the client side: an orderly end of stream.
            if self.is_open_for_us(event.stream_id):
                self.h2_conn.end_stream(event.stream_id)
                yield commands.SendData(self.conn, self.h2_conn.data_to_send())
            _forget_if_closed(self, event.stream_id)
        else:
            yield from super()._handle_event(event)
            if isinstance(event, http_layers.ResponseData) and self.backlog.over_cap(event.stream_id):
                yield from self._reset(event.stream_id, not_reading("client"), h2.errors.ErrorCodes.CANCEL, later=True)

    def _send_success(self, event: http_layers.ResponseHeaders) -> layer.CommandGenerator[None]:
        ws = self.websockets[event.stream_id]
        ws.step(ClientStep.STATUS_SENT)  # from now on the WebSocket layer carries the client's data
        if self.is_open_for_us(event.stream_id):
            status = b"%d" % event.response.status_code
            headers = [(b":status", status), *stream_fields(event.response.headers.fields)]
            self.h2_conn.send_headers(event.stream_id, headers, end_stream=False)
            yield commands.SendData(self.conn, self.h2_conn.data_to_send())

    def close_connection(self, msg: str) -> layer.CommandGenerator[None]:
        yield from self.backlog.due_now()
        yield from _close_open_websockets(self, http_layers.RequestEndOfMessage)
        yield from super().close_connection(msg)


class BatchRecordingH2Connection(BufferedH2Connection):
    """Remembers the events of the last read, so a status can be seen to
    arrive together with data (mitmproxy runs the flow's hooks before the
    rest of a read is processed)."""

    last_batch: list[h2.events.Event] | tuple[()] = ()  # (immutable until the first read)

    def receive_data(self, data: bytes) -> list[h2.events.Event]:
        self.last_batch = super().receive_data(data)
        return self.last_batch


class WsHttp2Client(_http2.Http2Client):
    """mitmproxy's upstream HTTP/2 codec, plus RFC 8441 WebSockets."""

    def __init__(self, context):
        super().__init__(context)
        # The same connection state the stock client made, in a class that
        # records each read's events.
        self.h2_conn.__class__ = BatchRecordingH2Connection
        self.settings_received = False
        self.held: list[http_layers.HttpEvent] = []  # WebSocket events before the first SETTINGS
        self.closed = False
        self.websockets: dict[int, UpstreamStream] = {}  # by our stream id
        self.refused: set[int] = set()  # their stream ids sent back for HTTP/1.1
        self.backlog = Backlog(self.h2_conn)

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, http_layers.HttpEvent):
            if event.stream_id in self.refused:
                return  # the rest of a request that went elsewhere
            if self._must_hold(event):
                # Stream ids are only taken when headers are really sent, so a held
                # CONNECT does not make later requests' ids go backwards.
                if isinstance(event, http_layers.RequestHeaders):
                    facts_for(event.request).waiting(SETTINGS)
                self.held.append(event)
                return
            if self._cannot_take(event):
                self.refused.add(event.stream_id)
                yield http_layers.ReceiveHttp(NeedsHttp1.on(event.stream_id))
                return
        theirs = getattr(event, "stream_id", None)  # mitmproxy renames it when it sends
        yield from super()._handle_event(event)
        if isinstance(event, http_layers.RequestHeaders) and any(e is event for e in self.stream_queue.get(theirs, ())):
            # Queued behind the server's MAX_CONCURRENT_STREAMS; _send_connect
            # says when it really goes.
            facts = facts_of(event.request)
            if facts is not None:
                facts.waiting(QUEUED)
        if self.held and (self.settings_received or self.closed):
            held, self.held = self.held, []
            for e in held:
                if not self.closed:
                    yield from self._handle_event(e)
                elif isinstance(e, http_layers.RequestHeaders):
                    yield http_layers.ReceiveHttp(response_error(e.stream_id, "server closed connection before its SETTINGS"))

    def _must_hold(self, event: http_layers.HttpEvent) -> bool:
        if any(e.stream_id == event.stream_id for e in self.held):
            return True
        return (
            isinstance(event, http_layers.RequestHeaders)
            and not self.settings_received
            and not self.closed
            and opens_websocket(event.request)
        )

    def _cannot_take(self, event: http_layers.HttpEvent) -> bool:
        return (
            isinstance(event, http_layers.RequestHeaders)
            and self.settings_received
            and opens_websocket(event.request)
            and not self.h2_conn.remote_settings.enable_connect_protocol
        )

    def _handle_event2(self, event: events.Event) -> layer.CommandGenerator[None]:
        if (due := self.backlog.due(event)) is not None:
            yield http_layers.ReceiveHttp(due)
            return
        if isinstance(event, http_layers.RequestHeaders) and opens_websocket(event.request):
            yield from self._send_connect(event)
            return
        ws = self.websockets.get(event.stream_id) if isinstance(event, http_layers.HttpEvent) else None
        if ws is not None and isinstance(event, http_layers.RequestEndOfMessage):
            return  # the CONNECT stream stays open for the WebSocket
        if ws is not None and isinstance(event, http_layers.RequestProtocolError) and is_passthrough_close(event):
            if self.is_open_for_us(event.stream_id):
                self.h2_conn.end_stream(event.stream_id)
                yield commands.SendData(self.conn, self.h2_conn.data_to_send())
            _forget_if_closed(self, event.stream_id)
            return
        yield from super()._handle_event2(event)
        if ws is not None and isinstance(event, http_layers.RequestProtocolError):
            # mitmproxy reset the CONNECT for the stream (the client failed
            # it): no h2 event will come for it any more.
            _forget_if_closed(self, event.stream_id)
        if ws is not None and isinstance(event, http_layers.RequestData) and self.backlog.over_cap(event.stream_id):
            yield from self._reset(event.stream_id, ws, not_reading("upstream"), h2.errors.ErrorCodes.CANCEL, later=True)

    def _send_connect(self, event: http_layers.RequestHeaders) -> layer.CommandGenerator[None]:
        sid = event.stream_id
        self.last_activity = time.time()
        self.h2_conn.send_headers(sid, extended_connect_headers(event.request), end_stream=False)
        self.streams[sid] = _http2.StreamState.EXPECTING_HEADERS
        # An HTTP/1.1 client's upgrade gets a 101 that answers its key.
        key = None if is_extended_connect(event.request) else upgrade_key(event.request.headers.fields)
        ws = self.websockets[sid] = UpstreamStream(facts_for(event.request), key)
        # The request is really on its way now (it may have waited for SETTINGS).
        ws.facts.forwarded()
        client_side = ws.facts.waiting_client
        relayed = client_side.relay_to(self.conn, self.their_stream_id[sid]) if client_side is not None else None
        if relayed is not None:
            # What the client sent before the status goes upstream now, and
            # whatever follows goes straight here (ClientSideStream.take).
            if relayed:
                self.h2_conn.send_data(sid, relayed)
            ws.relay_from = client_side
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())

    def handle_h2_event(self, event: h2.events.Event) -> layer.CommandGenerator[bool]:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_received = True
        ws = self.websockets.get(getattr(event, "stream_id", 0))
        if ws is None:
            return (yield from super().handle_h2_event(event))
        sid = event.stream_id
        if isinstance(event, h2.events.ResponseReceived) and ws.phase is UpstreamPhase.WAITING:
            return (yield from self._status(sid, ws, event))
        if isinstance(event, h2.events.StreamReset):
            yield from self._stream_reset(sid, ws, event)
            return False
        if isinstance(event, h2.events.TrailersReceived):
            # Only DATA may follow on a CONNECT stream (RFC 9113 section 8.5).
            yield from self._reset(sid, ws, "the upstream sent trailers on a WebSocket stream")
            return False
        done = yield from super().handle_h2_event(event)
        if self.is_closed(sid):
            self.websockets.pop(sid, None)
        return done

    def _status(self, sid: int, ws: UpstreamStream, event: h2.events.ResponseReceived) -> layer.CommandGenerator[bool]:
        if ws.relay_from is not None:
            # Whatever the answer, the rest goes through mitmproxy's stream.
            ws.relay_from.step(ClientStep.UPSTREAM_ANSWERED)
        try:
            status, fields = _http2.parse_h2_response_headers(event.headers)
        except ValueError:
            del self.websockets[sid]
            return (yield from super().handle_h2_event(event))  # mitmproxy reports it
        ws.facts.upstream_status = status
        if not 200 <= status < 300:
            # A refusal: an ordinary response, and the CONNECT's end of request.
            del self.websockets[sid]
            if self.is_open_for_us(sid):
                self.h2_conn.end_stream(sid)
            return (yield from super().handle_h2_event(event))
        ws.phase = UpstreamPhase.OPEN
        # The status came in the same read as the first response data:
        # the fingerprint of an encoder that buffers the status.
        ws.facts.status_with_data = any(
            isinstance(e, h2.events.DataReceived) and e.stream_id == sid and e.data
            for e in self.h2_conn.last_batch
        )
        response = upstream_success(ws, status, fields, b"HTTP/2.0")
        self.streams[sid] = _http2.StreamState.HEADERS_RECEIVED
        # The stream takes the WebSocket at the end of this status's message.
        yield http_layers.ReceiveHttp(http_layers.ResponseHeaders(sid, response, end_stream=False))
        yield http_layers.ReceiveHttp(http_layers.ResponseEndOfMessage(sid))
        return False

    def _stream_reset(self, sid: int, ws: UpstreamStream, event: h2.events.StreamReset) -> layer.CommandGenerator[None]:
        if ws.phase is UpstreamPhase.WAITING and event.error_code == h2.errors.ErrorCodes.HTTP_1_1_REQUIRED:
            yield from self._stream_gone(sid, ws, NeedsHttp1.on(sid))
        else:
            yield from self._stream_gone(sid, ws, f"stream reset by server ({_error_name(event.error_code)})")

    def _reset(
        self, sid: int, ws: UpstreamStream, reason: str, code: int = h2.errors.ErrorCodes.PROTOCOL_ERROR, *, later: bool = False
    ) -> layer.CommandGenerator[None]:
        """The bridge itself ends an upstream WebSocket stream."""
        yield commands.Log(f"ws_encode: reset upstream HTTP/2 stream {sid}: {reason}", logging.WARNING)
        ws.facts.ended_by_proxy = reason
        self.h2_conn.reset_stream(sid, code)
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())
        yield from self._stream_gone(sid, ws, reason, later=later)

    def _stream_gone(
        self, sid: int, ws: UpstreamStream, error: str | NeedsHttp1, *, later: bool = False
    ) -> layer.CommandGenerator[None]:
        """The upstream stream ended abnormally: an open WebSocket sees its
        peer close; a waiting handshake fails with `error` (or moves to
        HTTP/1.1, when that is a NeedsHttp1)."""
        del self.websockets[sid]
        self.streams.pop(sid, None)
        if ws.is_open:
            end = http_layers.ResponseEndOfMessage(sid)
        else:
            if ws.relay_from is not None:
                ws.relay_from.step(ClientStep.UPSTREAM_FAILED)
            end = error if isinstance(error, NeedsHttp1) else response_error(sid, error)
        yield self.backlog.defer(end) if later else http_layers.ReceiveHttp(end)

    def close_connection(self, msg: str) -> layer.CommandGenerator[None]:
        self.closed = True
        for ws in self.websockets.values():
            if ws.phase is UpstreamPhase.WAITING and ws.relay_from is not None:
                ws.relay_from.step(ClientStep.UPSTREAM_FAILED)
        yield from self.backlog.due_now()
        yield from _close_open_websockets(self, http_layers.ResponseEndOfMessage)
        yield from super().close_connection(msg)


def _error_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)

