"""What an extended CONNECT's handshake was on the wire, said on its flow.

The flow itself is what the client sent and got (CONNECT with `:protocol`,
answered by a 2xx: `extconnect`). Two things it cannot say are said in a
comment line and in `flow.metadata["ws_encode_wire"]`: the path, which
mitmproxy's views and HAR leave out of every CONNECT's URL (they take a
CONNECT for authority-form, `Request.first_line_format`), and where the proxy
translated — the HTTP/1.1 upgrade it sent an HTTP/1.1 upstream, with its key,
and what that upstream answered.
"""

from __future__ import annotations

from typing import Any

from ..core.records import Record
from ..report import redact_path

_RFC = {"h2": "RFC 8441", "h3": "RFC 9220"}
_HTTP = {"h2": "HTTP/2", "h3": "HTTP/3"}


def described(path: str, record: Record, key_sent: str | None) -> tuple[str, dict]:
    """The comment line and metadata for an extended CONNECT to `path`, from
    its record; `key_sent`: the key of the upgrade the proxy sent an HTTP/1.1
    upstream, if it did."""
    status, upstream, transport = record.status, record.upstream_transport, record.transport
    meta: dict[str, Any] = {"client_sent": f"CONNECT :protocol websocket ({_RFC.get(transport)})", "client_got": status}
    got = f"→ {status}" if status is not None else "→ no status"
    line = f"On the wire: {_HTTP.get(transport)} extended CONNECT (:protocol websocket) {redact_path(path) or '/'} {got}"
    if upstream == "h1":
        meta |= {"upstream_sent": "GET Upgrade: websocket (HTTP/1.1)", "sec_websocket_key_sent": key_sent}
        line += f"; the proxy sent the HTTP/1.1 upstream a GET upgrade (Sec-WebSocket-Key {key_sent})"
    elif upstream in ("h2", "h3"):
        meta["upstream_sent"] = f"CONNECT :protocol websocket ({_RFC[upstream]})"
        line += f"; the {_HTTP[upstream]} upstream got the extended CONNECT"
    if record.upstream_status is not None:
        meta["upstream_status"] = record.upstream_status
        line += f", answered {record.upstream_status}"
    return line + ".", meta
