"""A mitmproxy script for the probe's own mitmdump: an HTTP/1.1 response head has a bound.

    mitmdump -s addon/ws_encode.py -s scripts/bugreport/head_limit.py ...

mitmproxy reads an upstream's response head until its blank line, however long
it grows ("FIXME: protect against header size DoS", in
mitmproxy/proxy/layers/http/_http1.py): a server under study that sends a
header without end fills the probe's memory. Past HEAD_LIMIT bytes without the
blank line, the upstream connection is closed and the handshake fails with a
protocol error, as mitmproxy does with a head it cannot parse.
"""

from __future__ import annotations

from h11._receivebuffer import ReceiveBuffer  # (what mitmproxy's HTTP/1 connections read into)
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import ResponseProtocolError
from mitmproxy.proxy.layers.http._http1 import Http1Client

# Generous: Node.js refuses heads over 16 KiB, nginx's buffer for one is 4 or 8 KiB.
HEAD_LIMIT = 64 * 1024


def read_headers_within_limit(read_headers):
    """Http1Client.read_headers, giving up on a head that outgrows HEAD_LIMIT."""

    def bounded(self: Http1Client, event: events.ConnectionEvent):
        yield from read_headers(self, event)
        still_reading = self.state == self.read_headers and isinstance(event, events.DataReceived)
        if still_reading and self.stream_id is not None and len(self.buf) > HEAD_LIMIT:
            self.buf = ReceiveBuffer()  # (nothing of it is kept, or quoted in an error)
            self.state = self.done
            yield commands.CloseConnection(self.conn)
            yield ReceiveHttp(ResponseProtocolError(
                self.stream_id, f"the response head grew past {HEAD_LIMIT} bytes without ending (the probe's bound)",
                code=ResponseProtocolError.code,
            ))

    bounded.unbounded = read_headers
    return bounded


class HeadLimit:
    def load(self, loader) -> None:
        if not hasattr(Http1Client.read_headers, "unbounded"):
            Http1Client.read_headers = read_headers_within_limit(Http1Client.read_headers)

    def done(self) -> None:
        Http1Client.read_headers = getattr(Http1Client.read_headers, "unbounded", Http1Client.read_headers)


addons = [HeadLimit()]
