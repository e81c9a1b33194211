"""What a record does where a person sees it: the flow's mark, comment and
metadata, the report line, the log line; and the line that says, while
handshakes wait too long, how many and for how long."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from mitmproxy import exceptions, http
from mitmproxy import log as mitmproxy_log

from ..core.handshakes import Handshakes
from ..core.records import Record
from ..core.stallwatch import Scheduler, Timer
from ..core.streamfacts import facts_of
from ..report import ReportWriter, printable, utc_now_iso
from . import wirenote

logger = logging.getLogger("ws_encode")

STALL_MARK = ":hourglass:"
PROGRESS_EVERY = 5.0  # at most this many seconds between progress lines while a handshake waits too long


def info_shown() -> bool:
    """Whether an INFO record reaches anyone who shows or keeps it: mitmproxy
    sets the root logger to DEBUG, and its bridge to the old `add_log` hook
    (`LegacyLogEvents`) takes every record; who shows one is the other
    handlers (the terminal at `termlog_verbosity`, the event logs, a test's)."""
    return any(h.level <= logging.INFO and not isinstance(h, mitmproxy_log.LegacyLogEvents)
               for h in logging.getLogger().handlers)


def comment(f: http.HTTPFlow, line: str) -> None:
    f.comment = f"{f.comment}\n{line}" if f.comment else line  # a comment the user wrote stays first


class Output:
    def __init__(self) -> None:
        self.report: ReportWriter | None = None

    def open_report(self, path: Path | None) -> None:
        try:
            new = ReportWriter(path) if path else None
        except OSError as e:
            raise exceptions.OptionsError(
                f"ws_encode_report: cannot append to {printable(str(path))!r}: {e.strerror}") from None
        self.close()
        self.report = new

    def close(self) -> None:
        if self.report:
            self.report.close()
            self.report = None

    def stalled(self, f: http.HTTPFlow, record: Record) -> None:
        if not f.marked:  # a mark the user set stays
            f.marked = STALL_MARK
        comment(f, record.diagnosis)
        self._write(f, record)
        logger.warning("%s stall on %s: %s", record.what, record.url, record.diagnosis)

    def finished(self, f: http.HTTPFlow, record: Record) -> None:
        comment(f, record.diagnosis)
        facts = facts_of(f.request)
        if facts is not None and f.request.method == "CONNECT":
            line, f.metadata["ws_encode_wire"] = wirenote.described(f.request.path, record, facts.key_sent)
            comment(f, line)
        self._write(f, record)
        outcome = record.outcome
        quiet = not outcome.stalled and (outcome.outcome == "upgraded"
                                         or outcome.outcome == "opened" and not outcome.content_encoding)
        if quiet and not info_shown():
            return
        (logger.info if quiet else logger.warning)(
            "%s %s on %s: %s", record.what, outcome.outcome, record.url, record.diagnosis)

    def _write(self, f: http.HTTPFlow, record: Record) -> None:
        fields = {"event": record.event, "ts": utc_now_iso(), **record.as_dict()}
        f.metadata["ws_encode"] = {k: v for k, v in fields.items() if k != "flow_id"}
        if self.report:
            try:
                self.report.write(fields)
            except OSError as e:
                logger.error("ws_encode_report: cannot write to %s: %s", printable(str(self.report.path)), e.strerror)


class WaitingLine:
    """While handshakes wait, a line every few seconds says how many and how
    long, once any has waited past the stall threshold."""

    def __init__(self, handshakes: Handshakes, clock: Callable[[], float], schedule: Scheduler) -> None:
        self.handshakes, self.clock, self.schedule = handshakes, clock, schedule
        self.timer: Timer | None = None

    def keep(self) -> None:
        if self.timer is None:
            self.timer = self.schedule(min(PROGRESS_EVERY, max(1.0, self.handshakes.stall_after)), self._say)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _say(self) -> None:
        self.timer = None
        if not self.handshakes:
            return
        longest = self.handshakes.longest_wait(self.clock())
        if longest is not None and longest >= self.handshakes.stall_after:
            logger.warning("%s waiting for a status, longest %.1f s", self._waiting(), longest)
        self.keep()

    def _waiting(self) -> str:
        """`3 WebSocket handshakes`, `1 WebSocket handshake and 2 event streams`."""
        kinds = Counter(f.progress.handshake.is_websocket for f in self.handshakes if f.progress.status is None)
        said = [f"{n} {what}{'' if n == 1 else 's'}"
                for n, what in ((kinds[True], "WebSocket handshake"), (kinds[False], "event stream")) if n]
        return " and ".join(said)
