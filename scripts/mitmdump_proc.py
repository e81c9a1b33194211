"""The one way the tools and the tests run mitmdump: `Process` starts it and
keeps what it prints line by line, so callers wait on its log lines rather
than on a clock, and stops it by its own pid; `free_ports` finds ports for
one with several modes. What each caller loads into it is its own
(`ADDON`, the `LOOPBACK_ONLY` guard)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import loopback_only
import wsencode

# The addon script the tools and tests load: the one beside the `wsencode` imported here.
ADDON = wsencode.SCRIPT
# Beside this module in a checkout (scripts/) and installed (site-packages) alike.
LOOPBACK_ONLY = Path(__file__).resolve().parent / "loopback_only.py"
MITMDUMP = Path(sys.executable).with_name("mitmdump")
LISTENING = re.compile(r"listening at [^\s]*:(\d+)")  # one line for each of its servers
STARTED = loopback_only.STARTED  # a mitmdump with LOOPBACK_ONLY may be connected to once it says this
EXITED = "<exited>"  # a Process's last line, once its output has ended
# Where Linux picks the port of every outgoing connection and of every server
# given port 0, by default (/proc/sys/net/ipv4/ip_local_port_range says where).
EPHEMERAL = (32768, 60999)
# Ports below this are left to people (8080, 8443...).
LOWEST_CHOSEN = 10000


def free_ports(count: int) -> list[int]:
    """Ports on 127.0.0.1 that nothing listens on (bound together, then
    released), for a mitmdump with several modes: mitmproxy refuses two
    servers on 127.0.0.1:0, and proxies here bind to 127.0.0.1 only. They are
    drawn at random from outside the ephemeral range, which the kernel hands
    out to every outgoing connection and port-0 server (two mitmproxy lines
    side by side make thousands): between the release here and mitmdump's
    bind, only another explicit chooser could take one. Since one still may,
    callers start again with others when mitmdump does not come up; a
    single-mode mitmdump takes port 0 instead and says which (`LISTENING`)."""
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


class Process:
    """A process started here (a mitmdump), stopped by its own pid. What it
    prints is kept as it comes, a line at a time (`lines`, then EXITED), so
    that callers wait for what it says, not for a while."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None

    async def spawn(self, *argv: str | os.PathLike, cwd: str | os.PathLike | None = None,
                    env: dict[str, str] | None = None, preexec_fn: Callable[[], None] | None = None) -> None:
        """Start `argv`, its output (stdout and stderr) read into `lines`
        (`preexec_fn` runs in the child before it starts)."""
        self.adopt(await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=env, preexec_fn=preexec_fn,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        ))

    def adopt(self, proc: asyncio.subprocess.Process) -> None:
        """Keep `proc`, started another way (the tests' fork server: as much of
        asyncio's Process as is used here), as if spawned: its `stdout` (stderr
        with it) read into `lines`, stopped by its pid."""
        self.lines = []
        self._proc = proc
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._proc and self._proc.stdout
        async for raw in self._proc.stdout:
            async with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self.lines.append(EXITED)
            self._changed.notify_all()

    @property
    def exited(self) -> bool:
        """Its output has ended: it has exited, or is exiting."""
        return self.lines[-1:] == [EXITED]

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    async def until(self, predicate: Callable[[], object], timeout: float) -> bool:
        """Wait, at most `timeout` seconds, until `predicate()` holds (tried
        at each line) or the output ends; whether it holds."""
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: predicate() or self.exited), timeout)
        return bool(predicate())

    async def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM it, SIGKILL if it lingers, and read its output to the end;
        its exit status (None if it was never started)."""
        if self._proc is None:
            return None
        await stop_process(self._proc, timeout)  # it may have exited meanwhile
        if self._reader:
            await self._reader
        return self._proc.returncode
