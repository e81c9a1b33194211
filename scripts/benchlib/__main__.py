"""What the addon costs (issues 10, 21 and 16): every goal measured side by side, in one run.

    scripts/bench [11|12] [--quick] [--json FILE] [--readme docs/cost.md] [--addon PATH]

On 127.0.0.1, against upstreams in a process of their own (benchlib.upstream),
through mitmdump processes started here (each loads scripts/loopback_only.py;
they show warnings only, so a terminal is not what is measured, but for one
row of goal 1):

1. What the whole mitmdump process pays: its CPU seconds (all its threads,
   /proc/<pid>/task/*/schedstat) with the addon (report on, policy observe)
   ÷ without, around each batch, in batch pairs of one mitmdump process, the
   addon unloaded and loaded again between batches (mitmproxy's `scripts`
   option, through benchlib/probe.py) and the order reversed every other
   pair; each batch's tail is waited for. One process, because two mitmdumps
   of the same configuration differ by up to 10 % in CPU per byte (measured:
   a second one without the addon came out at 1.11 against the first), more
   than what the goals allow. Each figure is the median of the pairs' ratios,
   their spread printed beside it, and beside that what a script with no
   hooks costs (benchlib/empty_script.py: any script's floor).
   Loads: plain ws:// handshake + one echo + close (the cheapest handshake,
   so the hardest ratio), the same with mitmdump's default output (a line per
   flow, the log at INFO: what `mitmdump -s` pays), wss:// handshake + echo +
   close, an event stream opened and read to its first event (keep-alive
   HTTP/1.1, as an EventSource; the upstream serves it as the lab's /events,
   then ends it), ordinary HTTP/1.1 GETs (keep-alive) and ordinary HTTP/2
   GETs (one connection).
   And, as a diagnostic, the addon's own work alone (benchlib/hooktime.py):
   its hooks for one handshake + echo + close in mitmproxy's test context,
   less the same hooks doing nothing, ÷ mitmdump's CPU per handshake without
   the addon.
2. WebSocket message throughput with ÷ without, 1 KiB and 64 KiB messages,
   client→server (the upstream says `done` after the last) and server→client.
3. Through the mitmdump with the addon: HTTP/2 (RFC 8441, one TLS connection)
   ÷ HTTP/1.1 over TLS (wss, one TLS handshake per WebSocket; TLS upstream too,
   as the HTTP/2 one), and HTTP/3 (RFC 9220, one QUIC connection, to an
   HTTP/3 upstream) ÷ HTTP/2: handshakes/s and echoes/s (one WebSocket, one
   message at a time) that mitmdump sustains, i.e. 1 / its CPU seconds per
   operation (the pure-Python HTTP/2 and HTTP/3 clients and servers share the
   CPU, so wall rates, shown too, measure them as well). Plain ws:// both
   legs for reference.
4. N handshakes held at once by a stalling upstream, HTTP/1.1, HTTP/2 and
   HTTP/3, opened over a few seconds while healthy handshakes keep arriving:
   each stall reported exactly once; lateness = received_s - ws_encode_stall
   from each stall record (the stall clock starts at receipt), and from
   outside: record ts - the client's send time - ws_encode_stall (an upper
   bound).
5. tracemalloc bytes the addon keeps per tracked handshake (benchlib.memory);
   the addon's structures after the run's handshakes (benchlib/probe.py asks
   inside mitmdump); resident memory per open WebSocket, HTTP/2 and HTTP/3
   ÷ HTTP/1.1 over TLS, each in a fresh mitmdump.

Ratios are medians of pairs measured in this one run; the machine may be
noisy, so absolute numbers are only context. `--quick` is a smoke run (small
counts) that CI executes through tests/test_bench.py.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from wspeers import h2ws, h3ws
import mitmproxy.version

from benchlib.clients import H1Requests, H1WebSocket
from benchlib.procs import EMPTY_SCRIPT, Mitmdump, Upstreams, die_with_parent
from mitmdump_proc import ADDON

ENCODINGS = [("accept-encoding", "gzip, deflate, br, zstd")]


@dataclass
class Params:
    pairs: int  # goal 1 batch pairs
    handshakes: int  # goal 1 handshakes + echo per batch (ws://; half as many wss://, which cost twice as much)
    requests: int  # goal 1 ordinary requests per batch
    concurrency: int
    tp_pairs: int
    tp_small: int  # 1 KiB messages per batch
    tp_large: int  # 64 KiB messages per batch
    g3_pairs: int
    g3_handshakes: int
    g3_echoes: int
    held: int  # goal 4, HTTP/1.1 and HTTP/2
    held_h3: int  # goal 4, HTTP/3
    ramp_s: float
    stall: float
    rss_websockets: int
    mem_tracked: int
    mem_cycled: int


FULL = Params(pairs=12, handshakes=300, requests=600, concurrency=8, tp_pairs=8, tp_small=1500,
              tp_large=150, g3_pairs=4, g3_handshakes=300, g3_echoes=1000, held=1000, held_h3=300, ramp_s=3.0,
              stall=2.0, rss_websockets=1000, mem_tracked=1000, mem_cycled=10000)
QUICK = Params(pairs=1, handshakes=20, requests=50, concurrency=4, tp_pairs=1, tp_small=50,
               tp_large=5, g3_pairs=1, g3_handshakes=15, g3_echoes=50, held=30, held_h3=20, ramp_s=0.3,
               stall=0.5, rss_websockets=30, mem_tracked=100, mem_cycled=300)


@dataclass
class Figure:
    goal: int
    key: str
    title: str
    value: float | None
    unit: str
    op: str  # "<=", ">=", "=="
    target: float
    measured: str
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return None
        return {"<=": self.value <= self.target, ">=": self.value >= self.target,
                "==": self.value == self.target}[self.op]


class Progress:
    """One line on stderr, rewritten in place on a terminal."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        text = f"[{min(self.done, self.total):3d}/{self.total}] {time.monotonic() - self.started:5.0f} s  {label}"
        if self.tty:
            sys.stderr.write("\r\033[K" + text[:200])
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def spread(values: list[float]) -> str:
    """How far a median's values lie apart: the middle half, and all."""
    return (f"middle half {percentile(values, 25):.3f}–{percentile(values, 75):.3f}, "
            f"all {min(values, default=float('nan')):.3f}–{max(values, default=float('nan')):.3f}")


# -- batches ---------------------------------------------------------------


async def settle(proc: Mitmdump, quiet: float = 0.06, limit: float = 3.0) -> float:
    """The process's CPU seconds once it has stopped working (a batch's tail
    of closing connections belongs to that batch): under IDLE of a core for
    `quiet` seconds (its own timers keep ticking)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    last, at = proc.cpu(), loop.time()
    while loop.time() < deadline:
        await asyncio.sleep(quiet)
        now, now_at = proc.cpu(), loop.time()
        if now - last < IDLE * (now_at - at):
            return now
        last, at = now, now_at
    return last


IDLE = 0.01


async def batch(proc: Mitmdump, work: Callable[[], Awaitable[int]]) -> dict[str, float]:
    """CPU seconds of `proc` and wall seconds for one batch of `work`."""
    cpu0 = await settle(proc)
    t0 = time.perf_counter()
    count = await work()
    wall = time.perf_counter() - t0
    cpu = await settle(proc) - cpu0
    return {"count": count, "cpu_s": cpu, "wall_s": wall}


async def workers(n: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> int:
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await one(i)

    await asyncio.gather(*(worker() for _ in range(min(n, concurrency))))
    return n


def h1_ws_echo(port: int, n: int, concurrency: int, tls: bool = False, echo: bool = True):
    async def one(i: int) -> None:
        ws = await H1WebSocket.open(port, f"/echo/{i}", tls)
        if echo:
            await ws.echo(f"m{i}")
        await ws.close()

    return lambda: workers(n, concurrency, one)


def h1_keepalive(port: int, n: int, concurrency: int, one: Callable[[H1Requests, int], Awaitable[None]]):
    """`n` of `one`, on `concurrency` keep-alive HTTP/1.1 connections."""
    async def run() -> int:
        conns = [await H1Requests.open(port) for _ in range(concurrency)]

        async def worker(conn: H1Requests, share: range) -> None:
            for i in share:
                await one(conn, i)

        await asyncio.gather(*(worker(c, range(k, n, concurrency)) for k, c in enumerate(conns)))
        for conn in conns:
            conn.close()
        return n

    return run


def h1_requests(port: int, n: int, concurrency: int):
    async def one(conn: H1Requests, i: int) -> None:
        if (await conn.get(f"/plain/{i}"))[0] != 200:
            raise ConnectionError("not 200")

    return h1_keepalive(port, n, concurrency, one)


def h1_event_streams(port: int, n: int, concurrency: int):
    """Event streams opened and read to their first event, as an EventSource
    on a keep-alive HTTP/1.1 connection would."""
    async def one(conn: H1Requests, i: int) -> None:
        await conn.first_event(f"/events/{i}")

    return h1_keepalive(port, n, concurrency, one)


# The clients of the multiplexed transports, one connection for many streams.
MUX_CLIENTS = {"h2": h2ws.H2WebSocketClient, "h3": h3ws.H3WebSocketClient}


def mux_client(kind: str, port: int) -> h2ws.H2WebSocketClient | h3ws.H3WebSocketClient:
    return MUX_CLIENTS[kind]("127.0.0.1", port, server_hostname="localhost")


def h2_client(port: int) -> h2ws.H2WebSocketClient:
    return mux_client("h2", port)


def h2_requests(port: int, n: int, concurrency: int):
    async def run() -> int:
        async with await h2_client(port).connect(30) as client:
            async def one(i: int) -> None:
                status, _ = await client.get(f"/plain/{i}", "localhost", timeout=30)
                if status != 200:
                    raise ConnectionError("not 200")

            return await workers(n, concurrency, one)

    return run


def mux_handshakes(kind: str, port: int, n: int, concurrency: int):
    """Handshakes and closes, `concurrency` at a time, on one HTTP/2 or HTTP/3 connection."""
    async def run() -> int:
        async with await mux_client(kind, port).connect(30) as client:
            async def one(i: int) -> None:
                ws = await client.open_websocket(f"/g3/{i}", "localhost")
                await ws.wait_status(30)
                await ws.close(timeout=30)

            return await workers(n, concurrency, one)

    return run


def h1_echoes(port: int, n: int, tls: bool):
    async def run() -> int:
        ws = await H1WebSocket.open(port, "/echo/g3", tls)
        for i in range(n):
            await ws.echo(f"m{i}")
        await ws.close()
        return n

    return run


def mux_echoes(kind: str, port: int, n: int):
    """Echoes, one message at a time, on one WebSocket over HTTP/2 or HTTP/3."""
    async def run() -> int:
        async with await mux_client(kind, port).connect(30) as client:
            ws = await client.open_websocket("/echo/g3", "localhost")
            await ws.wait_status(30)
            for i in range(n):
                await ws.send_text(f"m{i}", 30)
                await ws.receive(30)
            await ws.close(timeout=30)
        return n

    return run


def h1_throughput(port: int, direction: str, size: int, n: int):
    """Bytes moved one way on one WebSocket; time from the status to the last message."""

    async def run() -> int:
        if direction == "up":
            ws = await H1WebSocket.open(port, f"/sink/{n}")
            payload = b"u" * size
            for i in range(n):
                ws.send(payload)
                if i % 16 == 15:
                    await ws.drain()
            if await ws.receive() != "done":
                raise ConnectionError("no done")
        else:
            ws = await H1WebSocket.open(port, f"/source/{n}/{size}")
            for _ in range(n):
                await ws.receive()
        await ws.close()
        return n * size

    return run


# The batches `alternate` runs with the addon loaded, without it, and with
# only a script that has no hooks (what any script costs mitmproxy).
EMPTY = "empty script"
LOADED = {"with": lambda proc: proc.addon_path, "without": lambda proc: None, EMPTY: lambda proc: EMPTY_SCRIPT}


def abba(keys: list[str], rounds: int):
    """Each round's number and order: as given, reversed every other round
    (so that what comes first has no advantage)."""
    for i in range(rounds):
        yield i, (keys if i % 2 == 0 else keys[::-1])


async def alternate(procs: dict[str, Mitmdump], works: dict[str, Callable], pairs: int,
                    progress: Progress, label: str) -> dict[str, list[dict]]:
    """`pairs` rounds of one batch per entry of `works` (run on procs[key]),
    the order reversed every other round; a "with", "without" or EMPTY batch
    first loads what it names in its mitmdump (and unloads the rest)."""
    results: dict[str, list[dict]] = {k: [] for k in works}
    for i, order in abba(list(works), pairs):
        for key in order:
            progress.step(f"{label}: {key}, round {i + 1}/{pairs}")
            if key in LOADED:
                await procs[key].use(LOADED[key](procs[key]))
            results[key].append(await batch(procs[key], works[key]))
    return results


def cpu_ratio_figure(key: str, title: str, target: float, runs: dict[str, list[dict]], unit_name: str) -> Figure:
    with_, without, empty = runs["with"], runs["without"], runs[EMPTY]
    ratios = [ratio(a["cpu_s"], b["cpu_s"]) for a, b in zip(with_, without)]
    floor = [ratio(a["cpu_s"], b["cpu_s"]) for a, b in zip(empty, without)]
    per = lambda rs: median([1000 * r["cpu_s"] / r["count"] for r in rs])  # noqa: E731
    rate = lambda rs: median([r["count"] / r["wall_s"] for r in rs])  # noqa: E731
    n = with_[0]["count"]
    return Figure(
        1, key, title, median(ratios), "x", "<=", target,
        f"median of {len(ratios)} pairs x {n} {unit_name} ({spread(ratios)}); CPU {per(with_):.3f} vs "
        f"{per(without):.3f} ms each; {rate(with_):.0f} vs {rate(without):.0f}/s; a script with no hooks ÷ without: "
        f"{median(floor):.3f}x ({spread(floor)})",
        {"ratios": ratios, "empty_script_ratios": floor, "with": with_, "without": without, "empty_script": empty,
         "cpu_ms_each_with": per(with_), "cpu_ms_each_without": per(without), "cpu_ms_each_empty_script": per(empty),
         "rate_with": rate(with_), "rate_without": rate(without)},
    )


async def goal_one(quiet: Mitmdump, loud: Mitmdump, p: Params, progress: Progress) -> list[Figure]:
    """What the whole process pays, with ÷ without, for each of goal 1's loads."""
    c = p.concurrency
    loads = [
        ("g1_h1_websocket_cpu_ratio", "ws:// handshake+echo+close: CPU with ÷ without", 1.05, quiet,
         lambda m: h1_ws_echo(m.ports["h1"], p.handshakes, c), "handshakes"),
        ("g1_h1_websocket_default_output_cpu_ratio", "ws://, mitmdump's default output: CPU with ÷ without", 1.05,
         loud, lambda m: h1_ws_echo(m.ports["h1"], p.handshakes, c), "handshakes"),
        ("g1_h1_wss_cpu_ratio", "wss:// handshake+echo+close: CPU with ÷ without", 1.03, quiet,
         lambda m: h1_ws_echo(m.ports["h1_tls"], max(1, p.handshakes // 2), c, tls=True), "handshakes"),
        ("g1_h1_event_stream_cpu_ratio", "event stream to its first event: CPU with ÷ without", 1.05, quiet,
         lambda m: h1_event_streams(m.ports["h1"], p.requests, c), "event streams"),
        ("g1_h1_request_cpu_ratio", "HTTP/1.1 requests: CPU with ÷ without", 1.01, quiet,
         lambda m: h1_requests(m.ports["h1"], p.requests, c), "requests"),
        ("g1_h2_request_cpu_ratio", "HTTP/2 requests: CPU with ÷ without", 1.01, quiet,
         lambda m: h2_requests(m.ports["h2"], p.requests, c), "requests"),
    ]
    figures = []
    for key, title, target, proc, work, unit in loads:
        procs = {k: proc for k in LOADED}
        runs = await alternate(procs, {k: work(proc) for k in procs}, p.pairs, progress, f"goal 1: {title.split(':')[0]}")
        figures.append(cpu_ratio_figure(key, title, target, runs, unit))
    return figures


# -- goal 4 ----------------------------------------------------------------


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return records


def record_path(record: dict) -> str:
    return urllib.parse.urlsplit(record.get("url") or "").path


def ts_seconds(record: dict) -> float:
    return datetime.datetime.fromisoformat(record["ts"]).timestamp()


async def healthy_traffic(proc: Mitmdump, stop: asyncio.Event, held: str) -> dict[str, int]:
    """Healthy handshakes + an echo each, one after another, HTTP/1.1 and a
    multiplexed transport by turns (HTTP/3 while HTTP/3 ones are held, else HTTP/2)."""
    done = errors = 0
    kind = "h3" if held == "h3" else "h2"
    async with await mux_client(kind, proc.ports[kind]).connect(30) as client:
        while not stop.is_set():
            try:
                if done % 2 == 0:
                    ws = await H1WebSocket.open(proc.ports["h1"], f"/echo/healthy/{held}/{done}")
                    await ws.echo("hi")
                    await ws.close()
                else:
                    ws2 = await client.open_websocket(f"/healthy/{held}/{done}", "localhost")
                    await ws2.wait_status(30)
                    await ws2.send_text("hi", 30)
                    await ws2.receive(30)
                    await ws2.close(timeout=30)
                done += 1
            except (ConnectionError, asyncio.TimeoutError, h2ws.WebSocketClosed):
                errors += 1
                await asyncio.sleep(0.05)
    return {"healthy_handshakes": done, "healthy_errors": errors}


TRANSPORT_NAMES = {"h1": "HTTP/1.1", "h2": "HTTP/2", "h3": "HTTP/3"}


HOLD_RUNS = itertools.count()  # each run's paths are its own, in one report


async def hold(proc: Mitmdump, report: Path, transport: str, p: Params, progress: Progress) -> Figure:
    n, prefix = (p.held_h3 if transport == "h3" else p.held), f"/hold/{transport}/{next(HOLD_RUNS)}/"
    sent: dict[str, float] = {}
    h1_socks: list[H1WebSocket] = []
    mux_clients: list[h2ws.H2WebSocketClient | h3ws.H3WebSocketClient] = []
    stop = asyncio.Event()
    healthy = asyncio.ensure_future(healthy_traffic(proc, stop, transport))
    loop = asyncio.get_running_loop()
    await proc.query("pauses start")
    progress.step(f"goal 4: {n} {transport} handshakes held, opening over {p.ramp_s:g} s")
    per_conn = 50
    if transport != "h1":
        for _ in range(math.ceil(n / per_conn)):
            mux_clients.append(await mux_client(transport, proc.ports[f"{transport}_hold"]).connect(30))
    steps = max(1, math.ceil(p.ramp_s / 0.1))
    start = loop.time()
    for s in range(steps):
        for i in range(s * n // steps, (s + 1) * n // steps):
            path = f"{prefix}{i}"
            if transport == "h1":
                h1_socks.append(await H1WebSocket.start(proc.ports["h1"], path, headers=b"accept-encoding: gzip\r\n"))
            else:
                await mux_clients[i // per_conn].open_websocket(path, "localhost", headers=ENCODINGS)
            sent[path] = time.time()
        await asyncio.sleep(max(0.0, start + (s + 1) * 0.1 - loop.time()))
    progress.step(f"goal 4: {n} {transport} handshakes held, waiting for their stalls")
    deadline = loop.time() + p.stall + 30
    stalls: list[dict] = []
    while loop.time() < deadline:
        stalls = [r for r in read_records(report) if r.get("event") == "stall" and record_path(r).startswith(prefix)]
        if len({record_path(r) for r in stalls}) >= n:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(p.stall)  # time for a stall to be reported twice
    paused = await proc.query("pauses stop")
    late = paused["late_ms"]
    pauses = {"ticks": len(late), "gc": paused["gc"],
              "loop_late_ms": {"p50": percentile(late, 50), "p99": percentile(late, 99), "max": max(late, default=None)}}
    stop.set()
    traffic = await healthy
    for sock in h1_socks:
        sock.abort()
    for client in mux_clients:
        await client.close(5)
    records = read_records(report)
    stalls = [r for r in records if r.get("event") == "stall" and record_path(r).startswith(prefix)]
    per_path: dict[str, int] = {}
    for r in stalls:
        per_path[record_path(r)] = per_path.get(record_path(r), 0) + 1
    once = sum(1 for path in sent if per_path.get(path) == 1)
    healthy = [r for r in records if r.get("event") == "stall" and f"/healthy/{transport}/" in record_path(r)]
    healthy_stalls = len(healthy)
    healthy_stuck = ", ".join(sorted({str(r.get("stuck_in")) for r in healthy}))
    stall_of = {record_path(r): r for r in stalls}
    # The stall clock starts when the proxy receives the handshake (SPEC: `received_s`);
    # an addon whose records predate that field counts from forwarding (`waited_s`).
    clock = "received_s" if any("received_s" in r for r in stalls) else "waited_s"
    late_addon = [1000 * (r[clock] - p.stall) for r in stalls if r.get(clock) is not None]
    late_outside = [1000 * (ts_seconds(stall_of[path]) - t - p.stall) for path, t in sent.items() if path in stall_of]
    p99 = percentile(late_addon, 99)
    # Lateness by when the handshake was sent: growing through the ramp means
    # the proxy's event loop fell behind the arrivals.
    in_order = [1000 * (stall_of[path][clock] - p.stall) for path, _ in sorted(sent.items(), key=lambda kv: kv[1])
                if path in stall_of and stall_of[path].get(clock) is not None]
    tenth = max(1, len(in_order) // 10)
    by_decile = [round(statistics.median(in_order[i:i + tenth])) for i in range(0, len(in_order), tenth)][:10]
    return Figure(
        4, f"g4_{transport}_stall_lateness_p99_ms",
        f"{TRANSPORT_NAMES[transport]}: {n} held at once, stall lateness p99",
        p99, "ms", "<=", 50,
        f"{once}/{n} stalls reported exactly once ({len(stalls) - len(per_path)} repeats, "
        f"{n - len(per_path)} missing); lateness ({clock} - stall) p50 {percentile(late_addon, 50):.0f}, max "
        f"{max(late_addon, default=float('nan')):.0f} ms, median by tenth of the sends {by_decile}; outside p99 {percentile(late_outside, 99):.0f} ms; "
        f"{traffic['healthy_handshakes']} healthy meanwhile, {healthy_stalls} of them reported as stalls; "
        f"meanwhile mitmdump's event loop ran a 10 ms timer late by p99 {pauses['loop_late_ms']['p99']:.0f}, "
        f"max {pauses['loop_late_ms']['max']:.0f} ms, and its garbage collector's longest pause was "
        f"{max(g['max_ms'] for g in pauses['gc'].values()):.0f} ms ({pauses['gc']['gen2']['count']} full collections)",
        {"held": n, "reported_exactly_once": once, "stall_records": len(stalls), "missing": n - len(per_path),
         "healthy_reported_as_stall": healthy_stalls, "healthy_stuck_in": healthy_stuck, **traffic,
         "lateness_ms": {"p50": percentile(late_addon, 50), "p99": p99, "max": max(late_addon, default=None)},
         "lateness_outside_ms": {"p50": percentile(late_outside, 50), "p99": percentile(late_outside, 99),
                                 "max": max(late_outside, default=None)},
         "lateness_ms_by_send_decile": by_decile,
         "stall_s": p.stall, "ramp_s": p.ramp_s, "lateness_from": clock, "event_loop": pauses},
    )


def once_figure(f: Figure) -> Figure:
    d = f.detail
    transport = TRANSPORT_NAMES[f.key.split("_")[1]]
    return Figure(4, f.key.replace("lateness_p99_ms", "reported_once"),
                  f"{transport}: {d['held']} held at once, stalls reported exactly once",
                  d["reported_exactly_once"], "", "==", d["held"],
                  f"{d['stall_records']} stall records for {d['held']} held handshakes; "
                  f"{d['healthy_handshakes']} healthy handshakes meanwhile, {d['healthy_reported_as_stall']} of "
                  f"them slow enough to be reported as stalls too (stuck in: {d['healthy_stuck_in'] or '-'})",
                  {"see": f.key})


# -- goal 5 ----------------------------------------------------------------


RSS_KINDS = ("h2", "h3", "h1-tls", "h1-plain")


def rss_mitmdump(kind: str, upstreams: Upstreams, options: dict, addon: Path) -> Mitmdump:
    target = {"h2": f"https://127.0.0.1:{upstreams.ports['h2']}", "h3": f"http3://127.0.0.1:{upstreams.ports['h3']}",
              "h1-tls": f"https://127.0.0.1:{upstreams.ports['h1_tls']}"}.get(kind, f"http://127.0.0.1:{upstreams.ports['h1']}")
    return Mitmdump(f"rss-{kind}", {"p": target}, True, options, addon)


async def rss_per_websocket(kind: str, proc: Mitmdump, n: int, progress: Progress) -> dict[str, Any]:
    """Resident bytes per open WebSocket (one echo each), in a mitmdump that has done nothing else."""
    port = proc.ports["p"]
    tls = kind == "h1-tls"
    multiplexed = kind in MUX_CLIENTS
    clients: list = []
    socks: list = []
    try:
        progress.step(f"goal 5: {n} open {kind} WebSockets, resident memory")
        # Warm up: code paths, mitmproxy's certificate for the name.
        if multiplexed:
            await mux_handshakes(kind, port, 5, 1)()
        else:
            await h1_ws_echo(port, 5, 1, tls)()
        await settle(proc)
        before = proc.rss()
        per_conn = 50
        for s in range(0, n, 25):
            for i in range(s, min(n, s + 25)):
                if multiplexed:
                    if i % per_conn == 0:
                        clients.append(await mux_client(kind, port).connect(30))
                    socks.append(await clients[-1].open_websocket(f"/echo/rss/{i}", "localhost"))
                else:
                    socks.append(await H1WebSocket.start(port, f"/echo/rss/{i}", tls))
            await asyncio.sleep(0.02)
        for ws in socks:
            if multiplexed:
                await ws.wait_status(30)
                await ws.send_text("hi", 30)
                await ws.receive(30)
            else:
                await ws.wait_status()
                await ws.echo("hi")
        await settle(proc)
        after = proc.rss()
        return {"websockets": n, "connections": len(clients) if multiplexed else n,
                "rss_before": before, "rss_after": after, "bytes_per_websocket": (after - before) / n}
    finally:
        for ws in socks:
            if not multiplexed:
                ws.abort()
        for client in clients:
            await client.close(5)
        await proc.stop()  # its memory is measured; nothing else runs in it


async def in_test_context(addon: Path, module: str, *args: str) -> Any:
    """What `python -m benchlib.MODULE ARGS` prints (one JSON value): the addon
    in mitmproxy's test context, in a process of its own."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in sys.path if x), "BENCH_ADDON": str(addon)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", f"benchlib.{module}", *args,
        stdout=asyncio.subprocess.PIPE, env=env, preexec_fn=die_with_parent,
    )
    out, _ = await proc.communicate()
    if proc.returncode:
        raise SystemExit(f"benchlib.{module} failed")
    return json.loads(out)


def hooks_figure(hooks: dict, without: list[dict]) -> Figure:
    """Goal 1 for the addon's own work alone, a diagnostic: its hooks' CPU per
    handshake in the test context, less what the same hooks doing nothing
    cost there, as a share of mitmdump's CPU per handshake without the addon
    (`without`, goal 1's ws:// batches)."""
    without_each = median([r["cpu_s"] / r["count"] for r in without])
    own = hooks["cpu_s_each"] - hooks["hooks_only_cpu_s_each"]
    return Figure(
        1, "g1_h1_websocket_hooks_ratio", "HTTP/1.1 handshake+echo: 1 + the addon's own hook CPU ÷ without",
        1 + own / without_each, "x", "<=", 1.03,
        f"the hooks of {hooks['handshakes']} handshakes in mitmproxy's test context, best of 3: "
        f"{1e6 * hooks['cpu_s_each']:.0f} µs each, of which the same hooks doing nothing (dispatch, making the hooks) "
        f"{1e6 * hooks['hooks_only_cpu_s_each']:.0f} µs; mitmdump without the addon {1000 * without_each:.2f} ms each",
        {**hooks, "own_cpu_s_each": own, "mitmdump_without_cpu_s_each": without_each},
    )


def transports_figure(key: str, what: str, faster: str, slower: str, target: float, runs: dict[str, list[dict]]) -> Figure:
    """Goal 3: how many more `what` per second mitmdump sustains over `faster`
    than over `slower`, with the addon: 1 / its CPU seconds per operation.
    The clients and upstreams (pure-Python h2 and aioquic for HTTP/2 and
    HTTP/3) share the CPU with mitmdump, so wall rates, shown too, measure
    them as well."""
    rate = {k: [r["count"] / r["wall_s"] for r in v] for k, v in runs.items()}
    each = {k: [r["cpu_s"] / r["count"] for r in v] for k, v in runs.items()}
    cpu = {k: 1000 * median(v) for k, v in each.items()}
    ratios = [ratio(b, a) for a, b in zip(each[faster], each[slower])]
    plain = [ratio(b, a) for a, b in zip(each[faster], each["h1_plain"])]
    wall = [ratio(a, b) for a, b in zip(rate[faster], rate[slower])]
    names = {**TRANSPORT_NAMES, "h1_tls": "HTTP/1.1 (TLS)"}
    return Figure(
        3, key, f"{names[faster]} ÷ {names[slower]} {what}/s mitmdump sustains, with the addon",
        median(ratios), "x", ">=", target,
        f"median of {len(ratios)} rounds x {runs[faster][0]['count']} ({spread(ratios)}); mitmdump CPU "
        f"{cpu[faster]:.3f} vs {cpu[slower]:.3f} ms each (plain ws:// {cpu['h1_plain']:.3f} ms, {median(plain):.2f}x); "
        f"wall rates {median(rate[faster]):.0f} vs {median(rate[slower]):.0f}/s ({median(wall):.2f}x, plain ws:// "
        f"{median(rate['h1_plain']):.0f}/s)",
        {"ratios": ratios, "ratios_vs_plain_h1": plain, "wall_ratios": wall, "rate": rate, "cpu_ms_each": cpu,
         "runs": {k: runs[k] for k in (faster, slower, "h1_plain")}})


def left_over(sizes: dict[str, int], baseline: dict[str, int], skip_stalls: bool) -> dict[str, int]:
    return {k: v - baseline.get(k, 0) for k, v in sizes.items()
            if v > baseline.get(k, 0) and not (skip_stalls and "stall" in k)}


async def structures_figure(proc: Mitmdump, baseline: dict[str, int], key: str, after: str,
                            skip_stalls: bool, measured: str) -> Figure:
    """Entries left in the addon's structures beyond `baseline`, once the proxy
    has caught up (asked again for up to 20 s); remembered stalls are kept by
    design (capped), so `skip_stalls` leaves them out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        sizes = (await proc.query("sizes"))["sizes"]
        left = left_over(sizes, baseline, skip_stalls)
        if not left or loop.time() > deadline:
            break
        await asyncio.sleep(0.2)
    if skip_stalls:
        kept = ", ".join(f"{k}={v}" for k, v in sizes.items() if "stall" in k) or "none"
        measured += f" (remembered stalls, capped by design: {kept})"
    return Figure(5, key, f"entries left in the addon's structures after {after}", sum(left.values()), "", "==", 0,
                  f"{measured}: {left or 'all back to empty'}", {"baseline": baseline, "sizes": sizes, "left": left})


# -- the run ---------------------------------------------------------------


def proxy_targets(upstreams: Upstreams) -> dict[str, str]:
    """What the proxy stands in front of, by the name of its port (HTTP/3 on UDP)."""
    return {"h1": f"http://127.0.0.1:{upstreams.ports['h1']}",
            "h1_tls": f"https://127.0.0.1:{upstreams.ports['h1_tls']}",
            "h2": f"https://127.0.0.1:{upstreams.ports['h2']}",
            "h2_hold": f"https://127.0.0.1:{upstreams.ports['h2_hold']}",
            "h3": f"http3://127.0.0.1:{upstreams.ports['h3']}",
            "h3_hold": f"http3://127.0.0.1:{upstreams.ports['h3_hold']}"}


def load_average() -> float:
    return os.getloadavg()[0]


async def run(p: Params, quick: bool, addon: Path) -> dict[str, Any]:
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = load_average()
    rss_kinds = RSS_KINDS[:3] if quick else RSS_KINDS
    steps = 18 * p.pairs + 12 * p.tp_pairs + 8 * p.g3_pairs + 12 + len(rss_kinds)
    progress = Progress(steps)
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="ws-encode-bench-") as tmp:
        report = Path(tmp) / "report.jsonl"
        progress.step("starting the upstreams and the mitmdumps")
        upstreams = await Upstreams(tmp).start()
        targets = proxy_targets(upstreams)
        options = {"ws_encode_report": str(report), "ws_encode_policy": "observe", "ws_encode_stall": f"{p.stall:g}"}
        with_ = Mitmdump("proxy", targets, True, options, addon)
        procs = {"with": with_, "without": with_, EMPTY: with_}
        # Goal 1's row with mitmdump's default output, in a mitmdump of its own.
        loud = Mitmdump("default output", {"h1": targets["h1"]}, True,
                        {**options, "ws_encode_report": str(Path(tmp) / "loud.jsonl")}, addon, quiet=False)
        # Fresh ones for goal 5's resident memory, started now (they idle until then).
        fresh = {kind: rss_mitmdump(kind, upstreams, {**options, "ws_encode_report": str(Path(tmp) / f"{kind}.jsonl")}, addon)
                 for kind in rss_kinds}
        try:
            # tracemalloc runs in a process of its own while the proxies start, and
            # is over before anything is timed.
            memory = asyncio.ensure_future(in_test_context(
                addon, "memory", "--tracked", str(p.mem_tracked), "--cycled", str(p.mem_cycled)))
            await asyncio.gather(with_.start(), loud.start(), *(m.start() for m in fresh.values()))
            progress.step("goal 5: tracemalloc, bytes per tracked handshake")
            mem = await memory
            progress.step("goal 1: the addon's hooks alone, in mitmproxy's test context")
            hooks = await in_test_context(addon, "hooktime", "--handshakes", str(p.handshakes))
            progress.step("warming up, without and with the addon (code paths, TLS certificates)")
            for loaded in (False, True):
                await loud.use_addon(loaded)
                await h1_ws_echo(loud.ports["h1"], 5, 1)()
                await with_.use_addon(loaded)
                await h1_ws_echo(with_.ports["h1"], 5, 1)()
                await h1_ws_echo(with_.ports["h1_tls"], 2, 1, tls=True)()
                await h1_requests(with_.ports["h1"], 10, 2)()
                await h1_event_streams(with_.ports["h1"], 10, 2)()
                await h2_requests(with_.ports["h2"], 10, 2)()
            for kind in MUX_CLIENTS:
                await mux_handshakes(kind, with_.ports[kind], 5, 1)()
            baseline = (await with_.query("sizes"))["sizes"]

            # Goal 1
            ones = await goal_one(with_, loud, p, progress)
            figures += ones
            figures.append(hooks_figure(hooks, ones[0].detail["without"]))
            await loud.stop()

            # Goal 2
            for size, n in ((1024, p.tp_small), (65536, p.tp_large)):
                for direction in ("up", "down"):
                    runs = await alternate(
                        procs, {k: h1_throughput(procs[k].ports["h1"], direction, size, n) for k in procs},
                        p.tp_pairs, progress, f"goal 2: {size // 1024} KiB {direction}")
                    rates = {k: [r["count"] / r["wall_s"] / 1e6 for r in runs[k]] for k in runs}
                    cpu = {k: median([r["cpu_s"] / r["count"] * 1e9 for r in runs[k]]) for k in runs}
                    ratios = [ratio(a, b) for a, b in zip(rates["with"], rates["without"])]
                    floor = [ratio(a, b) for a, b in zip(rates[EMPTY], rates["without"])]
                    arrow = "client→server" if direction == "up" else "server→client"
                    figures.append(Figure(
                        2, f"g2_{size // 1024}k_{direction}_throughput_ratio",
                        f"{size // 1024} KiB messages {arrow}: throughput with ÷ without", median(ratios), "x", ">=", 0.99,
                        f"median of {len(ratios)} pairs x {n} messages; {median(rates['with']):.1f} vs "
                        f"{median(rates['without']):.1f} MB/s; CPU per byte with ÷ without "
                        f"{ratio(cpu['with'], cpu['without']):.3f}; a script with no hooks ÷ without: "
                        f"{median(floor):.3f}x",
                        {"ratios": ratios, "empty_script_ratios": floor, "mb_per_s_with": rates["with"], "mb_per_s_without": rates["without"],
                         "cpu_ns_per_byte_with": cpu["with"], "cpu_ns_per_byte_without": cpu["without"],
                         "with": runs["with"], "without": runs["without"], "empty_script": runs[EMPTY]}))

            # Goal 3 (all with the addon), and from here on the addon stays loaded.
            await with_.use_addon(True)
            c = p.concurrency
            same = {"h2": with_, "h3": with_, "h1_tls": with_, "h1_plain": with_}
            hs = await alternate(same, {"h2": mux_handshakes("h2", with_.ports["h2"], p.g3_handshakes, c),
                                        "h3": mux_handshakes("h3", with_.ports["h3"], p.g3_handshakes, c),
                                        "h1_tls": h1_ws_echo(with_.ports["h1_tls"], p.g3_handshakes, c, tls=True, echo=False),
                                        "h1_plain": h1_ws_echo(with_.ports["h1"], p.g3_handshakes, c, echo=False)},
                                 p.g3_pairs, progress, "goal 3: handshakes")
            ec = await alternate(same, {"h2": mux_echoes("h2", with_.ports["h2"], p.g3_echoes),
                                        "h3": mux_echoes("h3", with_.ports["h3"], p.g3_echoes),
                                        "h1_tls": h1_echoes(with_.ports["h1_tls"], p.g3_echoes, True),
                                        "h1_plain": h1_echoes(with_.ports["h1"], p.g3_echoes, False)},
                                 p.g3_pairs, progress, "goal 3: echoes")
            through_with = 4 * p.g3_pairs * p.g3_handshakes + 4 * p.g3_pairs
            for key, runs, what, target in (("handshake", hs, "handshakes", 1.5), ("echo", ec, "echoes", 0.8)):
                figures.append(transports_figure(f"g3_h2_vs_h1_{key}_ratio", what, "h2", "h1_tls", target, runs))
            for key, runs, what in (("handshake", hs, "handshakes"), ("echo", ec, "echoes")):
                figures.append(transports_figure(f"g3_h3_vs_h2_{key}_ratio", what, "h3", "h2", 0.8, runs))

            # Goal 5 (structures after all those handshakes), before goal 4 makes stalls
            progress.step("goal 5: the addon's structures after the handshakes")
            figures.append(await structures_figure(
                with_, baseline, "g5_structures_left_after_run", "the run's handshakes", False,
                f"after {through_with} WebSocket handshakes (HTTP/1.1, HTTP/2 and HTTP/3) through the addon "
                f"since it was last loaded"))

            # Goal 4
            for transport in TRANSPORT_NAMES:
                lateness = await hold(with_, report, transport, p, progress)
                figures += [once_figure(lateness), lateness]
            progress.step("goal 4: waiting for the held handshakes to end")
            figures.append(await structures_figure(
                with_, baseline, "g5_structures_left_after_stalls", "the held handshakes", True,
                f"after {2 * p.held + p.held_h3} stalled handshakes ended"))
            await with_.stop()

            # Goal 5: resident memory, each in a process that did nothing else.
            rss = {}
            for kind in fresh:
                rss[kind] = await rss_per_websocket(kind, fresh[kind], p.rss_websockets, progress)
        finally:
            await asyncio.gather(with_.stop(), loud.stop(), *(m.stop() for m in fresh.values()))
            await upstreams.stop()
        kib = {k: v["bytes_per_websocket"] / 1024 for k, v in rss.items()}
        for kind in MUX_CLIENTS:
            figures.append(Figure(
                5, f"g5_rss_{kind}_vs_h1", f"resident memory per open WebSocket, {TRANSPORT_NAMES[kind]} ÷ HTTP/1.1 (TLS)",
                ratio(kib[kind], kib["h1-tls"]), "x", "<=", 1.0,
                f"{p.rss_websockets} open in a fresh mitmdump each: {TRANSPORT_NAMES[kind]} {kib[kind]:.1f} KiB each "
                f"({rss[kind]['connections']} connections), HTTP/1.1 TLS {kib['h1-tls']:.1f} KiB each"
                + (f", plain ws:// {kib['h1-plain']:.1f} KiB each" if "h1-plain" in kib else ""),
                {"rss": {k: rss[k] for k in (kind, "h1-tls")}, "kib_per_websocket": kib}))

        for m in mem:
            name = TRANSPORT_NAMES[m["transport"]]
            left = left_over(m["sizes_after_cycled"], m["sizes_before"], False)
            figures.append(Figure(
                5, f"g5_{m['transport']}_bytes_per_tracked_handshake", f"{name}: the addon's bytes per tracked handshake",
                m["bytes_per_tracked_handshake"], "B", "<=", 2048,
                f"tracemalloc, {m['tracked']} waiting at once; after they end and {m['cycled']} more: "
                f"{m['bytes_left_after_cycled'] / 1024:.0f} KiB left, structures {left or 'empty'}", m))
            figures.append(Figure(
                5, f"g5_{m['transport']}_structures_left_after_cycled",
                f"{name}: entries left in the addon's structures after {m['cycled']} more", sum(left.values()), "",
                "==", 0, f"the same test context, after the {m['tracked']} tracked at once and {m['cycled']} more "
                f"ended: {left or 'all back to empty'}", {"left": left}))
    progress.finish()
    finished = datetime.datetime.now(datetime.timezone.utc)
    return {
        "meta": {
            "command": "scripts/bench" + (" --quick" if quick else ""),
            "quick": quick, "params": asdict(p),
            "started": started.isoformat(timespec="seconds"), "finished": finished.isoformat(timespec="seconds"),
            "load_average_start": load_start, "load_average_end": load_average(), "cpus": os.cpu_count(),
            "mitmproxy": mitmproxy.version.VERSION, "python": platform.python_version(),
            "addon": str(addon),
        },
        "figures": [{**asdict(f), "met": f.met} for f in figures],
    }


def fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "x":
        return f"{value:.3f}x"
    if unit == "ms":
        return f"{value:.0f} ms"
    if unit == "B":
        return f"{value:.0f} B"
    return f"{value:g}"


def table(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"{meta['command']}: mitmproxy {meta['mitmproxy']}, Python {meta['python']}, {meta['cpus']} CPUs, "
        f"{meta['started'].replace('T', ' ')} to {meta['finished'][11:]} UTC, "
        f"load average {meta['load_average_start']:.1f} at start, {meta['load_average_end']:.1f} at end",
        "",
        f"{'goal':<4}  {'figure (and, below it, what was measured)':<70} {'value':>9} {'target':>9}  met",
    ]
    for f in sorted(result["figures"], key=lambda f: f["goal"]):
        target = f"{f['op'].replace('<=', '≤').replace('>=', '≥').replace('==', '=')}{fmt(f['target'], f['unit'])}"
        met = {True: "yes", False: "NO", None: "?"}[f["met"]]
        lines.append(f"{f['goal']:<4}  {f['title']:<70} {fmt(f['value'], f['unit']):>9} {target:>9}  {met}")
        lines += textwrap.wrap(f["measured"], 96, initial_indent=" " * 6, subsequent_indent=" " * 8)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run with small counts (what CI runs)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures, with what each measured, as JSON")
    parser.add_argument("--addon", metavar="PATH", default=str(ADDON), help="the addon script to measure (default: %(default)s)")
    parser.add_argument("--readme", metavar="FILE", help="also put the table into FILE (docs/cost.md) between its "
                        "bench markers (a full run only)")
    args = parser.parse_args()
    result = asyncio.run(run(QUICK if args.quick else FULL, args.quick, Path(args.addon).resolve()))
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.readme and not args.quick:
        update_readme(Path(args.readme), table(result))


README_BEGIN = "<!-- scripts/bench: the table below is written by `scripts/bench --readme docs/cost.md` -->"
README_END = "<!-- scripts/bench: end of the table -->"


def update_readme(path: Path, text: str) -> None:
    """Replace what lies between the two markers with `text` in a code block."""
    readme = path.read_text(encoding="utf-8")
    start, end = readme.find(README_BEGIN), readme.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{path} has no bench markers; the table is above")
    block = f"{README_BEGIN}\n\n```text\n{text}\n```\n\n"
    path.write_text(readme[:start] + block + readme[end:], encoding="utf-8")


if __name__ == "__main__":
    main()
