"""The addon's commands (`wsencode.*`, in the console and mitmweb's command
bar) and the text they answer with.

Every command answers at least one line: mitmproxy's console data viewer
cannot show an empty list. Lines lead with what a person reads (the URL, the
time), and wrap at words: the viewer is 62 columns wide in an 80-column
terminal.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

import mitmproxy.types
from mitmproxy import command, ctx, flow

from ..core.handshakes import FollowedHandshake, Handshakes, Summary
from ..core.lifecycle import Stage

logger = logging.getLogger("ws_encode")

# An answer's rows fill the console's data viewer, 80 % of the terminal's
# width less its frame (mitmweb and scripts: no terminal, the fallback's
# width); never narrower than a sentence reads well in, nor wider than one
# reads at all.
VIEWER_SHARE, VIEWER_FRAME = 0.8, 4
NARROWEST, WIDEST = 56, 120
# The flows that stalled, for the console's and mitmweb's flow list.
STALLED_FILTER = '~comment "Stall: no (status|response head)"'
# What `wsencode.waiting` says a handshake is doing, by where it is.
DOING = {
    Stage.CONNECTING: "connecting to the upstream",
    Stage.TLS: "in TLS with the upstream",
    Stage.SETTINGS: "waiting for the upstream's SETTINGS",
    Stage.QUEUED: "queued in the proxy",
    Stage.INTERCEPTED: "held by interception",
    Stage.FORWARDED: "waiting for the upstream's status",
}


def answer_width() -> int:
    return min(max(int(terminal_columns() * VIEWER_SHARE) - VIEWER_FRAME, NARROWEST), WIDEST)


def terminal_columns() -> int:
    """The console's terminal as it is now: asked of the terminal itself first
    (COLUMNS, which shutil prefers, is whatever the shell that started
    mitmproxy had), else COLUMNS or a fallback (mitmdump's output piped, mitmweb)."""
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (AttributeError, ValueError, OSError):  # no stdout, or not a terminal
        return shutil.get_terminal_size((100, 24)).columns


def wrap(text: str) -> list[str]:
    """`text` as indented answer rows as wide as the console's viewer, broken
    at spaces only (never inside `accept-encoding`)."""
    return textwrap.wrap(text, answer_width(), initial_indent="    ", subsequent_indent="    ",
                         break_on_hyphens=False)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary_lines(summary: Summary, waiting: int, longest_s: float | None, report: str | None) -> list[str]:
    """The summary a person reads: one fact a line."""
    total = sum(summary.outcomes.values())
    report_line = f"report: {report or 'off (set ws_encode_report)'}"
    if not total and not waiting and not summary.event_streams:
        return ["no WebSocket handshake seen yet", report_line]
    if total:
        lines = [f"{plural(total, 'WebSocket handshake')} finished: {counted(summary.outcomes)}"]
    elif summary.event_streams:
        lines = []  # only event streams so far: their line says it
    else:
        lines = ["no WebSocket handshake finished yet"]
    if summary.event_streams:
        streams = sum(summary.event_streams.values())
        lines.append(f"{plural(streams, 'event stream')} followed: {counted(summary.event_streams)}")
    if waiting:
        lines.append(f"{waiting} waiting for a status now, longest {longest_s:.1f} s")
    lines.append(f"{plural(summary.stalls, 'stall')} reported")
    if summary.slowest_s is not None:
        lines.append(f"slowest status: {summary.slowest_s:.2f} s, {summary.slowest_url}")
    lines.append(report_line)
    return lines


def counted(outcomes: Counter[tuple[str, str]]) -> str:
    """`3 upgraded, 1 no-status (2 over h1, 2 over h2)` from (outcome, transport) counts."""
    by_outcome: Counter[str] = Counter()
    by_transport: Counter[str] = Counter()
    for (outcome, transport), n in outcomes.items():
        by_outcome[outcome] += n
        by_transport[transport] += n
    listed = ", ".join(f"{n} {o}" for o, n in sorted(by_outcome.items()))
    return listed + " (" + ", ".join(f"{n} over {t}" for t, n in sorted(by_transport.items())) + ")"


def stall_lines(handshakes: Handshakes) -> list[str]:
    """Each stall as a headline and its sentence, newest first."""
    lines = []
    for flow_id, (url, text) in reversed(handshakes.stalls.items()):
        lines.append(f"[flow {flow_id[:8]}] {url}")
        lines += wrap(text)
    return lines


def waiting_lines(handshakes: Handshakes, stage_of: Callable[[FollowedHandshake], Stage], now: float) -> list[str]:
    lines = []
    for followed in handshakes:
        if followed.progress.status is not None:  # an event stream that opened
            head = now - (followed.progress.status_at or now)
            lines.append(f"[flow {followed.flow_id[:8]}] {followed.url}")
            lines += wrap(f"opened, waiting for its first event: the head came {head:.1f} s ago")
            continue
        stage = stage_of(followed)
        waited = followed.progress.waited(now)
        since = "not forwarded" if waited is None else f"forwarded {waited:.1f} s ago"
        lines.append(f"[flow {followed.flow_id[:8]}] {followed.url}")
        lines += wrap(f"{DOING.get(stage, stage.value)} ({stage.value}): received "
                      f"{followed.progress.received(now):.1f} s ago, {since}")
    return lines


class Followed(Protocol):
    """What the commands ask of the addon."""

    handshakes: Handshakes

    def clock(self) -> float: ...

    def stage_of(self, followed: FollowedHandshake) -> Stage: ...

    def report_path(self) -> str | None: ...

    def write_bundle(self, flows: Sequence[flow.Flow], folder: str) -> str: ...


class Commands:
    """`wsencode.*`, over the addon's core."""

    def __init__(self, addon: Followed) -> None:
        self.addon = addon

    def summary_lines(self) -> list[str]:
        handshakes = self.addon.handshakes
        return summary_lines(handshakes.summary, handshakes.without_status(), handshakes.longest_wait(self.addon.clock()),
                             self.addon.report_path())

    @command.command("wsencode.summary")
    def summary(self) -> Sequence[str]:
        """Counts of WebSocket handshakes by outcome and transport, stalls, the slowest status, the report."""
        lines = self.summary_lines()
        logger.info("ws_encode summary: %s", "; ".join(lines))
        return lines

    @command.command("wsencode.stalls")
    def stalled_handshakes(self) -> Sequence[str]:
        """The handshakes that stalled (the last 1000, newest first), each with its diagnosis."""
        return stall_lines(self.addon.handshakes) or ["no WebSocket handshake has stalled"]

    @command.command("wsencode.waiting")
    def waiting_handshakes(self) -> Sequence[str]:
        """The handshakes still waiting for a status: where each is stuck, and for how long."""
        lines = waiting_lines(self.addon.handshakes, self.addon.stage_of, self.addon.clock())
        return lines or ["no WebSocket handshake is waiting for its status"]

    @command.command("wsencode.bundle")
    def bundle_flows(self, flows: Sequence[flow.Flow], folder: mitmproxy.types.Path) -> str:
        """Write a redacted bug-report bundle of these flows (e.g. @marked) into an empty folder:
        report.jsonl, flows.mitm and summary.md."""
        return self.addon.write_bundle(flows, str(folder))

    @command.command("wsencode.show")
    def show_stalled(self) -> Sequence[str]:
        """Limit the flow list to the handshakes that stalled."""
        if "view_filter" not in ctx.options:
            return ["no flow list here (mitmdump); the stalled flows match", f"    {STALLED_FILTER}"]
        ctx.options.view_filter = STALLED_FILTER
        return [
            "the flow list shows only stalled handshakes now:",
            f"    view_filter = {STALLED_FILTER}",
            "to see every flow again, clear view_filter",
            "    (console: `:set view_filter`; mitmweb: Options)",
        ]
