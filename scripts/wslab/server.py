"""The lab's server: hypercorn over TLS (HTTP/1.1 and HTTP/2, RFC 8441 on) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import socket

from hypercorn.asyncio import serve
from hypercorn.config import Config
from hypercorn.protocol import h2 as hypercorn_h2

from .app import LabApp, build
from .encoders import MIN_SIZE, RELEASING_HELD_STATUS

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
    served by hypercorn; `async with` starts and stops it."""

    def __init__(self, behaviour: str, certfile: str, keyfile: str, port: int = 0,
                 min_size: int = MIN_SIZE, quiet: bool = True, log=None) -> None:
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
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> LabServer:
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

    async def __aenter__(self) -> LabServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


__all__ = ["LabApp", "LabServer"]
