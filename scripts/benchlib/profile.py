"""Where mitmdump's time goes under one of the benchmark's loads, with the
addon and without it, by py-spy (200 Hz).

    python3 -m venv /tmp/pyspy && /tmp/pyspy/bin/pip install py-spy    # not a project dependency
    PATH=/tmp/pyspy/bin:$PATH PYTHONPATH=scripts .venv-mitmproxy12/bin/python -m benchlib.profile \
        h1-handshakes --rounds 6 --out /tmp/prof

Loads: h1-handshakes (HTTP/1.1 handshake + echo + close, as goal 1),
h1-tls-handshakes (the same over TLS, wss://), h1-event-streams, h1-requests, h2-requests,
h2-echoes (one HTTP/2 WebSocket, one message at a time), h2-handshakes,
h3-echoes and h3-handshakes (the same over HTTP/3), h1-echoes, h1-64k-up
(goal 2's 64 KiB messages, client→server), h1-tls-echoes, and the held
handshakes of goal 4 (h1-hold, h2-hold, h3-hold: with the addon only).

As `scripts/bench` measures goal 1, one mitmdump (report on, policy
observe, mitmdump's default output with `--default-output`) runs the load
in rounds, each a batch with the addon and one without it (the addon
unloaded and loaded again between them, the order reversed every other
round), py-spy recording each batch. It writes py-spy's collapsed stacks to
OUT/LOAD.txt (with) and OUT/LOAD-without.txt, and prints:

- samples per operation with and without the addon; of the samples with it,
  the addon's own share and mitmproxy's on its behalf (what is left of the
  difference per operation: dispatching the addon's hooks, the log lines it
  writes going through mitmproxy's handlers, ...), and mitmproxy's functions
  whose samples per operation grew the most;
- the addon's own share: samples whose innermost addon frame (addon/...) did not
  hand over to mitmproxy's proxy layers (`super()` calls from the HTTP/2
  bridge into mitmproxy's codecs are mitmproxy's work, not the addon's);
  what the addon calls (logging, json, mitmproxy's Headers, ...) counts as
  the addon's;
- protocol work the HTTP/2 bridge does in mitmproxy's place (h2/hpack
  encoding, building the flow's request), which any HTTP/2 request costs;
- the addon's functions and lines by its own share;
- the rest by module (mitmproxy's layers, TLS, asyncio, ...).

py-spy counts a thread that waits for a CPU as busy: on a loaded machine the
samples per operation are wall time the process wanted, and only their
shares and differences are read.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import re
import signal
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchlib.__main__ import (
    FULL, Progress, abba, batch, h1_echoes, h1_event_streams, h1_requests, h1_throughput, h1_ws_echo, h2_requests,
    hold, mux_echoes, mux_handshakes, proxy_targets, settle,
)
from benchlib.procs import Mitmdump, Upstreams, die_with_parent
from mitmdump_proc import ADDON

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?):(?P<line>\d+)\)$")
LAYERS = "/mitmproxy/proxy/"
# Protocol work the HTTP/2 bridge does in mitmproxy's place (encoding HEADERS,
# building the flow's request): what mitmproxy does for any HTTP/2 request.
DELEGATED = ("/h2/", "/hpack/", "/hyperframe/", "/mitmproxy/http.py")


def parse(path: Path) -> list[tuple[list[tuple[str, str, int]], int]]:
    stacks = []
    for raw in path.read_text().splitlines():
        if raw.startswith("#"):
            continue
        frames_text, _, count = raw.rpartition(" ")
        frames = []
        for frame in frames_text.split(";"):
            m = FRAME.match(frame)
            frames.append((m["func"], m["file"], int(m["line"])) if m else (frame, "", 0))
        stacks.append((frames, int(count)))
    return stacks


def is_addon(file: str) -> bool:
    return "/addon/" in file and "site-packages" not in file


def bucket(file: str) -> str:
    if "site-packages/" in file:
        rest = file.split("site-packages/", 1)[1]
        parts = rest.split("/")
        return "/".join(parts[:3]) if parts[0] == "mitmproxy" else parts[0]
    if "/lib/python3" in file:
        return "stdlib:" + file.split("/lib/python3", 1)[1].split("/")[1]
    return file or "(native)"


@dataclass
class Split:
    """A profile's samples: the addon's own, the bridge's protocol work in
    mitmproxy's place, and the rest, with their breakdowns."""

    total: int = 0
    own: int = 0
    delegated: int = 0
    by_hook: collections.Counter = field(default_factory=collections.Counter)
    by_func: collections.Counter = field(default_factory=collections.Counter)
    by_line: collections.Counter = field(default_factory=collections.Counter)
    by_delegate: collections.Counter = field(default_factory=collections.Counter)
    rest: collections.Counter = field(default_factory=collections.Counter)


BRIDGE_FILES = ("bridge/h2.py", "bridge/h1.py", "bridge/stream.py", "bridge/common.py")


def split(stacks) -> Split:
    out = Split()
    for frames, count in stacks:
        out.total += count
        indexes = [i for i, (_, file, _) in enumerate(frames) if is_addon(file)]
        if indexes:
            last = indexes[-1]
            below = frames[last + 1:]
            if below and frames[last][1].endswith(BRIDGE_FILES) and any(lib in below[0][1] for lib in DELEGATED):
                out.delegated += count
                out.by_delegate[f"{frames[last][0]} -> {bucket(below[0][1])}"] += count
                continue
            if not (below and LAYERS in below[0][1]):
                out.own += count
                first = indexes[0]
                out.by_hook[f"{frames[first][0]} ({Path(frames[first][1]).name})"] += count
                for key in {f"{frames[i][0]} ({Path(frames[i][1]).name})" for i in indexes}:
                    out.by_func[key] += count
                func, file, line = frames[last]
                out.by_line[f"{Path(file).name}:{line} {func}"] += count
                continue
        out.rest[bucket(frames[-1][1])] += count
    return out


def summarize(stacks, top: int = 25) -> str:
    s = split(stacks)

    def pct(n: int) -> str:
        return f"{100 * n / s.total:5.1f} %"

    out = [f"{s.total} samples (CPU, not idle); the addon's own: {s.own} = {pct(s.own)}; protocol work the bridge "
           f"does in mitmproxy's place (h2, hpack, building requests): {s.delegated} = {pct(s.delegated)}", "",
           "the addon, by outermost addon frame (the hook or bridge entry point):"]
    out += [f"  {pct(n)}  {k}" for k, n in s.by_hook.most_common(top)]
    out += ["", "the addon, by function (inclusive of what it calls outside mitmproxy's layers):"]
    out += [f"  {pct(n)}  {k}" for k, n in s.by_func.most_common(top)]
    out += ["", "the addon, by innermost addon line:"]
    out += [f"  {pct(n)}  {k}" for k, n in s.by_line.most_common(top)]
    out += ["", "protocol work done by the bridge in mitmproxy's place:"]
    out += [f"  {pct(n)}  {k}" for k, n in s.by_delegate.most_common(8)]
    out += ["", "everything else, by the module of the innermost frame:"]
    out += [f"  {pct(n)}  {k}" for k, n in s.rest.most_common(top)]
    return "\n".join(out)


def inclusive(stacks) -> collections.Counter:
    """Samples by function, each counted once per stack it is on."""
    counts: collections.Counter = collections.Counter()
    for frames, count in stacks:
        for key in {(func, file) for func, file, _ in frames}:
            counts[key] += count
    return counts


def compare(with_: list, with_batches: list[tuple[int, float]], without: list,
            without_batches: list[tuple[int, float]], top: int = 15) -> str:
    """mitmdump's CPU per operation with and without the addon, and what the
    difference is made of: the addon's own code (its share of the samples),
    and mitmproxy's work on its behalf (the rest of the difference), with
    mitmproxy's functions whose share grew the most."""
    each = {side: sum(cpu for _, cpu in b) / sum(n for n, _ in b)
            for side, b in (("with", with_batches), ("without", without_batches))}
    # Each round's pair, as the bench reads its batches (the machine's load moves them a lot).
    pairs = sorted((a / n) / (b / m) for (n, a), (m, b) in zip(with_batches, without_batches))
    s = split(with_)
    own = s.own / s.total
    on_behalf = 1 - each["without"] / each["with"] - own
    before, after = inclusive(without), inclusive(with_)
    before_total = sum(c for _, c in without)
    # A function's share of the CPU per operation with the addon, less its share without it scaled to that CPU.
    grew = {key: after[key] / s.total - before[key] / before_total * each["without"] / each["with"]
            for key in after.keys() | before.keys() if not is_addon(key[1])}
    out = [f"mitmdump's CPU per operation: {1000 * each['with']:.3f} ms with the addon, {1000 * each['without']:.3f} ms "
           f"without ({each['with'] / each['without']:.3f}x; batch pairs {', '.join(f'{r:.2f}' for r in pairs)})",
           f"of it with the addon: its own code {100 * own:.1f} % (of the samples), mitmproxy's work on its behalf "
           f"(the rest of the difference) {100 * on_behalf:.1f} %",
           "", "mitmproxy's functions (inclusive) whose share grew the most, in % of the CPU per operation with the addon:"]
    for (func, file), more in sorted(grew.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * more:+5.1f} %  {func} ({'/'.join(Path(file).parts[-2:])})")
    return "\n".join(out)


LOADS = {
    "h1-handshakes": lambda m: h1_ws_echo(m.ports["h1"], 200, 8),
    "h1-requests": lambda m: h1_requests(m.ports["h1"], 500, 8),
    "h1-event-streams": lambda m: h1_event_streams(m.ports["h1"], 500, 8),  # to the first event, as goal 1
    "h2-requests": lambda m: h2_requests(m.ports["h2"], 500, 8),
    "h2-echoes": lambda m: mux_echoes("h2", m.ports["h2"], 1000),
    "h2-handshakes": lambda m: mux_handshakes("h2", m.ports["h2"], 200, 8),
    "h3-echoes": lambda m: mux_echoes("h3", m.ports["h3"], 1000),
    "h3-handshakes": lambda m: mux_handshakes("h3", m.ports["h3"], 200, 8),
    "h1-echoes": lambda m: h1_echoes(m.ports["h1"], 1000, False),
    "h1-64k-up": lambda m: h1_throughput(m.ports["h1"], "up", 65536, 1500),  # goal 2's 64 KiB client→server
    "h1-tls-echoes": lambda m: h1_echoes(m.ports["h1_tls"], 1000, True),
    "h1-tls-handshakes": lambda m: h1_ws_echo(m.ports["h1_tls"], 100, 8, tls=True),  # wss://, as goal 1
    # goal 4: FULL.held (HTTP/3: FULL.held_h3) handshakes held by a stalling upstream, opened over FULL.ramp_s
    "h1-hold": lambda m: held(m, "h1"),
    "h2-hold": lambda m: held(m, "h2"),
    "h3-hold": lambda m: held(m, "h3"),
}


def held(m: Mitmdump, transport: str):
    async def run() -> int:
        figure = await hold(m, m.report, transport, FULL, Progress(0))
        print(f"{transport} held: {figure.measured}", file=sys.stderr)
        return FULL.held_h3 if transport == "h3" else FULL.held

    return run


async def profile(load: str, rounds: int, out: Path, addon: Path, quiet: bool) -> tuple[Path, Path | None]:
    """Record `load` in `rounds` rounds (with the addon and without it, ABBA)
    in one mitmdump: the collapsed stacks of each side in one file, each
    batch's after a comment line with its number of operations and the CPU
    seconds mitmdump spent on them."""
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not pyspy:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    held_load = load.endswith("-hold")
    with tempfile.TemporaryDirectory() as tmp:
        upstreams = await Upstreams(tmp).start()
        options = {"ws_encode_report": f"{tmp}/report.jsonl", "ws_encode_policy": "observe"}
        proc = Mitmdump("profiled", proxy_targets(upstreams), True, options, addon, quiet=quiet)
        proc.report = Path(options["ws_encode_report"])
        stacks: dict[str, list[str]] = {"with": [], "without": []}
        try:
            await proc.start()
            work = LOADS[load](proc)
            for loaded in (False, True):  # warm up: code paths, TLS certificates
                await proc.use_addon(loaded)
                await (h1_ws_echo(proc.ports["h1"], 5, 1) if held_load else work)()
            for _, order in abba(["with"] if held_load else ["with", "without"], rounds):
                for side in order:
                    await proc.use_addon(side == "with")
                    await settle(proc)
                    raw = Path(tmp) / f"{side}-{len(stacks[side])}.txt"
                    async with recording(pyspy, proc.pid, raw):
                        done = await batch(proc, work)
                    stacks[side].append(f"# {done['count']} operations {done['cpu_s']:.6f} cpu_s\n" + raw.read_text())
        finally:
            await proc.stop()
            await upstreams.stop()
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for side, texts in stacks.items():
        if texts:
            written[side] = out / f"{load}{'' if side == 'with' else '-without'}.txt"
            written[side].write_text("".join(texts))
    return written["with"], written.get("without")


@contextlib.asynccontextmanager
async def recording(pyspy: str, pid: int, raw: Path):
    """py-spy sampling `pid` into `raw` while the body runs: started once it
    says it samples, stopped as Ctrl-C stops it (it writes the file then)."""
    spy = await asyncio.create_subprocess_exec(
        pyspy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--full-filenames",
        "--output", str(raw), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    try:
        async for line in spy.stdout:
            if b"Sampling process" in line:
                break
        else:
            raise SystemExit("py-spy did not start sampling (is ptrace allowed here?)")
        yield
    finally:
        if spy.returncode is None:
            spy.send_signal(signal.SIGINT)
        await spy.communicate()


def batches(path: Path) -> list[tuple[int, float]]:
    """(operations, CPU seconds) of each batch a profile file holds."""
    return [(int(line.split()[1]), float(line.split()[3]))
            for line in path.read_text().splitlines() if line.startswith("# ")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("load", choices=sorted(LOADS))
    parser.add_argument("--rounds", type=int, default=6, help="batches with the addon, and as many without it")
    parser.add_argument("--out", type=Path, default=Path("profiles"))
    parser.add_argument("--addon", type=Path, default=ADDON)
    parser.add_argument("--default-output", action="store_true",
                        help="mitmdump's default output (a line per flow, the log at INFO) instead of warnings only")
    parser.add_argument("--summarize", action="store_true", help="only read the files an earlier run wrote to OUT")
    args = parser.parse_args()
    if args.summarize:
        with_, without = args.out / f"{args.load}.txt", args.out / f"{args.load}-without.txt"
        without = without if without.exists() else None
    else:
        with_, without = asyncio.run(profile(args.load, args.rounds, args.out, args.addon.resolve(),
                                             not args.default_output))
    print(summarize(parse(with_)))
    if without is not None:
        print()
        print(compare(parse(with_), batches(with_), parse(without), batches(without)))


if __name__ == "__main__":
    main()
