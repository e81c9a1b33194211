"""The reproduction matrix: every encoder behaviour, through mitmdump with the addon.

Each cell is one real WebSocket handshake: transport (h2, h3, h1) x behaviour
(each that meets a handshake: buffer-events never wraps one) x who speaks first
x policy (observe, strip), plus `inject` against `fixed`,
plus HAProxy's compression in front of the application where HAProxy is
installed; or one event stream (`/events`, read as EventSource reads it):
transport x the behaviours of the event-stream reports x policy. An h3 cell goes over QUIC end to end: the client to mitmdump's
HTTP/3 reverse mode, mitmdump to the lab's HTTP/3 side. `expect` says what
each cell must produce; `run` prints the table in the grid's order as cells
finish and returns the cells whose reality disagreed.
"""

from __future__ import annotations

import asyncio
import platform
import shutil
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from wsencode import bundle
from wspeers import h2ws

from . import haproxy
from .clients import BROWSER_CODINGS, CLIENTS, EventStreamSeen, Seen, read_event_stream
from .codings import ZSTD_LIBRARY, choose
from .encoders import HANDSHAKE_BEHAVIOURS, MIN_SIZE, Behaviour
from .proxy import Proxy
from .server import LabProcess

TRANSPORTS = ("h2", "h3", "h1")
STATUS_200 = ("h2", "h3")  # where a WebSocket's success is a plain 200, not an informational 101
SPEAKERS = ("client", "server")
EVENTS = "events"  # a cell's `speaker` for an event stream: the server speaks, in events
# The behaviours of the event-stream reports (docs/lab.md, "Event streams"):
# the head held until the first event, events kept in the compressor, head
# and events held until a size an endless stream of small events never has,
# and the fix.
EVENT_STREAM_BEHAVIOURS = (Behaviour.HOLD_UNTIL_BODY, Behaviour.BUFFER_EVENTS, Behaviour.HOLD_UNTIL_MIN_SIZE,
                           Behaviour.FIXED)
EVENTS_WANTED = 2  # an event-stream client reads this many events, then leaves
POLICIES = ("observe", "strip")
INJECTED = "zstd, br, gzip"  # the addon's default ws_encode_codings
CONNECTING = 3  # client connections set up at once


@dataclass(frozen=True)
class Cell:
    transport: str
    behaviour: str  # an encoder Behaviour value, or "haproxy"
    speaker: str  # who speaks first: client (/echo) or server (/greet); EVENTS: an event stream (/events)
    policy: str

    @property
    def name(self) -> str:
        what = "event-stream" if self.is_event_stream else f"{self.speaker}-first"
        return f"{self.transport} {self.behaviour} {what} {self.policy}"

    @property
    def is_event_stream(self) -> bool:
        return self.speaker == EVENTS

    @property
    def path(self) -> str:
        endpoint = {"client": "echo", "server": "greet", EVENTS: "events"}[self.speaker]
        return f"/{endpoint}/{self.transport}-{self.behaviour}-{self.policy}"

    @property
    def upstream(self) -> str:
        """The name of the mitmdump mode it goes through: its behaviour's, over QUIC for h3."""
        return f"{self.behaviour} h3" if self.transport == "h3" else self.behaviour

    @property
    def accept_encoding(self) -> str | None:
        """What the client offers: Chromium's list, except for the inject probe."""
        return None if self.policy == "inject" else BROWSER_CODINGS


@dataclass
class Expect:
    client: str  # Seen.outcome
    outcome: str  # the handshake record's outcome
    stalled: bool
    fast: bool = True  # status within the stall threshold
    content_encoding: str | None = None
    words: tuple[str, ...] = ()  # in the handshake record's diagnosis (lowercase)
    upstream_coding: str | None = BROWSER_CODINGS

    def describe(self) -> str:
        return f"{self.client}, {self.outcome}" + (", stalled" if self.stalled else "")


def holds_status(behaviour: str, transport: str) -> bool:
    """Does this encoder hold the handshake's status back on this transport?"""
    if behaviour == Behaviour.HOLD_1XX:
        return True
    if behaviour in (Behaviour.HOLD_UNTIL_BODY, Behaviour.HOLD_UNTIL_MIN_SIZE):
        return transport in STATUS_200  # a 101 is informational: it goes out at once
    return False


def expect(cell: Cell) -> Expect:
    if cell.is_event_stream:
        return expect_event_stream(cell)
    healthy = "echoed" if cell.speaker == "client" else "greeted"
    if cell.behaviour == "haproxy":
        return haproxy.expect(cell, healthy)
    if cell.policy == "strip":
        return Expect(healthy, "upgraded", stalled=False, upstream_coding=None)
    if cell.policy == "inject":
        return Expect(healthy, "upgraded", stalled=False, upstream_coding=INJECTED)
    if cell.behaviour == Behaviour.ENCODE_UPGRADE:
        return Expect("unreadable", "upgraded", stalled=False, content_encoding=choose(BROWSER_CODINGS),
                      words=("content-encoding",))
    if not holds_status(cell.behaviour, cell.transport):
        return Expect(healthy, "upgraded", stalled=False)
    # The server's first message releases a status held for the first body
    # byte; a few bytes are not enough for one that waits for a minimum size.
    if cell.speaker == "server" and cell.behaviour != Behaviour.HOLD_UNTIL_MIN_SIZE:
        words = ("first response data",) if cell.transport in STATUS_200 else ()
        return Expect(healthy, "upgraded", stalled=True, fast=False, words=words)
    return Expect("gave up", "no-status", stalled=True, fast=False, words=("stall",))


def expect_event_stream(cell: Cell) -> Expect:
    """An endless stream whose events start after the stall threshold: the
    client reads EVENTS_WANTED of them, or gives up."""
    if cell.policy == "strip":  # no offer: no encoder wraps it
        return Expect(EVENTS, "opened", stalled=False, upstream_coding=None)
    coding = choose(BROWSER_CODINGS)
    if cell.behaviour == Behaviour.FIXED:  # the head at once, each event flushed
        return Expect(EVENTS, "opened", stalled=False, content_encoding=coding, words=("content-encoding",))
    if cell.behaviour == Behaviour.HOLD_UNTIL_BODY:  # the head comes with the first event
        return Expect(EVENTS, "opened", stalled=True, fast=False, content_encoding=coding,
                      words=("head only came with the first event",))
    if cell.behaviour == Behaviour.BUFFER_EVENTS:  # the head with the first write, no event decodable
        return Expect("head only", "opened", stalled=True, fast=False, content_encoding=coding,
                      words=("content-encoding", "no event came"))
    # hold-until-min-size: a few small events never add up to its size
    return Expect("gave up", "no-status", stalled=True, fast=False, words=("no response head",))


def cells(with_haproxy: bool) -> list[Cell]:
    grid = [Cell(t, b.value, s, p)
            for t in TRANSPORTS for b in HANDSHAKE_BEHAVIOURS for s in SPEAKERS for p in POLICIES]
    grid += [Cell(t, Behaviour.FIXED.value, "client", "inject") for t in TRANSPORTS]
    if with_haproxy:
        grid += [Cell("h2", "haproxy", s, p) for s in SPEAKERS for p in POLICIES]
    grid += [Cell(t, b.value, EVENTS, p) for t in TRANSPORTS for b in EVENT_STREAM_BEHAVIOURS for p in POLICIES]
    return grid


def event_stream_seen(seen: EventStreamSeen) -> Seen:
    """An event stream's client in the table's terms: its head for the status."""
    if seen.outcome.startswith("failed"):
        outcome = seen.outcome
    elif len(seen.events) >= EVENTS_WANTED:
        outcome = EVENTS
    else:
        outcome = "gave up" if seen.status is None else "head only"
    return Seen(outcome, seen.status, seen.head_s, seen.content_encoding)


@dataclass
class Result:
    cell: Cell
    seen: Seen
    record: dict | None
    stall: dict | None  # the stall record, if one was written
    stall_lines: list[str]
    problems: list[str] = field(default_factory=list)


def check(result: Result, want: Expect, threshold: float) -> list[str]:
    """Where reality disagrees with what the cell must produce."""
    seen, record, problems = result.seen, result.record, []
    if seen.outcome != want.client:
        problems.append(f"client {seen.outcome!r}, expected {want.client!r}")
    if record is None:
        return problems + ["no handshake record"]
    # Every upstream in the lab speaks the client's transport, so the addon carries each cell as it came.
    for name in ("transport", "upstream_transport"):
        if record[name] != result.cell.transport:
            problems.append(f"{name} {record[name]!r}, expected {result.cell.transport!r}")
    if record["outcome"] != want.outcome:
        problems.append(f"outcome {record['outcome']!r}, expected {want.outcome!r}")
    if record["stalled"] != want.stalled:
        problems.append(f"stalled {record['stalled']}, expected {want.stalled}")
    if want.stalled:
        if result.stall is None or "stall" not in result.stall["diagnosis"].lower():
            problems.append("no stall record")
        elif result.stall["waited_s"] is None or result.stall["waited_s"] > threshold * 1.5:
            problems.append(f"stall reported late ({result.stall['waited_s']} s, threshold {threshold} s)")
        if not result.stall_lines:
            problems.append("no live stall line in mitmdump's log")
    elif result.stall is not None or result.stall_lines:
        problems.append("a stall was reported")
    # "At once" is: no stall reported, and the client had its status well
    # before a held one could come (this machine may be busy).
    if want.fast and (seen.status_s is None or seen.status_s >= threshold * 1.5):
        problems.append(f"status after {seen.status_s} s, expected within {threshold * 1.5:g} s")
    if not want.fast and want.outcome in ("upgraded", "opened") and seen.status_s is not None \
            and seen.status_s < threshold:
        problems.append(f"status after {seen.status_s:.2f} s, expected it held past {threshold} s")
    if record["content_encoding"] != want.content_encoding:
        problems.append(f"content-encoding {record['content_encoding']!r}, expected {want.content_encoding!r}")
    if record["accept_encoding_upstream"] != want.upstream_coding:
        problems.append(f"accept-encoding upstream {record['accept_encoding_upstream']!r}, "
                        f"expected {want.upstream_coding!r}")
    for word in want.words:
        if word not in record["diagnosis"].lower():
            problems.append(f"diagnosis lacks {word!r}: {record['diagnosis']!r}")
    return problems


COLUMNS = ("cell", "client", "status", "record", "diagnosis")
WIDTHS = (44, 11, 8, 22)
NARROWEST_DIAGNOSIS = 40  # columns; in a narrower terminal the diagnosis goes on lines of its own
# What the client column says (Seen.outcome), for the table's legend.
LEGEND = [
    "client: echoed/greeted = the WebSocket worked (the echo of what it sent, or /greet's greeting, came back "
    "as sent); unreadable = frames came back but not that message (compressed bytes: an encoded upgrade); "
    "gave up = no status in time; refused N = status N; failed = the connection broke; an event stream's: "
    f"events = its head and {EVENTS_WANTED} events came, head only = its head came but no event in time",
    "status: seconds to the status (an event stream's head), as the client saw it; record: the addon's outcome, ⌛ where it reported a "
    "stall, ce= the response's content-encoding",
]


def describe_record(record: dict | None) -> str:
    if record is None:
        return "(none)"
    text = record["outcome"] + (" ⌛" if record["stalled"] else "")
    if record["content_encoding"]:
        text += f" ce={record['content_encoding']}"
    return text


def row(result: Result) -> list[str]:
    seen = result.seen
    status = f"{seen.status_s:.2f} s" if seen.status_s is not None else "-"
    diagnosis = result.record["diagnosis"] if result.record else ""
    return [result.cell.name, seen.outcome, status, describe_record(result.record), diagnosis]


def row_lines(cells_: list[str], width: int) -> list[str]:
    """A table row in `width` columns: the diagnosis, last, wrapped at words under itself, never cut."""
    head = "".join(c.ljust(w) for c, w in zip(cells_, WIDTHS))
    if width - len(head) < NARROWEST_DIAGNOSIS:
        return [head.rstrip()] + textwrap.wrap(cells_[-1], width, initial_indent="    ", subsequent_indent="    ")
    return textwrap.wrap(cells_[-1], width, initial_indent=head, subsequent_indent=" " * len(head)) or [head]


def terminal_width() -> int:
    return max(shutil.get_terminal_size((160, 24)).columns, 100)


def print_row(cells_: list[str], out=sys.stdout) -> None:
    print("\n".join(row_lines(cells_, terminal_width())), file=out, flush=True)


def print_result(result: Result, out=sys.stdout) -> None:
    print_row(row(result), out)
    for line in result.stall_lines:
        print(f"    mitmdump | {line.strip()}", file=out)


@dataclass
class Run:
    threshold: float
    bundle: Path | None
    with_haproxy: bool
    only: str = ""
    force: bool = False  # a non-empty bundle folder is replaced
    results: list[Result] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)


def environment() -> dict[str, str]:
    from importlib.metadata import version

    import brotli

    from mitmproxy.version import VERSION

    return {
        "mitmproxy": VERSION,
        "Python": platform.python_version(),
        "OS": platform.platform(),
        "hypercorn": version("hypercorn"),
        "h2": version("h2"),
        "aioquic": version("aioquic"),
        "zstd": f"{ZSTD_LIBRARY} (libzstd)",
        "brotli": getattr(brotli, "__version__", version("brotli")),
        "HAProxy": haproxy.version() or "not installed",
    }


async def run_cell(cell: Cell, proxy: Proxy, give_up: float, after: float, gate: asyncio.Semaphore) -> Result:
    port = proxy.ports[cell.upstream]
    if cell.is_event_stream:
        # Endless, its events from `after` on, a few tenths of the threshold apart.
        path = f"{cell.path}?after={after}&every={after / 8:g}"
        # Its events come from `after` on, where a WebSocket's greeting comes once: it gets as
        # long again after its first event as a WebSocket client after its status.
        seen = event_stream_seen(await read_event_stream(cell.transport, port, path,
                                                         accept_encoding=cell.accept_encoding,
                                                         count=EVENTS_WANTED, give_up=give_up + after / 2))
    else:
        path = cell.path + (f"?after={after}" if cell.speaker == "server" else "")
        try:
            seen = await CLIENTS[cell.transport](port, path, cell.speaker, cell.accept_encoding, give_up, gate)
        except (OSError, ConnectionError, h2ws.WebSocketClosed) as e:
            seen = Seen(f"failed ({type(e).__name__})")
    record = await proxy.handshake_record(cell.path, timeout=5)
    stall = next((r for r in proxy.records(cell.path) if r["event"] == "stall"), None)
    return Result(cell, seen, record, stall, proxy.stall_lines(cell.path))


async def run(threshold: float = 2.0, bundle: Path | None = None, out=sys.stdout,
              only: str = "", min_size: int = MIN_SIZE, force: bool = False) -> Run:
    """Run every cell (or those whose name contains `only`); print the table,
    in the grid's order as cells finish; check them."""
    state = Run(threshold, bundle, haproxy.available(), only, force)
    state.environment = environment()
    give_up, after = threshold * 3, threshold * 2
    grid = [c for c in cells(state.with_haproxy) if only in c.name]
    streams = sum(c.is_event_stream for c in grid)
    counted = ", ".join(f"{n} {what}{'s' if n != 1 else ''}"
                        for n, what in ((len(grid) - streams, "handshake"), (streams, "event stream")) if n)
    print(f"ws-encode lab: {counted or 'nothing'} through mitmdump with the addon (ws_encode_stall={threshold}; "
          f"clients give up after {give_up:g} s, event-stream clients {give_up + after / 2:g} s; "
          f"/greet and /events speak after {after:g} s)", file=out)
    print("  " + ", ".join(f"{k} {v}" for k, v in state.environment.items()), file=out)
    if not state.with_haproxy:
        print("  HAProxy is not installed (Debian package haproxy): its rows are skipped", file=out)
    print(file=out)
    with tempfile.TemporaryDirectory(prefix="wslab-") as tmp:
        work = Path(tmp)
        behaviours = sorted({c.behaviour for c in grid} - {"haproxy"})
        use_haproxy = any(c.behaviour == "haproxy" for c in grid)
        lab = await LabProcess(behaviours + (["none"] if use_haproxy else []), min_size, h3=True).start()
        front = None
        try:
            upstreams = {b: lab.url(b) for b in behaviours} | {f"{b} h3": lab.h3_url(b) for b in behaviours}
            if use_haproxy:
                front = await haproxy.Front(lab.ports["none"], h2ws.make_self_signed_cert(work), work).start()
                upstreams["haproxy"] = front.url
            proxies = {}
            for policy in sorted({c.policy for c in grid}):
                mine = {c.upstream: upstreams[c.upstream] for c in grid if c.policy == policy}
                flows = work / f"flows-{policy}.mitm" if bundle else None
                proxies[policy] = Proxy(mine, work / f"report-{policy}.jsonl",
                                        "--set", f"ws_encode_policy={policy}",
                                        "--set", f"ws_encode_stall={threshold}", flows=flows)
            await asyncio.gather(*(p.start() for p in proxies.values()))
            for line in LEGEND:
                print(textwrap.fill(line, terminal_width(), subsequent_indent="  "), file=out)
            print(file=out)
            print_row(list(COLUMNS), out)
            gate = asyncio.Semaphore(CONNECTING)
            # The cells that wait start first; the rest run meanwhile, a few at a time.
            tasks = {c: asyncio.ensure_future(run_cell(c, proxies[c.policy], give_up, after, gate))
                     for c in sorted(grid, key=lambda c: not expect(c).stalled)}
            try:
                # Rows are printed in the grid's order, each once it and those above it are done.
                for cell in grid:
                    result = await tasks[cell]
                    result.problems = check(result, expect(result.cell), threshold)
                    state.results.append(result)
                    print_result(result, out)
            finally:
                for task in tasks.values():
                    task.cancel()  # (those not done: a cell above them failed)
                await asyncio.gather(*(p.stop() for p in proxies.values()))
            if bundle:
                write_bundle(state, bundle, list(proxies.values()), work)
        finally:
            if front:
                await front.stop()
            await lab.stop()
    return state


def failures(state: Run) -> list[Result]:
    return [r for r in state.results if r.problems]


def table_lines(state: Run) -> list[str]:
    """The run's table, in the grid's order (not finishing order), with each cell's check."""
    order = {c: i for i, c in enumerate(cells(state.with_haproxy))}
    results = sorted(state.results, key=lambda r: order[r.cell])
    lines = ["| " + " | ".join(COLUMNS) + " | check |", "|" + " --- |" * (len(COLUMNS) + 1)]
    for r in results:
        cells_ = row(r) + ["ok" if not r.problems else "FAIL: " + "; ".join(r.problems)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells_) + " |")
    return lines


def write_bundle(state: Run, folder: Path, proxies: list[Proxy], work: Path) -> None:
    from mitmproxy import io

    records = sorted((r for p in proxies for r in p.records()), key=lambda r: r["ts"])
    flows = []
    for path in sorted(work.glob("flows-*.mitm")):
        with open(path, "rb") as f:
            flows += list(io.FlowReader(f).stream())
    order = {c.path: i for i, c in enumerate(cells(state.with_haproxy))}
    flows.sort(key=lambda f: order.get(f.request.path.split("?")[0], len(order)))
    notes = [f"ws_encode_stall = {state.threshold} s; clients offer `accept-encoding: {BROWSER_CODINGS}` "
             f"(except `inject`) and give up after {state.threshold * 3:g} s; `/greet` speaks first after "
             f"{state.threshold * 2:g} s. Each cell's observe and strip rows are its A/B."]
    ab = table_lines(state) + [""] + [f"- {line}" for line in LEGEND]
    if state.with_haproxy:
        ab += ["", "HAProxy: " + textwrap.fill(haproxy.FINDING, 100)]
    options = {"ws_encode_stall": state.threshold, "ws_encode_policy": ", ".join(sorted({c.cell.policy
                                                                                       for c in state.results}))}
    bundle.write_bundle(folder, flows, records, environment=state.environment, options=options, ab=ab,
                        notes=notes, title="ws-encode lab run", force=state.force)
