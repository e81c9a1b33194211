"""WebSocket messages a client sent before its handshake's status.

Those bytes may be passed upstream raw; mitmproxy's WebSocket layer takes
over after the status and must start where no message is half sent, so only
whole messages are passed on (`whole_messages_length`: RFC 6455 section 5's
frame headers, read without unmasking the payloads, since wsproto does not
say where in the bytes a message ends). What they held is recorded as
messages, decoded by wsproto as mitmproxy's WebSocket layer decodes them
(`client_messages`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import wsproto
from wsproto.events import CloseConnection, Message, TextMessage
from wsproto.frame_protocol import Opcode

CONTINUATION = 0x0


def _frames(data: bytes) -> Iterator[tuple[int, bool, bool, int]]:
    """(opcode, fin, reserved bits set, end offset) of each complete frame at
    the start of `data`."""
    offset = 0
    while len(data) - offset >= 2:
        first, second = data[offset], data[offset + 1]
        length = second & 0x7F
        header = {126: 4, 127: 10}.get(length, 2) + (4 if second & 0x80 else 0)
        if len(data) - offset < header:
            return
        if length == 126:
            length = int.from_bytes(data[offset + 2 : offset + 4], "big")
        elif length == 127:
            length = int.from_bytes(data[offset + 2 : offset + 10], "big")
        end = offset + header + length
        if end > len(data):
            return
        yield first & 0x0F, bool(first & 0x80), bool(first & 0x70), end
        offset = end


def whole_messages_length(data: bytes) -> int:
    """How many leading bytes of `data` hold only complete frames and no
    unfinished fragmented message, stopping at the first frame that uses a
    reserved bit: that is an extension's (permessage-deflate's compressed
    flag), whose state mitmproxy's WebSocket layer must see from the start."""
    whole = 0
    in_message = False
    for opcode, fin, reserved, end in _frames(data):
        if reserved:
            break
        if opcode < 0x8:  # a data frame: text, binary or continuation
            in_message = not fin
        if not in_message:
            whole = end
    return whole


def client_messages(data: bytes) -> list[tuple[int, bytes, float]]:
    """The whole messages in a client's (masked) frames, as (opcode, payload,
    time); control frames are not messages, and bytes wsproto cannot parse
    end the record (they went upstream as they were)."""
    conn = wsproto.Connection(wsproto.ConnectionType.SERVER)
    conn.receive_data(data)
    messages, parts = [], []
    for event in conn.events():
        if isinstance(event, CloseConnection):
            break
        if isinstance(event, Message):
            parts.append(event.data.encode() if isinstance(event, TextMessage) else bytes(event.data))
            if event.message_finished:
                opcode = Opcode.TEXT if isinstance(event, TextMessage) else Opcode.BINARY
                messages.append((int(opcode), b"".join(parts), time.time()))
                parts = []
    return messages
