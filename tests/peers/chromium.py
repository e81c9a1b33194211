"""Headless Chromium as a test peer, started in a process group of its own
and stopped by it; every name but loopback resolves to not-found, since a
browser makes background requests of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import urllib.parse
from pathlib import Path
from typing import NamedTuple

import pytest
from wspeers.h3ws import spki_sha256

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# For a test module that runs Chromium (pytestmark); `needs_chromium` for one test.
MARKS = [
    pytest.mark.browser,
    pytest.mark.timeout(120),
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package chromium)"),
]


def needs_chromium(test):
    for mark in MARKS:
        test = mark(test)
    return test


def page(html: str) -> str:
    """A URL that is the page `html` itself."""
    return "data:text/html," + urllib.parse.quote(html)


def quic_flags(port: int, certfile: str) -> list[str]:
    """HTTP/3 to https://127.0.0.1:`port` from the first request on, WebSockets
    over it (RFC 9220, behind a feature flag), and trust in `certfile`'s key:
    --ignore-certificate-errors is not enough for QUIC's handshake."""
    return ["--enable-quic", f"--origin-to-force-quic-on=127.0.0.1:{port}",
            "--enable-features=EnableWebsocketsOverHttp3",
            f"--ignore-certificate-errors-spki-list={spki_sha256(certfile)}"]


# Chromium 14x's Local Network Access takes a data: page (an opaque origin) for
# the public internet and blocks its requests to a loopback server
# (net::ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS); through a configured
# proxy they pass. For such a page talking to loopback with no proxy set.
DATA_PAGE_TO_LOOPBACK = "--disable-features=LocalNetworkAccessChecks"


def net_log_flag(path: Path) -> str:
    """Chromium's network log (`net_log`) written to `path`: what it sent and
    received on QUIC, which neither the page nor --v=1 logging shows."""
    return f"--log-net-log={path}"


class NetLogEvent(NamedTuple):
    name: str  # its type, e.g. "HTTP3_HEADERS_SENT"
    source: int  # what it belongs to: a QUIC session, a request...
    params: dict


def net_log(path: Path) -> list[NetLogEvent]:
    """The events of a network log, in order. Chromium finishes the file when
    it exits by itself (a page closing its window), not when it is killed."""
    log = json.loads(path.read_text())
    names = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    return [NetLogEvent(names[e["type"]], e["source"]["id"], e.get("params", {})) for e in log["events"]]


async def start(url: str, home: Path, proxy_port: int | None = None,
                quic: list[str] | None = None, extra: list[str] | None = None) -> asyncio.subprocess.Process:
    """Chromium on `url`, through the proxy at 127.0.0.1:`proxy_port` if given
    (loopback included), its HOME, TMPDIR and profile in `home`. QUIC is off
    unless `quic` gives the flags that turn it on (`quic_flags`); `extra`
    flags are added as they are."""
    env = dict(os.environ, HOME=str(home), TMPDIR=str(home))
    proxy = [f"--proxy-server=http://127.0.0.1:{proxy_port}", "--proxy-bypass-list=<-loopback>"] if proxy_port else []
    return await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", *(quic or ["--disable-quic"]),
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--ignore-certificate-errors", *proxy,
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
        f"--user-data-dir={home / 'profile'}", *(extra or []), url,
        env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )


async def stop(proc: asyncio.subprocess.Process) -> None:
    # Chromium's renderers and helpers are in its own process group, which
    # the test started; its crash handlers leave the group and exit by themselves.
    signal_group(proc, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except asyncio.TimeoutError:
        signal_group(proc, signal.SIGKILL)
        await proc.wait()


def signal_group(proc: asyncio.subprocess.Process, signum: int) -> None:
    """Signal the process group `proc` leads, unless it has exited: a group
    whose every process is gone already is not an error."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)
