"""The lab's server: hypercorn over TLS (HTTP/1.1 and HTTP/2, RFC 8441 on) on 127.0.0.1,
and, if asked, the same application over HTTP/3 (RFC 9220 on; wslab.h3) on UDP."""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import re
import socket
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config
from hypercorn.protocol import h2 as hypercorn_h2
from mitmdump_proc import stop_process

from .app import LabApp, build
from .encoders import MIN_SIZE, RELEASING_HELD_STATUS
from .h3 import H3Side

_hypercorn_flush = hypercorn_h2.H2Protocol._flush


async def _flush_unless_releasing(self) -> None:
    # hypercorn writes HEADERS at once and DATA from another task; a status
    # the encoder held is left in h2's buffer, so the DATA write carries both.
    if not RELEASING_HELD_STATUS.get():
        await _hypercorn_flush(self)


hypercorn_h2.H2Protocol._flush = _flush_unless_releasing


EXCEPTION_GROUP = getattr(builtins, "BaseExceptionGroup", ())  # Python 3.11+


def _hypercorn_stream_keyerror(exc: BaseException) -> bool:
    """Only KeyErrors raised in hypercorn's HTTP/2 protocol, however grouped."""
    if isinstance(exc, EXCEPTION_GROUP):
        return all(_hypercorn_stream_keyerror(e) for e in exc.exceptions)
    tb = exc.__traceback__
    while tb and tb.tb_next:
        tb = tb.tb_next
    return isinstance(exc, KeyError) and tb is not None and tb.tb_frame.f_code.co_filename.endswith(
        os.path.join("hypercorn", "protocol", "h2.py"))


def quiet_hypercorn_stream_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Drop one known hypercorn bug from the loop's error output: it looks up a
    stream it already dropped when a frame for it follows a close or reset
    (a KeyError that ends that one connection). Everything else is reported."""
    previous = loop.get_exception_handler()

    def handler(loop, context):
        exc = context.get("exception")
        if exc is not None and _hypercorn_stream_keyerror(exc):
            return
        if previous:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


class LabServer:
    """The application behind the encoder `behaviour` ("none": no encoder),
    served by hypercorn; `async with` starts and stops it. With `h3`, also over
    HTTP/3 on UDP `h3.port` (the TCP port's number where it is free), which
    every TCP response names in `Alt-Svc: h3=":PORT"` unless `alt_svc` is
    off (then only a client told where finds it)."""

    def __init__(self, behaviour: str, certfile: str, keyfile: str, port: int = 0,
                 min_size: int = MIN_SIZE, quiet: bool = True, log=None, h3: bool = False,
                 alt_svc: bool = True) -> None:
        self.behaviour = behaviour
        self.app, asgi = build(behaviour, min_size, log)
        self.asgi = asgi
        self.config = Config()
        self.config.certfile, self.config.keyfile = certfile, keyfile
        self.config.alpn_protocols = ["h2", "http/1.1"]
        self.config.websocket_ping_interval = None
        self.config.graceful_timeout = 0.5
        self.config.accesslog = None
        if quiet:
            # hypercorn logs a traceback when a peer resets a stream it still
            # writes to: the lab's stalled cells do exactly that.
            self.config.errorlog = logging.getLogger("wslab.hypercorn")
            self.config.errorlog.setLevel(logging.CRITICAL)
        self._socket = socket.create_server(("127.0.0.1", port))
        self._socket.setblocking(False)
        self.port: int = self._socket.getsockname()[1]
        self.config.bind = [f"fd://{os.dup(self._socket.fileno())}"]
        self.h3 = H3Side(asgi, certfile, keyfile, self.port) if h3 else None
        if self.h3 and alt_svc:
            self.config.alt_svc_headers = [self.h3.alt_svc]
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> LabServer:
        if self.h3:
            await self.h3.start()
        self._task = asyncio.create_task(serve(self.asgi, self.config, shutdown_trigger=self._stop.wait))
        await asyncio.sleep(0)
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task:
            try:
                await asyncio.wait_for(self._task, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
        self._socket.close()
        if self.h3:
            await self.h3.stop()

    async def __aenter__(self) -> LabServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


__all__ = ["LabApp", "LabServer"]


class LabProcess:
    """Lab servers in a process of their own (`python -m wslab.lab`), so that
    a busy client loop does not slow their answers; `ports[behaviour]`, and
    with `h3` the UDP port of each one's HTTP/3 side, `h3_ports[behaviour]`."""

    def __init__(self, behaviours: list[str], min_size: int = MIN_SIZE, h3: bool = False) -> None:
        self.behaviours = behaviours
        self.min_size = min_size
        self.h3 = h3
        self.ports: dict[str, int] = {}
        self.h3_ports: dict[str, int] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task | None = None

    def url(self, behaviour: str) -> str:
        return f"https://127.0.0.1:{self.ports[behaviour]}"

    def h3_url(self, behaviour: str) -> str:
        """mitmproxy's reverse-mode URL of a behaviour's HTTP/3 side."""
        return f"http3://127.0.0.1:{self.h3_ports[behaviour]}"

    async def start(self) -> LabProcess:
        self._proc = await asyncio.create_subprocess_exec(
            # `wslab` as this process has it: installed, or on the tests' PYTHONPATH (tests/conftest.py).
            # Without h3, no QUIC side and no Alt-Svc in what a run records.
            sys.executable, "-m", "wslab.lab", "--quiet", *([] if self.h3 else ["--no-h3"]),
            "--port", "0", "--min-size", str(self.min_size),
            *(a for b in self.behaviours for a in ("--behaviour", b)),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        seen = []
        assert self._proc.stdout
        async for raw in self._proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            seen.append(line)
            if m := re.match(r"lab: (\S+) listening on https://127\.0\.0\.1:(\d+)", line):
                self.ports[m.group(1)] = int(m.group(2))
                if udp := re.search(r"HTTP/3 on UDP port (\d+)", line):
                    self.h3_ports[m.group(1)] = int(udp.group(1))
            if line.startswith("lab: ready"):
                self._drain = asyncio.create_task(self._discard())
                return self
        raise RuntimeError("the lab did not start:\n" + "\n".join(seen))

    async def _discard(self) -> None:
        assert self._proc and self._proc.stdout
        async for raw in self._proc.stdout:
            sys.stderr.write("lab | " + raw.decode(errors="replace"))  # only errors come here (--quiet)

    async def stop(self) -> None:
        if self._proc:
            await stop_process(self._proc)
        if self._drain:
            await self._drain
