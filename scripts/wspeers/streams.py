"""What the RFC 8441 (h2ws) and RFC 9220 (h3ws) peers share: a client's
request stream and its answer, the WebSocket a 2xx opens on it, and the
command line.

The WebSocket over an extended CONNECT is the same in HTTP/2 and HTTP/3
(RFC 9220 §3 adopts RFC 8441): the frames ride the stream's DATA, a Close
frame closes the WebSocket and the stream's end (END_STREAM, FIN) is the
TCP close. What differs, how bytes reach the stream and how a stream dies,
each peer module provides.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Optional, Union

from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Event, Ping, Pong

from .messages import CLOSE_UNSENT, MessageConnection

DEFAULT_TIMEOUT = 5.0

Headers = list[tuple[str, str]]
Message = Union[str, bytes]

_STREAM_DONE = object()  # sentinel in the message queue: no more messages


class WebSocketClosed(Exception):
    """The WebSocket stream is over (Close, the stream's end or connection loss)."""


class StreamResetError(WebSocketClosed):
    """The stream was aborted: RST_STREAM in HTTP/2, RESET_STREAM or
    STOP_SENDING in HTTP/3."""

    def __init__(self, stream_id: int, code: int, *, by_peer: bool = True) -> None:
        who = "peer" if by_peer else "us"
        super().__init__(f"stream {stream_id} reset by {who} with error code {code}")
        self.stream_id = stream_id
        self.code = code
        self.by_peer = by_peer


async def wait_first(*events: asyncio.Event, timeout: float) -> None:
    """Return once any of `events` is set; raise asyncio.TimeoutError otherwise."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        done, _pending = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    if not done:
        raise asyncio.TimeoutError()


def split_pseudo(headers: Headers) -> tuple[dict[str, str], Headers]:
    pseudo = {name: value for name, value in headers if name.startswith(":")}
    regular = [(name, value) for name, value in headers if not name.startswith(":")]
    return pseudo, regular


def extended_connect(path: str, authority: str, scheme: str, protocol: str, headers: Headers) -> Headers:
    """The header fields of an extended CONNECT that opens a WebSocket
    (RFC 8441 §4 and §5, which RFC 9220 §3 adopts), then `headers`."""
    return [(":method", "CONNECT"), (":protocol", protocol), (":scheme", scheme), (":path", path),
            (":authority", authority), ("sec-websocket-version", "13"), *headers]


def get_request(path: str, authority: str, scheme: str, headers: Headers) -> Headers:
    return [(":method", "GET"), (":scheme", scheme), (":path", path), (":authority", authority), *headers]


# --------------------------------------------------------------------------
# A client's stream and its WebSocket
# --------------------------------------------------------------------------


class ClientStream:
    """A request stream of a client and its answer: `status`,
    `response_headers`, `response_body` (of an answer that is not a
    WebSocket), `events` (a readable timeline: "status:200", how it ended, ...)
    and `ended_with`, how the peer's side ended first ("end_stream", a reset,
    "connection_lost"; each HTTP version names its own). `_end_sent`: our
    side has ended."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.status: Optional[int] = None
        self.response_headers: Headers = []
        self.response_body = bytearray()
        self.events: list[str] = []
        self.ended_with: Optional[str] = None
        self._end_sent = False
        self._status_known = asyncio.Event()
        self._ended = asyncio.Event()

    async def wait_status(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Return the response :status; raise asyncio.TimeoutError if none came."""
        await asyncio.wait_for(self._status_known.wait(), timeout)
        if self.status is None:
            raise self._ended_error("before a response status arrived")
        return self.status

    async def wait_ended(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Wait until the peer ended or reset the stream; return `ended_with`."""
        await asyncio.wait_for(self._ended.wait(), timeout)
        assert self.ended_with is not None
        return self.ended_with

    def _ended_error(self, what: str) -> WebSocketClosed:
        raise NotImplementedError  # each HTTP version words how its streams die

    # -- called by the client's read loop -----------------------------------

    def _on_response(self, headers: Headers) -> None:
        pseudo, regular = split_pseudo(headers)
        self.status = int(pseudo[":status"])
        self.response_headers = regular
        self.events.append(f"status:{self.status}")
        self._status_known.set()

    def _on_data(self, data: bytes) -> None:
        self.response_body += data

    def _on_ended(self, how: str) -> None:
        if self.ended_with is None:
            self.ended_with = how
        self.events.append(how)
        self._status_known.set()
        self._ended.set()


class WebSocketOnStream(ClientStream):
    """The WebSocket a 2xx opens on a ClientStream, as a client.

    `events` also has "message", "close:<code>" and "parse_failed:<why>";
    `close_code` is the peer's Close frame's code. Each HTTP version provides
    how frames go out: `_dead()` (why nothing can be sent any more, or None),
    `async _send_frames(frames, timeout)`, `_send_now(frame, end_stream)`
    (from inside the read loop) and `_end_our_side()`.
    """

    def __init__(self, stream_id: int) -> None:
        super().__init__(stream_id)
        self.close_code: Optional[int] = None
        self._frames = MessageConnection(ConnectionType.CLIENT)  # the WebSocket (tests send parts through it)
        self._messages: asyncio.Queue = asyncio.Queue()
        self._pongs: asyncio.Queue = asyncio.Queue()
        self._close_received = asyncio.Event()

    async def send_text(self, text: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        await self._send_parts([text], timeout)

    async def send_bytes(self, data: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        await self._send_parts([bytes(data)], timeout)

    async def send_fragmented(self, parts: list[Message], timeout: float = DEFAULT_TIMEOUT) -> None:
        """Send one message as len(parts) frames (all str or all bytes)."""
        if not parts:
            raise ValueError("a fragmented message needs at least one part")
        await self._send_parts(parts, timeout)

    async def ping(self, payload: bytes = b"", timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Send a Ping and return the payload of the next Pong."""
        self._check_sendable()
        await self._send_frames([self._frames.send(Ping(payload))], timeout)
        return await asyncio.wait_for(self._pongs.get(), timeout)

    async def receive(self, timeout: float = DEFAULT_TIMEOUT) -> Message:
        """Return the next whole message (str for text, bytes for binary)."""
        item = await asyncio.wait_for(self._messages.get(), timeout)
        if item is _STREAM_DONE:
            self._messages.put_nowait(_STREAM_DONE)  # later calls fail fast too
            raise self._ended_error("while waiting for a message")
        return item

    async def close(self, code: int = 1000, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Close handshake: send Close, await the peer's Close, then end the stream both ways.

        Our end goes out after the peer's Close (not after its end of the
        stream) so that peers waiting for ours before sending theirs work too.
        """
        if self._dead():
            return  # reset or connection gone: nothing left to close
        if self._frames.state in CLOSE_UNSENT:
            self._check_sendable()
            await self._send_frames([self._frames.send(CloseConnection(code))], timeout)
        await wait_first(self._close_received, self._ended, timeout=timeout)
        self._end_our_side()
        await asyncio.wait_for(self._ended.wait(), timeout)

    def half_close(self) -> None:
        """End our side of the stream without a Close frame; the peer's is left to it."""
        self._end_our_side()

    async def _send_parts(self, parts: list[Message], timeout: float) -> None:
        """One message in len(parts) frames."""
        self._check_sendable()
        last = len(parts) - 1
        await self._send_frames([self._frames.send_data(part, fin=i == last) for i, part in enumerate(parts)], timeout)

    def _check_sendable(self) -> None:
        if self._dead():
            raise self._ended_error("before sending")
        if self._end_sent:
            raise WebSocketClosed(f"stream {self.stream_id}: our side of the stream has ended")

    # -- called by the client's read loop -----------------------------------

    def _on_data(self, data: bytes) -> None:
        if self.status is None or not 200 <= self.status < 300:
            super()._on_data(data)  # a refusal's body, not WebSocket frames
            return
        for event in self._frames.messages(data):
            self._on_received(event)

    def _on_received(self, event: Union[Message, Event]) -> None:
        if isinstance(event, (str, bytes)):  # a whole message
            self._messages.put_nowait(event)
            self.events.append("message")
        elif isinstance(event, Ping):
            if not self._end_sent:  # after our end the pong has no way out
                self._send_now(self._frames.answer(event))
        elif isinstance(event, Pong):
            self._pongs.put_nowait(bytes(event.payload))
        elif isinstance(event, CloseConnection):
            if self._frames.state in (ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED):
                self.close_code = int(event.code)
                self.events.append(f"close:{self.close_code}")
            else:  # wsproto's word on bytes that are not frames
                self.events.append(f"parse_failed:{event.reason}")
            self._close_received.set()
            self._messages.put_nowait(_STREAM_DONE)
            if self._frames.state in CLOSE_UNSENT:
                # The peer started the closing handshake (or broke the protocol): answer and finish.
                self._send_now(self._frames.answer(event), end_stream=True)

    def _on_ended(self, how: str) -> None:
        super()._on_ended(how)
        self._messages.put_nowait(_STREAM_DONE)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME:VALUE, got {text!r}")
    return name.strip().lower(), value.strip()


def add_server_arguments(server: argparse.ArgumentParser, transport: str) -> None:
    """What both servers take; `transport` names the port ("TCP", "UDP")."""
    server.add_argument("--port", type=int, default=0, help=f"{transport} port to listen on (0: pick one)")
    server.add_argument("--cert", help="PEM certificate (default: fresh self-signed for localhost)")
    server.add_argument("--key", help="PEM private key belonging to --cert")
    server.add_argument(
        "--withhold",
        action="store_true",
        help="hold the :status of extended CONNECTs that carry accept-encoding "
        "until the first body bytes exist (reproduces the stall)",
    )
    server.add_argument("--no-connect-protocol", action="store_true",
                        help="do not advertise SETTINGS_ENABLE_CONNECT_PROTOCOL")
    server.add_argument("--status", type=int, default=200, help="status for extended CONNECT")
    server.add_argument("--header", type=parse_header, action="append", default=[], metavar="NAME:VALUE",
                        help="extra response header for extended CONNECT (repeatable)")


def add_client_arguments(client: argparse.ArgumentParser) -> None:
    client.add_argument("--url", required=True, help="e.g. https://127.0.0.1:8443/chat")
    client.add_argument("--accept-encoding", metavar="VALUE", help="send accept-encoding: VALUE")
    client.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per step")
    client.add_argument("--message", default="hello", help="text message to send")


CLIENT_EXIT_STATUS = "Exit status: 0 echo received, 1 no :status arrived (stalled handshake), 2 any other failure."


def server_files(args: argparse.Namespace, make_cert: Callable[[str], tuple[str, str]]) -> tuple[str, str]:
    """--cert and --key, or a fresh self-signed pair."""
    if args.cert and args.key:
        return args.cert, args.key
    return make_cert(tempfile.mkdtemp(prefix="wspeers-"))


async def serve_until_cancelled(server, listening: str) -> None:
    """Start `server`, say where it listens (`listening` formatted with its
    port), and serve until Ctrl-C cancels us."""
    await server.start()
    print(listening.format(port=server.port), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


async def echo_client(args: argparse.Namespace, new_client, connect_errors: tuple[type[BaseException], ...],
                      connected: Callable[[object], None] = lambda client: None) -> int:
    """The command line's client: open one WebSocket at --url, send
    --message, print the echo; returns the exit status (CLIENT_EXIT_STATUS).
    `connected(client)` may say something about the server's SETTINGS."""
    url = urllib.parse.urlsplit(args.url)
    if url.scheme != "https" or not url.hostname:
        print(f"expected an https:// URL, got {args.url!r}", file=sys.stderr)
        return 2
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    headers = [("accept-encoding", args.accept_encoding)] if args.accept_encoding else []

    client = new_client(url.hostname, url.port or 443)
    try:
        try:
            await client.connect(args.timeout)
        except connect_errors as exc:
            print(f"could not connect to {url.netloc}: {exc!r}", file=sys.stderr)
            return 2
        connected(client)
        try:
            ws = await client.open_websocket(path, url.netloc, headers=headers)
        except ConnectionError as exc:
            print(f"no WebSocket opened: {exc}")
            return 2
        try:
            status = await ws.wait_status(args.timeout)
        except asyncio.TimeoutError:
            print(f"no :status for the extended CONNECT within {args.timeout} s (handshake stalled)")
            await ws.reset()
            return 1
        except WebSocketClosed as exc:
            print(f"stream ended before a status: {exc}")
            return 2
        print(f"status {status}")
        if not 200 <= status < 300:
            await ws.wait_ended(args.timeout)
            print(f"rejected: {bytes(ws.response_body)!r}")
            return 2
        await ws.send_text(args.message, args.timeout)
        print(f"echo: {await ws.receive(args.timeout)}")
        await ws.close(timeout=args.timeout)
        return 0
    except (asyncio.TimeoutError, WebSocketClosed, ConnectionError) as exc:
        print(f"failed after the handshake: {exc!r}")
        return 2
    finally:
        await client.close(args.timeout)


def run(args: argparse.Namespace, serve: Callable[[argparse.Namespace], Awaitable[None]],
        client: Callable[[argparse.Namespace], Awaitable[int]]) -> int:
    """Run the `server` or `client` command; returns the exit status."""
    if args.command == "server":
        if bool(args.cert) != bool(args.key):
            print("--cert and --key go together", file=sys.stderr)
            return 2
        try:
            asyncio.run(serve(args))
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
        return 0
    return asyncio.run(client(args))
