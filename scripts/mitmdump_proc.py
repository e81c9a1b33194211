"""Start a mitmdump reverse proxy on 127.0.0.1 for the scripts here, and learn its port."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from pathlib import Path

ADDON = Path(__file__).resolve().parent.parent / "addon" / "ws_encode.py"
LOOPBACK_ONLY = Path(__file__).resolve().parent / "loopback_only.py"
MITMDUMP = Path(sys.executable).with_name("mitmdump")
LISTENING = re.compile(rb"listening at [^\s]*:(\d+)")


async def start_reverse_proxy(upstream: str, *options: str) -> tuple[asyncio.subprocess.Process, int]:
    """mitmdump in front of `upstream` with `options` (e.g. "-s", ADDON), on
    an ephemeral port; its log stays readable on `proc.stdout`."""
    proc = await asyncio.create_subprocess_exec(
        str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", "0", "--mode", f"reverse:{upstream}",
        "--ssl-insecure", "--set", "flow_detail=0", "-s", str(LOOPBACK_ONLY), *options,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    async for line in proc.stdout:
        if m := LISTENING.search(line):
            return proc, int(m.group(1))
    raise SystemExit("mitmdump did not start")


def free_ports(count: int) -> list[int]:
    """Ports on 127.0.0.1 that nothing listens on (bound together, then
    released), for a mitmdump with several modes: mitmproxy refuses two
    servers on 127.0.0.1:0, and proxies here bind to 127.0.0.1 only. Since
    another process may take one meanwhile, callers start again with others
    when mitmdump does not come up; a single-mode mitmdump takes port 0
    instead (`start_reverse_proxy`, `LISTENING`)."""
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    try:
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def signal_if_running(proc: asyncio.subprocess.Process, signum: int) -> None:
    """Send `signum` to `proc`, which the caller started (so by its own pid),
    unless it has exited: asyncio raises ProcessLookupError for a process
    whose exit it has seen, so that is checked here, with no await between
    the check and the signal."""
    if proc.returncode is None:
        proc.send_signal(signum)


async def stop_process(proc: asyncio.subprocess.Process, timeout: float = 10) -> int:
    """SIGTERM `proc`, SIGKILL if it lingers; its exit status. One that has
    exited already, by itself or while the caller awaited, is not an error."""
    signal_if_running(proc, signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        signal_if_running(proc, signal.SIGKILL)
        return await proc.wait()
