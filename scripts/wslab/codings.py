"""Content codings as real encoders negotiate and stream them.

`choose` picks a coding from `accept-encoding` by its q-values (RFC 9110
§12.5.3); `Encoder` compresses a response as a stream, with each codec's
flush that emits decodable bytes without ending the stream (gzip's
Z_SYNC_FLUSH, zstd's block flush, brotli's flush) and its finish.

zstd comes from `zstandard` where it is installed (mitmproxy 11 depends on
it) and otherwise from the standard library's `compression.zstd` or its
backport (what mitmproxy 12 depends on): both are libzstd.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import brotli

try:
    import zstandard
except ImportError:  # mitmproxy 12 ships the standard library's zstd API instead
    zstandard = None
    try:
        from compression import zstd as stdlib_zstd
    except ImportError:
        from backports import zstd as stdlib_zstd

ZSTD_LIBRARY = "zstandard" if zstandard else stdlib_zstd.__name__

# The server's preference among equally acceptable codings, best first.
SUPPORTED = ("zstd", "br", "gzip")


class NotAcceptable(Exception):
    """`accept-encoding` refuses identity and every coding this server has."""


def parse_accept_encoding(value: str) -> dict[str, float]:
    """`accept-encoding` as {coding: q}; a malformed q counts as 0, a bare
    coding as 1, names are case-insensitive, a repeated coding keeps its last q."""
    offered: dict[str, float] = {}
    for item in value.split(","):
        name, *params = (part.strip() for part in item.split(";"))
        if not name:
            continue
        q = 1.0
        for param in params:
            key, _, raw = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = min(max(float(raw.strip()), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        offered[name.lower()] = q
    return offered


def choose(accept_encoding: str | None, supported: tuple[str, ...] = SUPPORTED) -> str | None:
    """The coding to send, or None for identity.

    No header means identity (what real encoders do, though RFC 9110 allows
    any coding); `*` covers codings not named; q=0 excludes; among the
    highest q the server's order decides. Raises NotAcceptable when identity
    is excluded (`identity;q=0`, or `*;q=0` without naming identity) and no
    coding is left.
    """
    if accept_encoding is None:
        return None
    offered = parse_accept_encoding(accept_encoding)
    star = offered.get("*")

    def q(coding: str) -> float:
        return offered.get(coding, star if star is not None else 0.0)

    best = max(supported, key=lambda coding: (q(coding), -supported.index(coding)))
    if q(best) > 0:
        return best
    identity = offered.get("identity", star if star is not None else 1.0)
    if identity <= 0:
        raise NotAcceptable(accept_encoding)
    return None


@dataclass
class Encoder:
    """One response's compression stream."""

    coding: str

    def __post_init__(self) -> None:
        if self.coding == "gzip":
            self._z = zlib.compressobj(6, zlib.DEFLATED, 31)
        elif self.coding == "br":
            self._br = brotli.Compressor()
        elif self.coding == "zstd":
            if zstandard:
                self._zstd = zstandard.ZstdCompressor().compressobj()
            else:
                self._zstd = stdlib_zstd.ZstdCompressor()
        else:
            raise ValueError(f"unsupported coding {self.coding!r}")

    def compress(self, data: bytes) -> bytes:
        """Feed data; may return nothing at all for a small input (the codec
        keeps it until a flush)."""
        if self.coding == "gzip":
            return self._z.compress(data)
        if self.coding == "br":
            return self._br.process(data)
        if zstandard:
            return self._zstd.compress(data)
        return self._zstd.compress(data, mode=stdlib_zstd.ZstdCompressor.CONTINUE)

    def flush(self) -> bytes:
        """Everything fed so far, decodable, with the stream left open."""
        if self.coding == "gzip":
            return self._z.flush(zlib.Z_SYNC_FLUSH)
        if self.coding == "br":
            return self._br.flush()
        if zstandard:
            return self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        return self._zstd.flush(mode=stdlib_zstd.ZstdCompressor.FLUSH_BLOCK)

    def finish(self) -> bytes:
        """The end of the stream (gzip's trailer, zstd's frame end)."""
        if self.coding == "gzip":
            return self._z.flush(zlib.Z_FINISH)
        if self.coding == "br":
            return self._br.finish()
        if zstandard:
            return self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)
        return self._zstd.flush(mode=stdlib_zstd.ZstdCompressor.FLUSH_FRAME)


class Decoder:
    """Incremental decoding with the same libraries, for tests and clients."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        if coding == "gzip":
            self._d = zlib.decompressobj(31)
        elif coding == "br":
            self._d = brotli.Decompressor()
        elif coding == "zstd":
            self._d = zstandard.ZstdDecompressor().decompressobj() if zstandard else stdlib_zstd.ZstdDecompressor()
        else:
            raise ValueError(f"unsupported coding {coding!r}")

    def decode(self, data: bytes) -> bytes:
        if self.coding == "br":
            return self._d.process(data)
        return self._d.decompress(data)


def decode(coding: str, data: bytes) -> bytes:
    return Decoder(coding).decode(data)
