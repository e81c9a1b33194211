"""wsproto's WebSocket connection with whole messages, for the peers
(h2ws, fault_server, the bench's clients and upstreams).

wsproto's Connection (the one mitmproxy wraps) masks what a client sends,
answers nothing by itself and keeps the closing handshake's state; it hands
a message over as it comes, part by part (TextMessage or BytesMessage, the
last with message_finished). `MessageConnection.messages` puts the parts back
together.
"""

from __future__ import annotations

from collections.abc import Iterator

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Event, Message, Ping

# A Close may still go out: none was sent (wsproto's rule for sending one).
CLOSE_UNSENT = (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)


class MessageConnection(Connection):
    """wsproto's Connection after the handshake, as a client or a server."""

    def __init__(self, role: ConnectionType) -> None:
        super().__init__(role)
        self.closed_by: CloseConnection | None = None  # what ended receiving
        self._parts: list[str | bytes] = []

    def messages(self, data: bytes) -> Iterator[str | bytes | Event]:
        """Whole messages (str or bytes) and the other events (Ping, Pong,
        CloseConnection) in `data` and what came before it, up to a
        CloseConnection: the peer's Close (the state is then REMOTE_CLOSING
        or CLOSED), or wsproto's word on bytes that are not frames (its code,
        such as 1002, and why; the state unchanged). Nothing after that means anything."""
        if self.closed_by is not None:
            return
        self.receive_data(data)
        for event in self.events():
            if isinstance(event, CloseConnection):
                self.closed_by = event
                yield event
                return
            if not isinstance(event, Message):
                yield event
                continue
            self._parts.append(event.data)
            if event.message_finished:
                parts, self._parts = self._parts, []
                yield ("" if isinstance(parts[0], str) else b"").join(parts)

    def send_data(self, data: str | bytes, fin: bool = True) -> bytes:
        """A text (str) or binary message, or a part of one (fin=False)."""
        return self.send(Message(data=data, message_finished=fin))

    def echo(self, data: bytes) -> Iterator[tuple[bytes, bool]]:
        """What an echo server sends for `data`: each whole message back, a
        Pong to a Ping, a Close to the Close that ended receiving (the last
        thing it sends: True)."""
        for event in self.messages(data):
            if isinstance(event, (str, bytes)):
                yield self.send_data(event), False
            elif reply := self.answer(event):
                yield reply, isinstance(event, CloseConnection)

    def answer(self, event: Event) -> bytes:
        """What answers a control event: a Pong to a Ping while the connection
        is open, a Close to the Close that ended receiving (`closed_by`)
        unless ours went out already, nothing to a Pong."""
        if isinstance(event, Ping) and self.state is ConnectionState.OPEN:
            return self.send(event.response())
        if isinstance(event, CloseConnection) and self.state in CLOSE_UNSENT:
            return self.send(event.response())
        return b""
