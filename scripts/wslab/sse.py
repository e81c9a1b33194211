"""Server-sent events on the wire (the HTML standard's `text/event-stream`),
what the lab's application writes and the event-stream client reads.

An event is `field: value` lines ended by a blank line; `data` lines join
with newlines, `event` names the type ("message" when absent), `id` sets the
stream's last event ID, a line starting with `:` is a comment, and lines end
with CRLF, LF or CR. `EventParser` takes the decoded text as it arrives and
hands back each event once its blank line has come.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

CONTENT_TYPE = "text/event-stream"
_LINE_END = re.compile(r"\r\n|\n|\r")


def is_event_stream(content_type: str | None) -> bool:
    """Whether a `content-type` value is text/event-stream (parameters allowed)."""
    return (content_type or "").split(";", 1)[0].strip().lower() == CONTENT_TYPE


def format_event(data: str, event: str | None = None, id: str | None = None) -> bytes:
    """One event as a server writes it: `id:`, `event:`, one `data:` line per line of data, a blank line."""
    lines = ([f"id: {id}"] if id is not None else []) + ([f"event: {event}"] if event else [])
    lines += [f"data: {line}" for line in data.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


@dataclass
class ServerEvent:
    """One dispatched event: `id` is the stream's last event ID when it was
    dispatched; `at_s`, where a client notes it, when it was decoded (seconds
    from its request)."""

    data: str
    event: str = "message"
    id: str | None = None
    at_s: float | None = None


class EventParser:
    """The standard's event-stream parser, fed text (or UTF-8 bytes) in pieces of any size."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._started = False  # past a leading byte order mark
        self._data: list[str] = []
        self._event = ""
        self.last_id: str | None = None

    def feed(self, chunk: bytes | str) -> list[ServerEvent]:
        """The events whose blank line is in what has come so far."""
        text = self._utf8.decode(chunk) if isinstance(chunk, bytes) else chunk
        if text and not self._started:
            text, self._started = text.removeprefix("\ufeff"), True
        text = self._pending + text
        # A CR at the end may be the first half of a CRLF: it waits for what follows.
        held_cr = text.endswith("\r")
        lines = _LINE_END.split(text[:-1] if held_cr else text)
        self._pending = lines.pop() + ("\r" if held_cr else "")  # no line end yet
        return [event for line in lines if (event := self._line(line)) is not None]

    def _line(self, line: str) -> ServerEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment (a keep-alive, often)
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self.last_id = value
        # "retry" and unknown fields change nothing a reader here needs.
        return None

    def _dispatch(self) -> ServerEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None  # no data: nothing is dispatched
        return ServerEvent("\n".join(data), event or "message", self.last_id)
