"""A handshake as the addon reads it off mitmproxy's flow and connections,
in the core's terms: the transports, whether an accept answers its key, who
ended it, where it waits.

The addon class hands these to the core (`core.handshakes`); they read mitmproxy's
objects and change nothing.
"""

from __future__ import annotations

import re
import weakref

from mitmproxy import connection, flow, flowfilter, http, websocket

from ..core.extconnect import accept_for
from ..core.handshake import Handshake, Transport, classify, classify_event_stream
from ..core.lifecycle import EndCause, Stage
from ..report import printable
from ..core.streamfacts import CLIENT, CONNECTING, StreamFacts, facts_for, facts_of, not_a_handshake


def classified(f: http.HTTPFlow | None, event_streams: bool = False) -> tuple[Handshake, StreamFacts] | None:
    """The handshake `f` opens (with `event_streams`, or the event stream)
    and its facts (made if no bridge noted any), or None: most requests, and
    a flow that is gone."""
    if f is None:
        return None
    facts = facts_of(f.request)
    transport = client_transport(f)
    if facts is None and not_a_handshake(f.request):  # the bridge's stream asked already: no WebSocket
        handshake = classify_event_stream(f.request, transport) if event_streams else None
    else:
        known = facts.handshake if facts is not None else None
        handshake = (known if known is not None and known.transport is transport
                     else classify(f.request, transport, event_streams))
    return None if handshake is None else (handshake, facts or facts_for(f.request))


def matches(f: http.HTTPFlow, flt: flowfilter.TFilter | None, handshake: Handshake) -> bool:
    """Whether `flt` (ws_encode_filter) takes a handshake's flow (or an event stream's)."""
    if flt is None or f.websocket is not None or not handshake.is_websocket:
        return flt is None or flt(f)
    # mitmproxy sets flow.websocket only once the upgrade is done, so
    # `~websocket` could never match a handshake: let it, for the filter.
    f.websocket = websocket.WebSocketData()
    try:
        return flt(f)
    finally:
        f.websocket = None


def client_transport(f: http.HTTPFlow) -> Transport:
    """The HTTP version the client really speaks: from its connection, not
    from what it wrote in the request line."""
    if f.client_conn.transport_protocol == "udp":
        return Transport.H3
    return Transport.H2 if f.client_conn.alpn == b"h2" else Transport.H1


def connected(server: connection.Server) -> bool:
    """Whether the upstream connection was made: its TCP handshake, or for
    QUIC (which has none) its QUIC handshake."""
    if server.transport_protocol == "udp":
        return server.timestamp_tls_setup is not None
    return server.timestamp_tcp_setup is not None


def upstream_transport(server: connection.Server) -> str | None:
    if not connected(server):
        return None
    if server.alpn == b"h2":
        return Transport.H2.value
    if server.alpn and server.alpn.startswith(b"h3"):
        return Transport.H3.value
    return Transport.H1.value


def url_of(request: http.Request) -> str:
    """The URL a request asks for, as mitmproxy's `pretty_url` says it; for
    an extended CONNECT with its path, which mitmproxy leaves out of every
    CONNECT's (it takes them all for authority-form)."""
    if request.method != "CONNECT":
        return _plain_url(request) or request.pretty_url
    return f"{request.scheme}://{request.authority or request.host_header or request.host}{request.path}"


# A host of letters, digits, dots and hyphens, with no port or one that is
# not its scheme's default, written without leading zeros: `pretty_url` gives
# such an authority back as it is written, whether or not it takes the host
# for a valid one (tests/test_cost.py checks that the two agree), without
# parsing it and checking the host again, once per handshake.
_PLAIN_AUTHORITY = re.compile(r"[A-Za-z0-9.-]+(?::(?P<port>[1-9][0-9]{0,4}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _plain_url(request: http.Request) -> str | None:
    """`request.pretty_url` for a plain authority and path, else None."""
    authority, scheme, path = request.host_header, request.scheme, request.path
    default = _DEFAULT_PORTS.get(scheme)
    plain = _PLAIN_AUTHORITY.fullmatch(authority) if authority and default else None
    if plain is None or not path.startswith("/") or (plain["port"] and int(plain["port"]) == default):
        return None
    return f"{scheme}://{authority}{path}"


def accept_matches(f: http.HTTPFlow) -> bool:
    """False only for a 101 whose accept hash does not answer the request's key."""
    if f.response is None or f.response.status_code != 101:
        return True
    key = value_of(f.request.headers, "sec-websocket-key") or ""
    return (value_of(f.response.headers, "sec-websocket-accept") or "").strip() == accept_for(key)


def header(headers: http.Headers, name: str) -> str | None:
    """A header's value with control characters escaped, as records keep it."""
    value = value_of(headers, name)
    return None if value is None else printable(value)


def value_of(headers: http.Headers, name: str) -> str | None:
    """`headers.get(name)`: its values joined, decoded as mitmproxy does; in a
    pass of its own over the fields (mitmproxy's makes three calls a field,
    and a handshake's hooks look up five headers)."""
    key = name.encode()
    values = [value for field, value in headers.fields if field.lower() == key]
    return b", ".join(values).decode("utf-8", "surrogateescape") if values else None


def end_cause(f: http.HTTPFlow, facts: StreamFacts) -> EndCause:
    """Who ended a handshake that got no status: from what the bridge's
    stream saw (which side's codec reported the error), else from the
    connections' state (mitmproxy marks a peer's side closed before it tells
    the layers), never from the wording of an error."""
    if facts.ended_by_proxy:
        return EndCause.PROXY_RESET
    if f.error is not None and f.error.msg == flow.Error.KILLED_MESSAGE:  # mitmproxy's own constant
        return EndCause.KILLED
    if facts.ended_by == CLIENT or (facts.ended_by is None and client_closed(f.client_conn)):
        return EndCause.CLIENT_GONE
    if not connected(f.server_conn):
        return EndCause.UPSTREAM_UNREACHABLE
    return EndCause.UPSTREAM_CLOSED


def client_closed(client: connection.Client) -> bool:
    return client.timestamp_end is not None or not client.state & connection.ConnectionState.CAN_READ


class Opening:
    """The upstream connections being opened, with their client's id: where a
    handshake waiting for its connection is (TCP or TLS). The addon's
    connection hooks tell it (no child addon of its own: mitmproxy walks
    every addon object on every hook of every flow)."""

    def __init__(self) -> None:
        self.servers: weakref.WeakKeyDictionary[connection.Server, str] = weakref.WeakKeyDictionary()

    def connecting(self, server: connection.Server, client_id: str) -> None:
        self.servers[server] = client_id

    def connected(self, server: connection.Server) -> None:
        if not server.tls:  # (else its TLS handshake comes next)
            self.servers.pop(server, None)

    def ended(self, server: connection.Server) -> None:
        """Its TLS handshake is done or failed, or it could not be made."""
        self.servers.pop(server, None)

    def stage(self, f: http.HTTPFlow) -> Stage:
        """Where a handshake waiting for its upstream connection is."""
        address = (f.request.host, f.request.port)
        for server, client_id in list(self.servers.items()):
            if client_id == f.client_conn.id and server.address == address:
                # (QUIC has no TCP handshake: its connecting is its QUIC handshake, `tls`)
                opened = server.transport_protocol == "udp" or server.timestamp_tcp_setup is not None
                return Stage.TLS if opened else Stage.CONNECTING
        return Stage.CONNECTING


def stage_of(f: http.HTTPFlow, facts: StreamFacts, opening: Opening) -> Stage:
    """Where a waiting handshake is now."""
    if f.intercepted:
        return Stage.INTERCEPTED
    if facts.stage == CONNECTING:
        return opening.stage(f)
    return Stage(facts.stage) if facts.stage else Stage.QUEUED
