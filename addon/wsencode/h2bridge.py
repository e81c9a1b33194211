"""The one place ws-encode reaches into mitmproxy's internals: HTTP/2 WebSockets.

(RFC 8441 carrying is added on top of this interface.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamFacts:
    """What the HTTP/2 codec saw of a handshake that mitmproxy's flow cannot show."""

    upstream_status: int | None = None
    client_bytes_before_status: int = 0
    status_with_data: bool = False


NO_FACTS = StreamFacts()


class Bridge:
    def install(self) -> None:
        pass

    def uninstall(self) -> None:
        pass

    def facts(self, request: object) -> StreamFacts:
        return NO_FACTS
