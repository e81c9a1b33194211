"""An extended CONNECT's WebSocket to an HTTP/1.1 upstream, at mitmproxy's HTTP/1.1 codec.

Where mitmproxy already converts HTTP/2 and HTTP/3 requests to HTTP/1.1,
`WsHttp1Client` sends a WebSocket that a client opened with an extended
CONNECT as the upgrade that asks the same (RFC 6455 section 4.1), and hands
the stream the 2xx that client expects once the 101 answers the proxy's key.
"""

from __future__ import annotations

import dataclasses
import logging

from mitmproxy import http
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1

from ..core.extconnect import answer_problem, new_key, success_fields, upgrade_fields
from ..core.streamfacts import StreamFacts, facts_for
from ..report import printable
from .common import BAD_UPSTREAM_ANSWER, is_extended_connect

STREAM_ZERO = -1  # stream 0, inside WsHttp1Client

class WsHttp1Client(_http1.Http1Client):
    """mitmproxy's upstream HTTP/1.1 codec, which also sends an extended
    CONNECT's WebSocket as the HTTP/1.1 upgrade that asks the same (RFC 6455
    section 4.1) with a key of the proxy's own, and hands the stream the 2xx
    its client expects once the 101 answers that key. An answer that does not
    open the WebSocket yet reads as if it did (a 101 with a wrong accept, a
    2xx that ignored the upgrade) is the proxy's 502, and the connection
    closes; any other refusal reaches the client as it is."""

    ws_key: str | None = None  # the key of the upgrade this codec made for the request in flight
    ws_facts: StreamFacts | None = None  # that request's
    ws_refused = False  # the proxy refused that request's answer: the rest of it goes nowhere

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        # mitmproxy's HTTP/1.1 codec takes a stream id of 0 for none
        # (`assert self.stream_id`), and an HTTP/3 client's first request is
        # stream 0 (its stock codec fails on the upgrade): inside this codec
        # that stream has another id.
        if isinstance(event, http_layers.HttpEvent) and event.stream_id == 0:
            event = dataclasses.replace(event, stream_id=STREAM_ZERO)
        for command in super()._handle_event(event):
            if isinstance(command, http_layers.ReceiveHttp) and command.event.stream_id == STREAM_ZERO:
                command = http_layers.ReceiveHttp(dataclasses.replace(command.event, stream_id=0))
            yield command

    def send(self, event: http_layers.HttpEvent) -> layer.CommandGenerator[None]:
        if isinstance(event, http_layers.RequestHeaders):
            self.ws_key = new_key() if is_extended_connect(event.request) else None
            if self.ws_key is not None:
                self.ws_facts = facts_for(event.request)
                self.ws_facts.key_sent = self.ws_key
                event = http_layers.RequestHeaders(event.stream_id, as_upgrade(event.request, self.ws_key), event.end_stream)
        yield from super().send(event)

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        if self.ws_key is None:
            return (yield from super().read_headers(event))
        for command in super().read_headers(event):
            if isinstance(command, http_layers.ReceiveHttp) and isinstance(command.event, http_layers.ResponseHeaders):
                yield from self._answer(command.event)
            elif not (self.ws_refused and isinstance(command, http_layers.ReceiveHttp)):
                yield command
        if self.ws_refused:
            self.state = self.done
            yield commands.CloseConnection(self.conn)

    def _answer(self, event: http_layers.ResponseHeaders) -> layer.CommandGenerator[None]:
        response, sid = event.response, event.stream_id
        facts = self.ws_facts
        facts.upstream_status = response.status_code
        problem = answer_problem(response.status_code, response.headers.fields, self.ws_key)
        if problem is not None:
            self.ws_refused = True
            facts.proxy_refused = problem
            yield commands.Log(f"ws_encode: {problem} ({printable(self.request.host)})", logging.WARNING)
            failed = http.Response.make(BAD_UPSTREAM_ANSWER, f"ws_encode: {problem}\n")
            body, failed.content = failed.content, None
            yield http_layers.ReceiveHttp(http_layers.ResponseHeaders(sid, failed, end_stream=False))
            yield http_layers.ReceiveHttp(http_layers.ResponseData(sid, body))
            yield http_layers.ReceiveHttp(http_layers.ResponseEndOfMessage(sid))
        elif response.status_code == 101:
            opened = http.Response(
                http_version=self.request.data.http_version, status_code=200, reason=b"",
                headers=http.Headers(success_fields(response.headers.fields)), content=None, trailers=None,
                timestamp_start=response.timestamp_start, timestamp_end=None,
            )
            yield http_layers.ReceiveHttp(http_layers.ResponseHeaders(sid, opened, event.end_stream))
        else:
            yield http_layers.ReceiveHttp(event)


def as_upgrade(request: http.Request, key: str) -> http.Request:
    """An extended CONNECT as the upgrade mitmproxy's HTTP/1.1 codec sends:
    it keeps the client's HTTP version, so the codec converts it to HTTP/1.1
    as any HTTP/2 or HTTP/3 request (Host from the authority, one Cookie
    line) and uses the connection for it alone."""
    upgrade = request.copy()
    upgrade.data.method = b"GET"
    upgrade.headers = http.Headers(upgrade_fields(request.headers.fields, key))
    return upgrade

