"""What ws_encode does with encoding headers on WebSocket handshakes."""

from __future__ import annotations

import enum
from typing import Protocol


class MutableHeaders(Protocol):
    def __contains__(self, key: str) -> bool: ...

    def __setitem__(self, key: str, value: str) -> None: ...

    def __delitem__(self, key: str) -> None: ...


class EncodingPolicy(str, enum.Enum):
    OBSERVE = "observe"  # forward as is; detect, log and report
    STRIP = "strip"  # the workaround: no encoding on handshakes
    INJECT = "inject"  # the regression probe: offer encoding to provoke a stall

    def apply_to_request(self, headers: MutableHeaders, codings: str) -> None:
        if self is EncodingPolicy.STRIP and "accept-encoding" in headers:
            del headers["accept-encoding"]
        elif self is EncodingPolicy.INJECT:
            headers["accept-encoding"] = codings

    def apply_to_success(self, headers: MutableHeaders) -> None:
        """Called on a successful handshake response (101, or 2xx to a CONNECT)."""
        if self is EncodingPolicy.STRIP and "content-encoding" in headers:
            del headers["content-encoding"]
