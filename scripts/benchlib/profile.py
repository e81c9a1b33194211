"""Where mitmdump's time goes under one of the benchmark's loads, by py-spy (200 Hz).

    .venv-mitmproxy12/bin/pip install py-spy        # not a project dependency
    PYTHONPATH=scripts .venv-mitmproxy12/bin/python -m benchlib.profile h1-handshakes --seconds 20 --out /tmp/prof

Loads: h1-handshakes (HTTP/1.1 handshake + echo + close, as goal 1),
h1-requests, h2-requests, h2-echoes (one HTTP/2 WebSocket, one message at a
time), h2-handshakes, h1-echoes, h1-64k-up (goal 2's 64 KiB messages, client→server), and over TLS (wss://, as goal 3 compares)
h1-tls-echoes, h1-tls-handshakes. The mitmdump runs the addon as `scripts/bench` does
(report on, policy observe; `--without` for none). Writes py-spy's collapsed
stacks to OUT/LOAD.txt and prints:

- the addon's share: samples whose innermost addon frame (addon/...) did not
  hand over to mitmproxy's proxy layers (`super()` calls from the HTTP/2
  bridge into mitmproxy's codecs are mitmproxy's work, not the addon's);
  what the addon calls (logging, json, mitmproxy's Headers, ...) counts as
  the addon's;
- protocol work the HTTP/2 bridge does in mitmproxy's place (h2/hpack
  encoding, building the flow's request), which any HTTP/2 request costs;
- the addon's functions and lines by its own share;
- the rest by module (mitmproxy's layers, TLS, asyncio, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchlib.__main__ import (
    FULL, Progress, h1_echoes, h1_requests, h1_throughput, h1_ws_echo, h2_echoes, h2_handshakes, h2_requests, hold,
    settle,
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


def summarize(stacks, top: int = 25) -> str:
    total = sum(c for _, c in stacks)
    own = delegated = 0
    by_delegate: collections.Counter = collections.Counter()
    by_func: collections.Counter = collections.Counter()
    by_line: collections.Counter = collections.Counter()
    by_hook: collections.Counter = collections.Counter()
    rest: collections.Counter = collections.Counter()
    for frames, count in stacks:
        indexes = [i for i, (_, file, _) in enumerate(frames) if is_addon(file)]
        if indexes:
            last = indexes[-1]
            below = frames[last + 1:]
            if below and frames[last][1].endswith(("bridge/h2.py", "bridge/h1.py", "bridge/stream.py", "bridge/common.py")) and any(lib in below[0][1] for lib in DELEGATED):
                delegated += count
                by_delegate[f"{frames[last][0]} -> {bucket(below[0][1])}"] += count
                continue
            if not (below and LAYERS in below[0][1]):
                own += count
                first = indexes[0]
                by_hook[f"{frames[first][0]} ({Path(frames[first][1]).name})"] += count
                seen = set()
                for i in indexes:
                    func, file, line = frames[i]
                    key = f"{func} ({Path(file).name})"
                    if key not in seen:
                        by_func[key] += count
                        seen.add(key)
                func, file, line = frames[last]
                by_line[f"{Path(file).name}:{line} {func}"] += count
                continue
        leaf = frames[-1]
        rest[bucket(leaf[1])] += count

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f} %"

    out = [f"{total} samples (CPU, not idle); the addon's own: {own} = {pct(own)}; protocol work the bridge "
           f"does in mitmproxy's place (h2, hpack, building requests): {delegated} = {pct(delegated)}", "",
           "the addon, by outermost addon frame (the hook or bridge entry point):"]
    out += [f"  {pct(n)}  {k}" for k, n in by_hook.most_common(top)]
    out += ["", "the addon, by function (inclusive of what it calls outside mitmproxy's layers):"]
    out += [f"  {pct(n)}  {k}" for k, n in by_func.most_common(top)]
    out += ["", "the addon, by innermost addon line:"]
    out += [f"  {pct(n)}  {k}" for k, n in by_line.most_common(top)]
    out += ["", "protocol work done by the bridge in mitmproxy's place:"]
    out += [f"  {pct(n)}  {k}" for k, n in by_delegate.most_common(8)]
    out += ["", "everything else, by the module of the innermost frame:"]
    out += [f"  {pct(n)}  {k}" for k, n in rest.most_common(top)]
    return "\n".join(out)


LOADS = {
    "h1-handshakes": lambda m: h1_ws_echo(m.ports["h1"], 200, 8),
    "h1-requests": lambda m: h1_requests(m.ports["h1"], 500, 8),
    "h2-requests": lambda m: h2_requests(m.ports["h2"], 500, 8),
    "h2-echoes": lambda m: h2_echoes(m.ports["h2"], 1000),
    "h2-handshakes": lambda m: h2_handshakes(m.ports["h2"], 200, 8),
    "h1-echoes": lambda m: h1_echoes(m.ports["h1"], 1000, False),
    "h1-64k-up": lambda m: h1_throughput(m.ports["h1"], "up", 65536, 1500),  # goal 2's 64 KiB client→server
    "h1-tls-echoes": lambda m: h1_echoes(m.ports["h1_tls"], 1000, True),
    "h1-tls-handshakes": lambda m: h1_ws_echo(m.ports["h1_tls"], 200, 8, tls=True, echo=False),
    # goal 4: FULL.held handshakes held by a stalling upstream, opened over FULL.ramp_s
    "h1-hold": lambda m: held(m, "h1"),
    "h2-hold": lambda m: held(m, "h2"),
}


def held(m: Mitmdump, transport: str):
    async def run() -> int:
        figure = await hold(m, m.report, transport, FULL, Progress(0))
        print(f"{transport} held: {figure.measured}", file=sys.stderr)
        return FULL.held

    return run


async def profile(load: str, seconds: float, out: Path, addon: Path, with_addon: bool) -> Path:
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not pyspy:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    with tempfile.TemporaryDirectory() as tmp:
        upstreams = await Upstreams(tmp).start()
        targets = {"h1": f"http://127.0.0.1:{upstreams.ports['h1']}", "h2": f"https://127.0.0.1:{upstreams.ports['h2']}",
                   "h1_tls": f"https://127.0.0.1:{upstreams.ports['h1_tls']}",
                   "h2_hold": f"https://127.0.0.1:{upstreams.ports['h2_hold']}"}
        options = {"ws_encode_report": f"{tmp}/report.jsonl", "ws_encode_policy": "observe"}
        proc = Mitmdump("profiled", targets, with_addon, options, addon)
        proc.report = Path(options["ws_encode_report"])
        try:
            await proc.start()
            work = LOADS[load](proc)
            if not load.endswith("-hold"):
                await work()  # warm up
            else:
                await h1_ws_echo(proc.ports["h1"], 5, 1)()
            await settle(proc)
            out.mkdir(parents=True, exist_ok=True)
            raw = out / f"{load}{'' if with_addon else '-without'}.txt"
            spy = await asyncio.create_subprocess_exec(
                pyspy, "record", "--pid", str(proc.pid), "--rate", "200", "--format", "raw",
                "--duration", str(int(seconds)), "--full-filenames", "--output", str(raw),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent,
            )
            done = 0
            started = time.monotonic()
            while spy.returncode is None and time.monotonic() - started < seconds + 30:
                done += await work()
                try:
                    await asyncio.wait_for(spy.wait(), 0.001)
                except asyncio.TimeoutError:
                    pass
            await spy.wait()
            print(f"{load}: {done} operations while sampling", file=sys.stderr)
        finally:
            await proc.stop()
            await upstreams.stop()
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("load", choices=sorted(LOADS))
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--out", type=Path, default=Path("profiles"))
    parser.add_argument("--addon", type=Path, default=ADDON)
    parser.add_argument("--without", action="store_true", help="profile mitmdump without the addon")
    parser.add_argument("--summarize", type=Path, metavar="RAW", help="only summarize an existing collapsed-stack file")
    args = parser.parse_args()
    raw = args.summarize or asyncio.run(profile(args.load, args.seconds, args.out, args.addon.resolve(), not args.without))
    print(summarize(parse(raw)))


if __name__ == "__main__":
    main()
