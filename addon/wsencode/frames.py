"""WebSocket frame boundaries (RFC 6455 section 5.2), without parsing payloads.

Bytes a client sends before the handshake's status may be passed upstream
raw; mitmproxy's WebSocket layer takes over after the status and must start
at a frame boundary, so only whole frames are passed on.
"""

from __future__ import annotations


def whole_frames_length(data: bytes) -> int:
    """How many leading bytes of `data` make up complete frames."""
    offset = 0
    while True:
        if len(data) - offset < 2:
            return offset
        second = data[offset + 1]
        length = second & 0x7F
        header = 2
        if length == 126:
            header = 4
        elif length == 127:
            header = 10
        if second & 0x80:  # masked: a 4-byte key follows the length
            header += 4
        if len(data) - offset < header:
            return offset
        if length == 126:
            length = int.from_bytes(data[offset + 2 : offset + 4], "big")
        elif length == 127:
            length = int.from_bytes(data[offset + 2 : offset + 10], "big")
        end = offset + header + length
        if end > len(data):
            return offset
        offset = end
