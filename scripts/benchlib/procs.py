"""mitmdump processes for the benchmark, and what /proc says about them."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from lifeline import die_with_parent
from mitmdump_proc import ADDON, LOOPBACK_ONLY, MITMDUMP, Process, free_ports
from wspeers import h3ws

PROBE = Path(__file__).resolve().parent / "probe.py"
# A script with one addon and no hooks: what any script costs mitmproxy.
EMPTY_SCRIPT = Path(__file__).resolve().parent / "empty_script.py"
QUIET = ("--set", "flow_detail=0", "--set", "termlog_verbosity=warn")


def cpu_seconds(pid: int) -> float:
    """The CPU time the process's threads have had, in nanoseconds' precision
    (/proc/<pid>/task/*/schedstat): /proc/<pid>/stat counts in clock ticks
    (10 ms), a percent of a one-second batch. A mitmdump here runs one thread
    (the event loop; none is started and ended meanwhile)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return total / 1e9


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Mitmdump(Process):
    """One mitmdump in reverse mode, one listening port per upstream, on 127.0.0.1
    (UDP for an `http3://` upstream, TCP for the others).

    Quiet, it shows only warnings and errors (termlog_verbosity=warn,
    flow_detail=0), as a proxy left running in front of traffic; with
    `quiet=False` it has mitmdump's default output (a line per flow and the
    log at INFO), what a person running `mitmdump -s` pays for. Its output
    goes to a pipe this process reads, never to a terminal. Always loads
    scripts/loopback_only.py, and the probe (benchlib/probe.py).
    """

    def __init__(self, name: str, upstreams: dict[str, str], addon: bool, options: dict[str, str] | None = None,
                 addon_path: Path = ADDON, quiet: bool = True):
        super().__init__()
        self.name = name
        self.addon_path = addon_path
        self.upstreams = upstreams
        self.addon = addon
        self.options = options or {}
        self.quiet = quiet
        self.ports: dict[str, int] = {}
        self.probe_port = 0

    @property
    def pid(self) -> int:
        assert self._proc
        return self._proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    async def start(self) -> Mitmdump:
        for _attempt in range(3):
            *ports, self.probe_port = free_ports(len(self.upstreams) + 1)
            self.ports = dict(zip(self.upstreams, ports))
            cmd = [str(MITMDUMP), "--listen-host", "127.0.0.1", "--ssl-insecure",
                   *(QUIET if self.quiet else ()), "-s", str(LOOPBACK_ONLY), "-s", str(PROBE), "--set", f"bench_probe_port={self.probe_port}"]
            for key, url in self.upstreams.items():
                cmd += ["--mode", f"reverse:{url}@127.0.0.1:{self.ports[key]}"]
            if self.addon:
                cmd += ["-s", str(self.addon_path)]
                for name, value in self.options.items():
                    cmd += ["--set", f"{name}={value}"]
            await self.spawn(*cmd, preexec_fn=die_with_parent)
            if await self._ready():
                return self
            await self.stop()
        raise SystemExit(f"mitmdump ({self.name}) did not start:\n" + "\n".join(self.lines[-50:]))

    async def _ready(self, timeout: float = 60) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiting = [(port, self.upstreams[key].startswith("http3://")) for key, port in self.ports.items()]
        waiting.append((self.probe_port, False))
        while waiting and loop.time() < deadline:
            if self.exited:
                return False
            if await answers(*waiting[0]):
                waiting.pop(0)
            else:
                await asyncio.sleep(0.05)
        return not waiting

    async def query(self, command: str) -> dict:
        """Ask the probe inside mitmdump (see probe.py)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.probe_port)
        writer.write(command.encode() + b"\n")
        answer = await asyncio.wait_for(reader.readline(), 60)
        writer.close()
        return json.loads(answer)

    async def use(self, script: Path | None) -> None:
        """Of the addon and EMPTY_SCRIPT, have `script` loaded (None: neither)
        in this running mitmdump (started with the addon)."""
        for path in (self.addon_path, EMPTY_SCRIPT):
            if path != script:
                await self._script(path, False)
        if script is not None:
            await self._script(script, True)

    async def use_addon(self, loaded: bool) -> None:
        await self.use(self.addon_path if loaded else None)

    async def _script(self, path: Path, load: bool) -> None:
        answer = await self.query(f"{'load' if load else 'unload'} {path}")
        if answer.get("loaded") is not load:
            raise SystemExit(f"mitmdump ({self.name}) did not {'load' if load else 'unload'} {path}: {answer}")


async def answers(port: int, quic: bool) -> bool:
    """Whether something listens on 127.0.0.1:`port`: it takes a TCP
    connection, or (an HTTP/3 mode listens on UDP) an HTTP/3 client's."""
    if not quic:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        return True
    client = h3ws.H3WebSocketClient("127.0.0.1", port, server_hostname="localhost")
    try:
        await client.connect(1)
        return True
    except (OSError, ConnectionError, asyncio.TimeoutError):
        return False
    finally:
        await client.close(1)


class Upstreams:
    """benchlib.upstream in a child process; it ends when its stdin closes."""

    def __init__(self, certdir: str) -> None:
        self.certdir = certdir
        self.proc: asyncio.subprocess.Process | None = None
        self.ports: dict[str, int] = {}

    async def start(self) -> Upstreams:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchlib.upstream", self.certdir,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, preexec_fn=die_with_parent,
        )
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        if not line:
            raise SystemExit("the upstream servers did not start")
        self.ports = json.loads(line)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
