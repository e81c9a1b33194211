"""Whole WebSocket messages out of wsproto's frame protocol, for the peers
(h2ws, fault_server, the bench's clients and upstreams).

wsproto's FrameProtocol gives frames; a message may span several (it reports
a continuation with its message's opcode, and a text payload decoded to str
part by part). `Messages` puts them back together: feed it bytes, and it
yields each whole message (str or bytes) and each control frame as it is.
"""

from __future__ import annotations

from collections.abc import Iterator

from wsproto.frame_protocol import Frame, FrameProtocol, Opcode

DATA = (Opcode.TEXT, Opcode.BINARY, Opcode.CONTINUATION)


class Messages:
    def __init__(self, frames: FrameProtocol) -> None:
        self.frames = frames
        self._parts: list[str | bytes] = []

    def receive(self, data: bytes) -> Iterator[str | bytes | Frame]:
        """Whole messages and control frames in `data` and what came before it.
        Raises wsproto's ParseFailed for bytes that are not WebSocket frames."""
        self.frames.receive_bytes(data)
        for frame in self.frames.received_frames():
            if frame.opcode not in DATA:
                yield frame
                continue
            self._parts.append(frame.payload)
            if frame.message_finished:
                parts, self._parts = self._parts, []
                yield ("" if isinstance(parts[0], str) else b"").join(parts)
