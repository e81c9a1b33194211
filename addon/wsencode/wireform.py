"""An HTTP/2 WebSocket's handshake shown on its flow as it was on the wire.

The bridge hands mitmproxy's HTTP stream and WebSocket layer an extended
CONNECT (RFC 8441) as the HTTP/1.1 upgrade they are written for: a `GET`
with `upgrade: websocket`, `connection: Upgrade` and a `sec-websocket-key`
the proxy made up, answered by a `101`. Once the addon has a handshake's
outcome, its flow is shown as the client had it (`show_wire_form`): a
`CONNECT` with `:protocol: websocket`, answered by a `200` without the
upgrade's headers. The views, mitmdump's output, flow files and HAR see
that form from then on.

mitmproxy's stream reads the method and the status again after that (it
upgrades on a 101 and routes every WebSocket message by it), so the bridge's
stream gives them their translated values back while mitmproxy's code runs
(`Translation.translate`), and the wire form again before anything else can
read the flow: when that code starts a hook, and when it returns.

Pure mitmproxy data objects; no proxy internals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mitmproxy import http

from .flowview import header
from .report import redact_path

# Headers that belong to an HTTP/1.1 upgrade and are not sent on HTTP/2: the
# client's codec leaves them out of the 200 it sends, and the upstream's out
# of the extended CONNECT. Also content-length: a CONNECT stream's DATA is the
# tunnel, not a body (RFC 9113 section 8.5), and an upstream h2 that counts
# it against a length fails its whole connection.
UPGRADE_ONLY = frozenset(
    {"connection", "upgrade", "keep-alive", "proxy-connection", "transfer-encoding",
     "sec-websocket-key", "sec-websocket-accept", "host", "content-length"}
)
# What the client's codec adds to an extended CONNECT to make it an upgrade.
ADDED_TO_REQUEST = ("upgrade", "connection", "sec-websocket-key")
# The extended CONNECT's pseudo-header, shown first among the request's
# headers as browsers' developer tools show it; mitmproxy has no field for it.
PROTOCOL = ":protocol"

_CONNECT, _GET = b"CONNECT", b"GET"
_OK, _SWITCHING = 200, 101


@dataclass
class Translation:
    """What a flow shown in its wire form gives mitmproxy's stream back while
    the stream's code runs (`translate`): the method `GET`, and for an
    upgraded handshake the status `101`. A value someone changed since (an
    addon failing the handshake with another status) is left as it is, both
    ways."""

    request: http.Request
    response: http.Response | None  # the 101 the stream upgraded on, shown as a 200
    key_sent: str | None  # the Sec-WebSocket-Key the translated GET carried, as records keep it
    # How many runs of the stream's code are on the stack: it can call back
    # into the stream (a codec handing it an event), and only the outermost
    # run's end shows the wire form again.
    running: int = 0

    def enter(self) -> None:
        self.running += 1
        if self.running == 1:
            self.translate()

    def leave(self) -> None:
        self.running -= 1
        if self.running == 0:
            self.show_wire_form()

    def translate(self) -> None:
        if self.request.data.method == _CONNECT:
            self.request.data.method = _GET
        if self.response is not None and self.response.data.status_code == _OK:
            self.response.data.status_code = _SWITCHING

    def show_wire_form(self) -> None:
        if self.request.data.method == _GET:
            self.request.data.method = _CONNECT
        if self.response is not None and self.response.data.status_code == _SWITCHING:
            self.response.data.status_code = _OK


def show_wire_form(f: http.HTTPFlow) -> Translation:
    """Show an extended CONNECT's flow as the client sent and got it; returns
    what mitmproxy's stream needs back while it runs."""
    request = f.request
    key_sent = header(request.headers, "sec-websocket-key")
    request.data.method = _CONNECT
    for name in ADDED_TO_REQUEST:
        request.headers.pop(name, None)
    if PROTOCOL not in request.headers:
        request.headers.insert(0, PROTOCOL, "websocket")
    upgraded = f.response if f.response is not None and f.response.status_code == _SWITCHING else None
    if upgraded is not None:
        upgraded.data.status_code = _OK
        upgraded.data.reason = b""  # HTTP/2 has none
        upgraded.data.http_version = request.data.http_version  # an HTTP/1.1 upstream's was its own
        upgraded.headers = http.Headers(
            [(k, v) for k, v in upgraded.headers.fields if k.lower().decode("latin-1") not in UPGRADE_ONLY]
        )
    return Translation(request, upgraded, key_sent)


def described(path: str, record: Mapping[str, Any], key_sent: str | None, shown: bool) -> tuple[str, dict]:
    """What an HTTP/2 client's handshake to `path` was on the wire and where
    the proxy translated it, as a comment line and metadata, from its
    record. `shown`: the flow itself has the wire form now; else it keeps
    the GET upgrade and 101 mitmproxy's stream ran."""
    status, upstream = record["status"], record["upstream_transport"]
    meta = {"client_sent": "CONNECT :protocol websocket (RFC 8441)", "client_got": status}
    got = f"→ {status}" if status is not None else "→ no status"
    # The path is what mitmproxy's views leave out of a CONNECT's URL.
    line = f"On the wire: HTTP/2 extended CONNECT (:protocol websocket) {redact_path(path) or '/'} {got}"
    line += "; the proxy ran it as a GET upgrade" if shown else "; shown as the GET upgrade the proxy ran"
    if upstream == "h1":
        meta |= {"upstream_sent": "GET Upgrade: websocket (HTTP/1.1)", "sec_websocket_key_sent": key_sent}
        line += f", and sent the HTTP/1.1 upstream that GET (Sec-WebSocket-Key {key_sent})"
    elif upstream == "h2":
        meta["upstream_sent"] = "CONNECT :protocol websocket (RFC 8441)"
        line += " (the HTTP/2 upstream got the extended CONNECT)"
    if record["upstream_status"] is not None:
        meta["upstream_status"] = record["upstream_status"]
        line += f", answered {record['upstream_status']}"
    return line + ".", meta
