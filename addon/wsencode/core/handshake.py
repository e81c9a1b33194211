"""What a WebSocket handshake is, read from a request's headers alone; and
an event-stream opening, which the addon follows the same way.

Pure functions, no I/O and no mitmproxy state: `classify` is called for every
request, so it answers `None` for ordinary traffic as cheaply as it can.

mitmproxy sets `flow.websocket` only just before the `response` hook, and only
for a strictly valid handshake, so the addon cannot use it (nor the
`~websocket` filter) while the handshake is still waiting: it classifies here.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from ..report import printable
from .records import EVENT_STREAM, WEBSOCKET


class Transport(str, enum.Enum):
    """The HTTP version a handshake travels on, as the report names it."""

    H1 = "h1"
    H2 = "h2"
    H3 = "h3"


# mitmproxy's spelling of the HTTP version on requests and responses.
_TRANSPORTS = {"HTTP/2.0": Transport.H2, "HTTP/3": Transport.H3}


def transport_of(http_version: str) -> Transport:
    return _TRANSPORTS.get(http_version, Transport.H1)


class Headers(Protocol):
    """The part of `mitmproxy.http.Headers` classification needs: its raw
    fields, read in one pass (each lookup by name is a pass of its own)."""

    fields: tuple[tuple[bytes, bytes], ...]


class Request(Protocol):
    """The part of `mitmproxy.http.Request` classification needs."""

    method: str
    http_version: str
    headers: Headers


# The headers a handshake is read from, by their lowercase names (and an
# extended CONNECT's `:protocol`, which the flow keeps as a header field).
_UPGRADE, _CONNECTION, _KEY, _VERSION = b"upgrade", b"connection", b"sec-websocket-key", b"sec-websocket-version"
_PROTOCOL = b":protocol"
_ACCEPT = b"accept"
_READ = frozenset({_UPGRADE, _CONNECTION, _KEY, _VERSION, _PROTOCOL})
_READ_WITH_ACCEPT = _READ | {_ACCEPT}


def _handshake_headers(headers: Headers, read: frozenset[bytes] = _READ) -> dict[bytes, list[str]]:
    """Each of the headers a handshake is read from that `headers` has, with
    all its values in order, decoded as mitmproxy decodes them: one pass over
    the fields for every request, most of which are not handshakes."""
    found: dict[bytes, list[str]] = {}
    for name, value in headers.fields:
        name = name.lower()
        if name in read:
            found.setdefault(name, []).append(value.decode("utf-8", "surrogateescape"))
    return found


def tokens(values: Iterable[str]) -> list[str]:
    """Comma-separated header values as lowercase tokens, empty items dropped.

    `Connection` and `Upgrade` may repeat and carry lists such as
    `",,\\t,  , ,Upgrade  ,,"` (RFC 9110 section 5.6.1).
    """
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


def _upgrade_protocols(values: Iterable[str]) -> list[str]:
    # `websocket/13` style versions are allowed by RFC 9110; compare the name only.
    return [t.split("/", 1)[0] for t in tokens(values)]


class Form(enum.Enum):
    """How a client asks for a WebSocket."""

    UPGRADE = "upgrade"  # HTTP/1.1: GET with Upgrade: websocket (RFC 6455)
    EXTENDED_CONNECT = "extended CONNECT"  # HTTP/2 and HTTP/3: CONNECT with :protocol (RFC 8441, RFC 9220)
    # Not a WebSocket: a request that accepts text/event-stream (what
    # EventSource sends), whose response head the same encoders hold back.
    EVENT_STREAM = "event stream"



@dataclass(frozen=True)
class Handshake:
    """A request recognised as a WebSocket handshake.

    `problems` lists what is wrong with it (each a short sentence naming the
    header, never its value): a malformed handshake is still a handshake,
    reported rather than ignored, because that is what the server will see.
    """

    transport: Transport
    problems: tuple[str, ...] = ()
    form: Form = Form.UPGRADE

    @property
    def malformed(self) -> bool:
        return bool(self.problems)

    @property
    def is_websocket(self) -> bool:
        return self.form is not Form.EVENT_STREAM

    @property
    def kind(self) -> str:
        """The record's `kind`."""
        return WEBSOCKET if self.is_websocket else EVENT_STREAM

    def is_success(self, status: int) -> bool:
        """Whether `status`, as the client got it, completes this handshake:
        an upgrade switches protocols with 101; RFC 8441 and RFC 9220 answer
        the extended CONNECT with any 2xx, and an event stream opens with a
        2xx head."""
        if self.form is Form.UPGRADE:
            return status == 101
        return 200 <= status < 300


def _key_problem(keys: list[str]) -> str | None:
    if not keys:
        return "Sec-WebSocket-Key is missing"
    if len(keys) > 1:
        return "Sec-WebSocket-Key is repeated"
    try:
        raw = base64.b64decode(keys[0].strip(), validate=True)
    except ValueError:  # binascii.Error, or a character that is not ASCII
        return "Sec-WebSocket-Key is not base64"
    if len(raw) != 16:
        return f"Sec-WebSocket-Key decodes to {len(raw)} bytes, not 16"
    return None


def _version_problem(versions: list[str]) -> str | None:
    if not versions:
        return "Sec-WebSocket-Version is missing"
    if ", ".join(versions).strip() != "13":  # (a repeated one, joined as mitmproxy's Headers.get does, is not 13)
        return "Sec-WebSocket-Version is not 13"
    return None


def _h1_problems(method: str, headers: dict[bytes, list[str]], protocols: list[str]) -> Iterable[str]:
    if method.upper() != "GET":
        yield f"the method is {printable(method[:16])}, not GET"
    if "upgrade" not in tokens(headers.get(_CONNECTION, ())):
        yield "Connection does not list upgrade"
    if any(p != "websocket" for p in protocols):
        yield "Upgrade offers other protocols besides websocket"
    elif len(protocols) > 1:
        # Servers (and mitmproxy, which then never sees a WebSocket) compare
        # the whole Upgrade value to "websocket".
        yield "Upgrade names websocket more than once"
    for problem in (_key_problem(headers.get(_KEY, [])), _version_problem(headers.get(_VERSION, []))):
        if problem:
            yield problem


EVENT_STREAM_TYPE = "text/event-stream"


def is_event_stream_type(content_type: str | None) -> bool:
    """Whether a response's content-type is an event stream's (parameters aside)."""
    return (content_type or "").split(";", 1)[0].strip().lower() == EVENT_STREAM_TYPE


def accepts_event_stream(values: Iterable[str]) -> bool:
    """Whether `Accept` asks for text/event-stream by name, with a q above
    zero (`*/*`, which every navigation sends, does not count)."""
    for item in (t for v in values for t in v.split(",")):
        media, *params = item.split(";")
        if media.strip().lower() != "text/event-stream":
            continue
        q = next((p.split("=", 1)[1].strip() for p in params if p.strip().lower().startswith("q=")), "1")
        try:
            if float(q) > 0:
                return True
        except ValueError:
            continue
    return False


def classify(request: Request, transport: Transport | None = None, event_streams: bool = False) -> Handshake | None:
    """The handshake `request` opens, or None if it opens none.

    HTTP/1.1: `Upgrade` lists websocket. HTTP/2 and HTTP/3: a CONNECT with
    `:protocol: websocket`, which the flow keeps as a header field. The
    transport is the connection's when the caller knows it (an HTTP/1.1
    client can write `HTTP/2.0` in its request line), else the request's
    version. With `event_streams`, a request that accepts
    text/event-stream and opens no WebSocket opens an event stream.
    """
    headers = _handshake_headers(request.headers, _READ_WITH_ACCEPT if event_streams else _READ)
    transport = transport or transport_of(request.http_version)
    if _PROTOCOL in headers and request.method == "CONNECT":
        if [p.strip().lower() for p in headers[_PROTOCOL]] != ["websocket"]:
            return None
        problem = _version_problem(headers.get(_VERSION, []))
        return Handshake(transport, (problem,) if problem else (), Form.EXTENDED_CONNECT)
    protocols = _upgrade_protocols(headers.get(_UPGRADE, ()))
    if "websocket" in protocols:
        return Handshake(transport, tuple(_h1_problems(request.method, headers, protocols)))
    if _ACCEPT in headers and request.method != "CONNECT" and accepts_event_stream(headers[_ACCEPT]):
        return Handshake(transport, form=Form.EVENT_STREAM)
    return None


def classify_event_stream(request: Request, transport: Transport) -> Handshake | None:
    """The event stream `request` opens, for a request already known to open
    no WebSocket (one pass over its fields for `Accept` alone)."""
    accept = _handshake_headers(request.headers, frozenset({_ACCEPT})).get(_ACCEPT)
    if accept and request.method != "CONNECT" and accepts_event_stream(accept):
        return Handshake(transport, form=Form.EVENT_STREAM)
    return None
