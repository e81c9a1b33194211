"""Shared test helpers: a real mitmdump process running the addon, and raw clients."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addon" / "ws_encode.py"
# Loaded into every test proxy: it refuses any upstream that is not loopback.
LOOPBACK_ONLY = ROOT / "scripts" / "loopback_only.py"
sys.path[:0] = [str(ROOT / "addon"), str(ROOT / "scripts")]
# Imported first: the script resets the `wsencode` package when it is
# (re)imported, so tests and addon then share the same module objects.
import ws_encode  # noqa: E402,F401

MITMDUMP = Path(sys.executable).with_name("mitmdump")
LISTENING = re.compile(r"listening at (?:\[?[\d.:a-f]+\]?):(\d+)")


class Mitmdump:
    """A mitmdump process with the addon loaded, stopped by its pid when done.

    Its output is collected line by line, so tests can wait for a log line
    (an event) instead of sleeping.
    """

    def __init__(self, *args: str, report: Path | None = None, addon: Path = ADDON, mitmdump: Path = MITMDUMP):
        self.args = list(args)
        self.mitmdump = mitmdump
        self.addon = addon
        self.report = report
        self.lines: list[str] = []
        self.port = 0
        self._changed = asyncio.Condition()
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> Mitmdump:
        cmd = [str(self.mitmdump), "--listen-host", "127.0.0.1", "-p", "0", "-s", str(self.addon), "-s", str(LOOPBACK_ONLY)]
        if self.report:
            cmd += ["--set", f"ws_encode_report={self.report}"]
        self._proc = await asyncio.create_subprocess_exec(
            *cmd,
            *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        line = await self.wait_for(LISTENING, timeout=20)
        self.port = int(LISTENING.search(line).group(1))
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.stop()
        if exc_type is not None:
            # What the proxy said last, in the failed test's captured output:
            # a hang under load is only explained by it.
            print(f"--- the last 80 lines of {self.args} ---", *self.lines[-80:], sep="\n")

    async def stop(self) -> int:
        assert self._proc
        if self._proc.returncode is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), 10)
            except asyncio.TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        if self._reader:
            await self._reader
        return self._proc.returncode

    async def _read(self) -> None:
        assert self._proc and self._proc.stdout
        async for raw in self._proc.stdout:
            async with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self.lines.append("<exited>")
            self._changed.notify_all()

    async def wait_for(self, pattern: str | re.Pattern, timeout: float = 10) -> str:
        """The first log line matching `pattern`, waiting for it if need be."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern

        def found() -> str | None:
            return next((line for line in self.lines if rx.search(line)), None)

        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: found() or "<exited>" in self.lines), timeout
                )
            except asyncio.TimeoutError:
                pass
        line = found()
        if line is None:
            raise AssertionError(f"no log line matching {rx.pattern!r} in:\n{self.log}")
        return line

    async def wait_for_count(self, pattern: str, count: int, timeout: float = 10) -> None:
        """Wait until `count` log lines match `pattern`."""
        rx = re.compile(pattern)

        def enough() -> bool:
            return sum(bool(rx.search(line)) for line in self.lines) >= count or "<exited>" in self.lines

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(enough), timeout)
        assert sum(bool(rx.search(line)) for line in self.lines) >= count, self.log

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def records(self) -> list[dict]:
        assert self.report
        if not self.report.exists():
            return []
        return [json.loads(line) for line in self.report.read_text().splitlines()]

    async def wait_for_record(self, timeout: float = 10, **fields) -> dict:
        """The first report record with these fields; the addon logs each record it
        writes, so this waits on the log rather than polling the file."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for record in self.records():
                if all(record.get(k) == v for k, v in fields.items()):
                    return record
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no record with {fields} in {self.records()}\n{self.log}")
            seen = len(self.lines)
            async with self._changed:
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: len(self.lines) > seen), remaining
                    )
                except asyncio.TimeoutError:
                    pass


def addon_copy(tmp_path: Path) -> Path:
    """The addon in a folder of its own, to be changed (and so reloaded) by a
    test: touching the shared file would reload the addon in every mitmdump
    of the suite running at the time, the other mitmproxy line's included."""
    folder = tmp_path / "addon"
    shutil.copytree(ROOT / "addon", folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder / "ws_encode.py"


async def h2_client(md: Mitmdump, authority: str = "localhost"):
    """An HTTP/2 client connection to `md`, its SETTINGS exchanged."""
    import h2ws  # (scripts/, on the path above)

    client = h2ws.H2WebSocketClient("127.0.0.1", md.port, server_hostname=authority)
    await client.connect()
    return client


async def h2_echo_once(md: Mitmdump, text: str, path: str = "/chat", authority: str = "localhost") -> tuple[int, str]:
    """One RFC 8441 WebSocket through `md`, on a connection of its own: its
    status and the echo of `text`, then an orderly close."""
    client = await h2_client(md, authority)
    ws = await client.open_websocket(path, authority)
    status = await ws.wait_status(5)
    await ws.send_text(text)
    echo = await ws.receive(5)
    await ws.close()
    await client.close()
    return status, echo


def assert_clean_log(md: Mitmdump) -> None:
    """No traceback and no crash message in mitmproxy's output."""
    assert "Traceback" not in md.log, md.log
    assert "mitmproxy has crashed" not in md.log, md.log


async def raw_exchange(port: int, request: bytes, timeout: float) -> bytes:
    """Send `request` on a fresh connection and return what comes back within
    `timeout` (until the peer closes or the time is up)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    got = bytearray()

    async def read_head() -> None:
        while b"\r\n\r\n" not in got and (chunk := await reader.read(65536)):
            got.extend(chunk)

    try:
        await asyncio.wait_for(read_head(), timeout)
    except asyncio.TimeoutError:
        pass
    writer.close()
    return bytes(got)


def upgrade_request(path: str = "/chat", **headers: str) -> bytes:
    """An HTTP/1.1 WebSocket handshake; keyword headers use _ for -, None drops one."""
    base = {
        "Host": "example.test",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    for name, value in headers.items():
        name = name.replace("_", "-")
        match = next((k for k in base if k.lower() == name.lower()), name)
        base[match] = value
    lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in base.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture
def report(tmp_path: Path) -> Path:
    return tmp_path / "report.jsonl"


@pytest.fixture
def unused_port():
    """A port on 127.0.0.1 that refuses connections: bound but never listening,
    and held for the whole test, so no other process can take it meanwhile."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
