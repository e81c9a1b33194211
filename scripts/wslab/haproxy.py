"""HAProxy's compression filter in front of the lab's application: a real third-party encoder.

HAProxy 2.6 (Debian) speaks RFC 8441 on an HTTP/2 frontend and turns an
extended CONNECT into an HTTP/1.1 upgrade toward its backend. Here it
terminates TLS for HTTP/1.1 and HTTP/2, compresses with gzip (`filter
compression`), and forwards to the lab's application with no encoder of
its own (behaviour "none").
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

from mitmdump_proc import free_ports, stop_process

HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None)

CONFIG = """\
global
    maxconn 200
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout tunnel 30s
frontend lab
    bind 127.0.0.1:{port} ssl crt {pem} alpn h2,http/1.1
    filter compression
    compression algo gzip
    compression type text/html text/plain
    default_backend app
backend app
    server app 127.0.0.1:{backend} ssl verify none alpn http/1.1
"""

# What HAProxy 2.6.12 (Debian 12) was measured to do, through mitmdump over
# HTTP/2, with `accept-encoding: gzip, deflate, br, zstd` on the handshake
# (scripts/repro's haproxy rows, and tests/test_lab.py).
FINDING = (
    "HAProxy 2.6 with `filter compression` (gzip) in front of the application does not hold a "
    "WebSocket handshake: it answers the HTTP/2 extended CONNECT with 200 as soon as the "
    "application's 101 arrives, without content-encoding, for a client or a server that speaks "
    "first, and passes accept-encoding unchanged to the application on the HTTP/1.1 upgrade it "
    "makes of it; the same frontend gzips the page and the streamed response. The addon reports "
    "every such handshake as upgraded at once, nothing withheld."
)


def available() -> bool:
    return HAPROXY is not None


def version() -> str | None:
    if not HAPROXY:
        return None
    out = subprocess.run([HAPROXY, "-v"], capture_output=True, text=True).stdout
    return out.split()[2] if out.startswith("HAProxy version") else out.strip()[:40]


def expect(cell, healthy: str):
    """HAProxy's rows: what it was measured to do (see FINDING): healthy at once."""
    from .matrix import Expect

    return Expect(healthy, "upgraded", stalled=False,
                  upstream_coding=None if cell.policy == "strip" else cell.accept_encoding)


class Front:
    """haproxy -db in the foreground, stopped by its pid."""

    def __init__(self, backend_port: int, cert: tuple[str, str], workdir: Path) -> None:
        self.backend_port = backend_port
        self.pem = workdir / "haproxy.pem"
        self.pem.write_text(Path(cert[0]).read_text() + Path(cert[1]).read_text())
        self.cfg = workdir / "haproxy.cfg"
        self.log = workdir / "haproxy.log"
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self, attempts: int = 3) -> Front:
        assert HAPROXY
        for _ in range(attempts):
            self.port = free_ports(1)[0]
            self.cfg.write_text(CONFIG.format(port=self.port, pem=self.pem, backend=self.backend_port))
            with open(self.log, "ab") as log:
                self._proc = await asyncio.create_subprocess_exec(
                    HAPROXY, "-db", "-f", str(self.cfg), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
            if await self._listening():
                return self
            await self.stop()
        raise RuntimeError("haproxy did not start:\n" + self.log.read_text(errors="replace"))

    async def _listening(self, timeout: float = 10) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and self._proc and self._proc.returncode is None:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)  # nothing to wait on: haproxy -db says nothing when ready
                continue
            writer.close()
            return True
        return False

    async def stop(self) -> None:
        if self._proc:
            await stop_process(self._proc, 5)
