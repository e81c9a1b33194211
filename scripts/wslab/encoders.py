"""A response-compression middleware (ASGI) with the encoder behaviours that shipped.

Each behaviour is what a real compression layer did with a WebSocket
handshake or an event stream (text/event-stream); the public reports are
cited in HELP. All of them compress ordinary responses for real (see
`codings`); they differ in when they let the status out, whether they flush
what the application flushes, and what they do to an upgrade.

The middleware sees the ASGI scope, so it knows what the server will put on
the wire: over HTTP/1.1 `websocket.accept` becomes a `101`, an informational
status that encoders write at once (except `hold-1xx`); over HTTP/2 it
becomes the `200` that answers an extended CONNECT (RFC 8441), a final
status that an encoder which waits for the body holds back.
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Awaitable, Callable
from typing import Any

from .codings import Encoder, NotAcceptable, choose
from .sse import is_event_stream

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]

MIN_SIZE = 1024

# Set while a held status goes out. A real encoder writes the status it held
# and the first body bytes in one flush (Go's HTTP/2 server buffers both for
# Caddy); a server that can (see server.py) writes them together too.
RELEASING_HELD_STATUS: contextvars.ContextVar[bool] = contextvars.ContextVar("releasing_held_status", default=False)
COMPRESSIBLE = ("text/", "application/json", "application/javascript", "application/xml", "image/svg")


class Behaviour(str, enum.Enum):
    HOLD_UNTIL_BODY = "hold-until-body"
    HOLD_UNTIL_MIN_SIZE = "hold-until-min-size"
    HOLD_1XX = "hold-1xx"
    ENCODE_UPGRADE = "encode-upgrade"
    BUFFER_EVENTS = "buffer-events"
    FIXED = "fixed"


# The behaviours a WebSocket handshake meets: what buffer-events emulates never
# wraps one (Starlette's GZipMiddleware leaves websocket scopes alone, Express's
# compression never sees an upgrade), so there a handshake is the application's own.
HANDSHAKE_BEHAVIOURS = tuple(b for b in Behaviour if b is not Behaviour.BUFFER_EVENTS)


HELP = {
    Behaviour.HOLD_UNTIL_BODY: (
        "status and headers held until the first body byte, so the coding can still be chosen: "
        "Caddy's encode before 2.9 (caddyserver/caddy#6733); on an HTTP/2 extended CONNECT the 200 "
        "waits for the server's first message. An event stream's head waits for its first event, "
        "the handler's flush ignored, as in Caddy's encode until #7905 (caddyserver/caddy#6293); "
        "each event after it is flushed as written. Also how Traefik's compress and Starlette's "
        "GZipMiddleware hold the response start."
    ),
    Behaviour.HOLD_UNTIL_MIN_SIZE: (
        "held until {min_size} bytes or the end, flushes ignored meanwhile: NYTimes gziphandler "
        "before its fix (nytimes/gziphandler#60, #74); a server that speaks first with small "
        "messages stalls too, and an event stream gets neither its head nor an event until its "
        "events add up to {min_size} bytes (SSE died whenever the client offered gzip, #74)."
    ),
    Behaviour.HOLD_1XX: (
        "an HTTP/1.1 101 held until the first bytes after it (final statuses as hold-until-body): "
        "Caddy's encode before 2.7 (caddyserver/caddy#5412, fixed by #5419)."
    ),
    Behaviour.ENCODE_UPGRADE: (
        "the successful upgrade response gets content-encoding and what the tunnel carries is "
        "compressed: Envoy's compressor regression (envoyproxy/envoy#14405, reverted in #14567). "
        "ASGI hands the middleware messages, not the tunnel's bytes, so each message the server "
        "sends is replaced by its compressed bytes from one running stream."
    ),
    Behaviour.BUFFER_EVENTS: (
        "the status goes out with the first body write, but the body is compressed without a "
        "flush: events stay in the compressor until its own buffer fills (with the lab's small "
        "events, about 220 KB for gzip, 128 KB for zstd, more than 5 MB for br) or the stream "
        "ends, so they arrive late and in bursts, gzip's first chunk its 10-byte header alone: "
        "Starlette's GZipMiddleware before it "
        "left event streams alone (Kludex/starlette#2753, #2871), Express's compression without "
        "res.flush() (expressjs/compression#17). WebSockets pass through, never wrapped."
    ),
    Behaviour.FIXED: (
        "a 2xx to an extended CONNECT and a 101 go out at once and are never encoded, while a "
        "failed upgrade's error page is still encoded: Caddy 2.9 and later (caddyserver/caddy#6738, #6740). "
        "An event stream's head goes out at once and each event is compressed and flushed as it "
        "is written (caddyserver/caddy#7905, cloudflare/workerd#7390)."
    ),
}


def header(scope: Message, name: bytes) -> str | None:
    values = [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == name]
    return ", ".join(values) if values else None


def is_http1(scope: Message) -> bool:
    return scope.get("http_version", "1.1") in ("1.0", "1.1")


def encoded_headers(headers, coding: str) -> list[tuple[bytes, bytes]]:
    """The headers of a response that goes out encoded: its length is no longer
    known, and `vary` gains accept-encoding (kept with what it named before)."""
    vary = [v for k, v in headers if k.lower() == b"vary"]
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"vary", b"content-encoding")]
    return kept + [(b"content-encoding", coding.encode()), (b"vary", b", ".join([*vary, b"accept-encoding"]))]


class ResponseEncoding:
    """One ordinary response (or a refused upgrade's error page) through the encoder.

    States: WAITING (no start yet) -> HOLDING (start kept, body buffered) ->
    SENT (start written). What ends HOLDING is the behaviour's whole
    difference for ordinary responses:
      encode-upgrade (Envoy): never holds; it decides from the headers.
      fixed (Caddy 2.9, and #7905 for event streams): an event stream's
        start goes out at once, encoded; otherwise as the rest.
      hold-until-min-size (gziphandler): min_size body bytes, or the end;
        an empty chunk (a flush) changes nothing.
      the rest (Caddy, Traefik, Starlette): the first non-empty body chunk,
        or the end; an empty flush before it is dropped.
    Once SENT, each body chunk is compressed and flushed with the codec's
    sync flush, except under buffer-events (Starlette, Express), which only
    passes on what its compressor lets out by itself.
    """

    def __init__(self, behaviour: Behaviour, coding: str, send: Send, min_size: int, prefix: str) -> None:
        self.behaviour = behaviour
        self.coding = coding
        self._send = send
        self.min_size = min_size
        self.prefix = prefix  # "http.response" or "websocket.http.response"
        self.state = "WAITING"
        self.start: Message | None = None
        self.held: list[bytes] = []
        self.encoder: Encoder | None = None

    def _released_at_once(self, start: Message) -> bool:
        if self.behaviour is Behaviour.FIXED:
            return is_event_stream(header(start, b"content-type"))
        return self.behaviour is Behaviour.ENCODE_UPGRADE

    def _compressible(self, start: Message) -> bool:
        headers = {k.lower(): v for k, v in start.get("headers", [])}
        content_type = headers.get(b"content-type", b"").decode("latin-1").lower()
        return (
            start["status"] not in (204, 304)
            and b"content-encoding" not in headers
            and content_type.startswith(COMPRESSIBLE)
        )

    async def _release(self, encode: bool, more: bool) -> None:
        """Write the start, encoded or not, then the body held so far."""
        assert self.start is not None
        start = dict(self.start)
        if encode:
            self.encoder = Encoder(self.coding)
            start["headers"] = encoded_headers(start.get("headers", []), self.coding)
        self.state = "SENT"
        await self._send(start)
        data, self.held = b"".join(self.held), []
        if data or not more:
            await self._body(data, more)

    async def _body(self, data: bytes, more: bool) -> None:
        if self.encoder:
            data = self.encoder.compress(data) + (self._flush() if more else self.encoder.finish())
            if not data and more:
                return  # the compressor kept it all
        await self._send({"type": f"{self.prefix}.body", "body": data, "more_body": more})

    def _flush(self) -> bytes:
        assert self.encoder is not None
        return b"" if self.behaviour is Behaviour.BUFFER_EVENTS else self.encoder.flush()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == f"{self.prefix}.start":
            self.start = message
            self.state = "HOLDING"
            if self._released_at_once(message):
                await self._release(self._compressible(message), more=True)
            return
        if kind != f"{self.prefix}.body":
            await self._send(message)
            return
        body, more = bytes(message.get("body", b"")), bool(message.get("more_body", False))
        if self.state == "SENT":
            if body or not more:
                await self._body(body, more)
            elif self.encoder is None:
                await self._send(message)  # an uncompressed flush passes
            return
        # HOLDING: the encoder still owns the status.
        self.held.append(body)
        size = sum(map(len, self.held))
        if self.behaviour is Behaviour.HOLD_UNTIL_MIN_SIZE:
            if size >= self.min_size or not more:
                # below the minimum at the end: sent as is
                await self._release(size >= self.min_size and self._compressible(self.start), more)
        elif size or not more:
            await self._release(bool(size) and self._compressible(self.start), more)

    async def end(self) -> None:
        """The application returned: a held start goes out now, as a handler's end flushes it."""
        if self.state == "HOLDING":
            await self._release(False, more=False)


class WebSocketEncoding:
    """One WebSocket handshake through the encoder.

    States: OPENING (before websocket.accept) -> HOLDING (accept kept,
    messages buffered) -> OPEN; or a refusal, which is an ordinary response
    (`ResponseEncoding` with the websocket.http.response prefix), so every
    behaviour encodes a failed upgrade's error page.
    """

    def __init__(self, behaviour: Behaviour, coding: str, scope: Message, send: Send, min_size: int) -> None:
        self.behaviour = behaviour
        self.coding = coding
        self._send = send
        self.min_size = min_size
        self.h1 = is_http1(scope)
        self.state = "OPENING"
        self.accept: Message | None = None
        self.held: list[Message] = []
        self.encoder: Encoder | None = None
        self.refusal = ResponseEncoding(behaviour, coding, send, min_size, "websocket.http.response")

    def _holds_accept(self) -> bool:
        if self.behaviour is Behaviour.HOLD_1XX:
            return True  # Caddy < 2.7 stored a 101 like any status and never flushed it
        if self.behaviour in (Behaviour.HOLD_UNTIL_BODY, Behaviour.HOLD_UNTIL_MIN_SIZE):
            # Over HTTP/1.1 the 101 is informational and goes out at once
            # (Caddy 2.7+ writes 1xx immediately; gziphandler's Hijack passes
            # it through). Over HTTP/2 the 200 is a final status: held.
            return not self.h1
        return False  # encode-upgrade decides from headers; fixed passes upgrades through

    def _enough(self) -> bool:
        if self.behaviour is Behaviour.HOLD_UNTIL_MIN_SIZE:
            return sum(len(m.get("bytes") or (m.get("text") or "").encode()) for m in self.held) >= self.min_size
        return bool(self.held)  # the first message is the first body byte

    async def _open(self) -> None:
        assert self.accept is not None
        accept = dict(self.accept)
        if self.behaviour is Behaviour.ENCODE_UPGRADE:
            self.encoder = Encoder(self.coding)
            accept["headers"] = encoded_headers(accept.get("headers", []), self.coding)
        was_held, self.state = self.state == "HOLDING" and bool(self.held), "OPEN"
        token = RELEASING_HELD_STATUS.set(was_held)
        try:
            await self._send(accept)
        finally:
            RELEASING_HELD_STATUS.reset(token)
        held, self.held = self.held, []
        for message in held:
            await self._message(message)

    async def _message(self, message: Message) -> None:
        if self.encoder and message["type"] == "websocket.send":
            payload = message.get("bytes") or (message.get("text") or "").encode()
            message = {"type": "websocket.send", "bytes": self.encoder.compress(payload) + self.encoder.flush()}
        await self._send(message)

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind.startswith("websocket.http.response."):
            await self.refusal.send(message)
        elif kind == "websocket.accept" and self.state == "OPENING":
            self.accept = message
            self.state = "HOLDING"
            if not self._holds_accept():
                await self._open()
        elif self.state == "HOLDING" and kind == "websocket.send":
            self.held.append(message)
            if self._enough():
                await self._open()
        elif self.state == "HOLDING" and kind == "websocket.close":
            await self._open()  # the handler ending flushes what the encoder held
            await self._send(message)
        else:
            await self._message(message)

    async def end(self) -> None:
        await self.refusal.end()
        if self.state == "HOLDING":
            await self._open()


class EncodingMiddleware:
    """ASGI middleware: compress responses as `behaviour` does."""

    def __init__(self, app, behaviour: Behaviour | str, min_size: int = MIN_SIZE) -> None:
        self.app = app
        self.behaviour = Behaviour(behaviour)
        self.min_size = min_size

    async def __call__(self, scope: Message, receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        try:
            coding = choose(header(scope, b"accept-encoding"))
        except NotAcceptable:
            coding = None
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": 406,
                            "headers": [(b"content-type", b"text/plain")]})
                await send({"type": "http.response.body", "body": b"no acceptable content-coding\n"})
                return
        if coding is None or (scope["type"] == "websocket" and self.behaviour not in HANDSHAKE_BEHAVIOURS):
            # Nothing to encode, or an encoder that never sees upgrades: not wrapped at all.
            return await self.app(scope, receive, send)
        if scope["type"] == "http":
            wrapper: ResponseEncoding | WebSocketEncoding = ResponseEncoding(
                self.behaviour, coding, send, self.min_size, "http.response")
        else:
            wrapper = WebSocketEncoding(self.behaviour, coding, scope, send, self.min_size)
        await self.app(scope, receive, wrapper.send)
        await wrapper.end()
