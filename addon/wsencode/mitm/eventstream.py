"""An event stream passes through the proxy as it comes, and its first event is timed.

mitmproxy keeps a response until it ends unless its flow is streamed
(mitmproxy#4469): an event stream, which does not end, would never reach the
client. So the addon streams every event stream it follows, and its stream
function notes, on the stream's facts, when the first body bytes that decode
to something went through: an encoder that flushes only when its buffer fills
sends a compressed stream's header (gzip's ten bytes) at once and the events
later, and only the decoded bytes say when the first event came.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable

import brotli
from mitmproxy import http

from ..core.handshake import is_event_stream_type
from ..core.streamfacts import StreamFacts
from .flowview import value_of

Decode = Callable[[bytes], bytes]
StreamFunction = Callable[[bytes], "bytes | Iterable[bytes]"]

# The zstd that mitmproxy itself decodes with (its net/encoding.py): the
# standard library's from Python 3.14, else backports.zstd on mitmproxy 12,
# zstandard on mitmproxy 11; none of them is there on every line.
try:
    from compression import zstd
except ImportError:
    try:
        from backports import zstd
    except ImportError:
        zstd = None
if zstd is None:
    import zstandard

    def zstd_decoder() -> Decode:
        return zstandard.ZstdDecompressor().decompressobj().decompress

    ZSTD_ERROR: type[Exception] = zstandard.ZstdError
else:
    def zstd_decoder() -> Decode:
        return zstd.ZstdDecompressor().decompress

    ZSTD_ERROR = zstd.ZstdError


def is_event_stream(response: http.Response) -> bool:
    return is_event_stream_type(value_of(response.headers, "content-type"))


def decoder(content_encoding: str | None) -> Decode | None:
    """An incremental decoder for a response's one content-coding; None for
    identity, and for what it cannot decode (a list of codings, an unknown
    one): then the first bytes count as the first event."""
    coding = (content_encoding or "identity").strip().lower()
    if coding in ("gzip", "x-gzip"):
        return zlib.decompressobj(wbits=zlib.MAX_WBITS | 32).decompress  # (gzip or zlib, by its header)
    if coding == "deflate":
        return zlib.decompressobj().decompress
    if coding == "br":
        return brotli.Decompressor().process
    if coding == "zstd":
        return zstd_decoder()
    return None


TIMES_FIRST_EVENT = "ws_encode_times_first_event"


class FirstEvent:
    """A streamed event stream's `response.stream`: passes every chunk on
    (through the stream function another addon set before, if any) and calls
    `arrived` once, when the first chunk that decodes to something goes
    through, having noted the time on the facts."""

    def __init__(self, facts: StreamFacts, content_encoding: str | None, then: StreamFunction | None,
                 arrived: Callable[[], None]) -> None:
        self.facts, self.then, self.arrived = facts, then, arrived
        self.decode = decoder(content_encoding)
        self.waiting = True

    ws_encode_times_first_event = True  # (TIMES_FIRST_EVENT)

    def __call__(self, data: bytes) -> bytes | Iterable[bytes]:
        if self.waiting and data and self._decodes(data):
            self.waiting, self.decode = False, None
            self.facts.first_event_at = self.facts.clock()
            self.arrived()
        return self.then(data) if self.then is not None else data

    def _decodes(self, data: bytes) -> bool:
        if self.decode is None:
            return True
        try:
            return bool(self.decode(data))
        except (zlib.error, brotli.error, ZSTD_ERROR, EOFError):  # (EOFError: bytes past a zstd frame's end)
            self.decode = None  # not what it says it is: its bytes are what the client gets
            return True


def pass_through(f: http.HTTPFlow, facts: StreamFacts, arrived: Callable[[], None]) -> None:
    """Time the first event of `f`'s streamed response, through whatever
    stream function another addon set. Once: a copy of the addon loaded
    later knows an earlier copy's by its attribute, not its class."""
    assert f.response is not None
    stream = f.response.stream
    if getattr(stream, TIMES_FIRST_EVENT, False):
        return
    then = stream if callable(stream) else None
    f.response.stream = FirstEvent(facts, value_of(f.response.headers, "content-encoding"), then, arrived)
