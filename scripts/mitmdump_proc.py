"""Start a mitmdump reverse proxy on 127.0.0.1 for the scripts here, and learn its port."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import socket
import sys
from pathlib import Path

import wsencode

# The addon script the tools and tests load: the one beside the `wsencode` imported here.
ADDON = wsencode.SCRIPT
# Beside this module in a checkout (scripts/) and installed (site-packages) alike.
LOOPBACK_ONLY = Path(__file__).resolve().parent / "loopback_only.py"
MITMDUMP = Path(sys.executable).with_name("mitmdump")
LISTENING = re.compile(rb"listening at [^\s]*:(\d+)")
# Where Linux picks the port of every outgoing connection and of every server
# given port 0, by default (/proc/sys/net/ipv4/ip_local_port_range says where).
EPHEMERAL = (32768, 60999)
# Ports below this are left to people (8080, 8443...).
LOWEST_CHOSEN = 10000


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
    servers on 127.0.0.1:0, and proxies here bind to 127.0.0.1 only. They are
    drawn at random from outside the ephemeral range, which the kernel hands
    out to every outgoing connection and port-0 server (two mitmproxy lines
    side by side make thousands): between the release here and mitmdump's
    bind, only another explicit chooser could take one. Since one still may,
    callers start again with others when mitmdump does not come up; a
    single-mode mitmdump takes port 0 instead (`start_reverse_proxy`, `LISTENING`)."""
    pool = chosen_range()
    sockets = []
    try:
        for port in random.sample(pool, len(pool)):
            try:
                sockets.append(socket.create_server(("127.0.0.1", port)))
            except OSError:  # in use
                continue
            if len(sockets) == count:
                return [s.getsockname()[1] for s in sockets]
        raise OSError(f"fewer than {count} free ports in {pool}")
    finally:
        for s in sockets:
            s.close()


def chosen_range() -> range:
    """The ports free_ports draws from: the larger stretch outside the
    ephemeral range, from LOWEST_CHOSEN up."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):  # not Linux
        low, high = EPHEMERAL
    return max(range(LOWEST_CHOSEN, low), range(high + 1, 65536), key=len)


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
