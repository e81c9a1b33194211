"""Shared test helpers: a real mitmdump process running the addon, and raw clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from mitmproxy import http
from mitmproxy.certs import CertStore
from mitmproxy.options import CONF_BASENAME, CONF_DIR, KEY_SIZE
from mitmproxy.test import tflow, tutils

ROOT = Path(__file__).resolve().parent.parent
# Every Python this suite starts (the tools, the peers, the lab, mitmdump) imports this checkout's
# addon and tools first, as the suite itself does (pyproject.toml's pytest `pythonpath`), also where
# the environment's editable install is another checkout's (git worktrees sharing one environment).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "addon"), str(ROOT / "scripts"),
                                                         os.environ.get("PYTHONPATH")]))
# addon/ and scripts/ are on the import path by pyproject.toml's pytest
# `pythonpath`. Imported first: the script resets the `wsencode` package when it is
# (re)imported, so tests and addon then share the same module objects.
import ws_encode  # noqa: E402,F401
from wspeers import h2ws  # noqa: E402
from wspeers.fault_server import FaultServer  # noqa: E402
# The one mitmdump launcher, the tools' too; ADDON is addon/ws_encode.py, and
# LOOPBACK_ONLY, loaded into every test proxy, refuses any upstream that is not loopback.
from mitmdump_proc import ADDON, LISTENING, LOOPBACK_ONLY, MITMDUMP, STARTED, Process  # noqa: E402
from forkserver import ForkServer  # noqa: E402

# This line's mitmdumps are forked from a process that has imported mitmproxy
# once (tests/forkserver.py: a second of CPU saved on each of a few hundred);
# WSENCODE_TEST_FORK=0 starts each the ordinary way. Others (mitmweb, another
# line's) always start the ordinary way.
FORK_SERVER = None if os.environ.get("WSENCODE_TEST_FORK") == "0" else ForkServer(
    Path(tempfile.mkdtemp(prefix="wsencode-fork-")))

# How long a test waits for an event (a log line, a record, a start) before
# it fails: only a hang should take this long, and on a busy machine (the two
# lines side by side beside other work) a mitmdump takes many seconds to start
# and each event comes seconds late. A test that passes never waits this out.
EVENT_TIMEOUT = 30.0
STARTUP_TIMEOUT = 60.0
CLIENT_CONNECT = re.compile(r"\] client connect$")
CLIENT_DISCONNECT = re.compile(r"\] client disconnect$")


class Mitmdump(Process):
    """A mitmdump process with the addon loaded, stopped by its pid when done.

    Its output is collected line by line, so tests can wait for a log line
    (an event) instead of sleeping.
    """

    def __init__(self, *args: str, report: Path | None = None, addon: Path = ADDON, mitmdump: Path = MITMDUMP,
                 env: dict[str, str] | None = None):
        super().__init__()
        self.args = list(args)
        self.mitmdump = mitmdump
        self.addon = addon
        self.report = report
        self.env = {**os.environ, **(env or {})}  # its environment: this one's, and `env`
        self.port = 0

    async def __aenter__(self) -> Mitmdump:
        cmd = [self.mitmdump, "--listen-host", "127.0.0.1", "-p", "0", "-s", self.addon, "-s", LOOPBACK_ONLY]
        if self.report:
            cmd += ["--set", f"ws_encode_report={self.report}"]
        if FORK_SERVER is not None and self.mitmdump == MITMDUMP:
            argv = [str(part) for part in (*cmd, *self.args)]
            self.adopt(await FORK_SERVER.start(argv, os.getcwd(), self.env))
        else:
            await self.spawn(*cmd, *self.args, env=self.env)
        line = await self._wait_until_started(LISTENING)
        self.port = int(LISTENING.search(line).group(1))
        await self._wait_until_started(STARTED)
        return self

    async def _wait_until_started(self, ready: re.Pattern | str, timeout: float = STARTUP_TIMEOUT) -> str:
        """The line saying it is ready. One that has not said so in time is
        stopped before the failure is raised, not left running after the
        test; one that ended its output is exiting by itself, and its caller
        may still wait for its exit status."""
        try:
            return await self.wait_for(ready, timeout)
        except AssertionError:
            if not self.exited:
                await self.stop()
            raise

    async def __aexit__(self, exc_type, exc, tb) -> None:
        await self.stop()
        if exc_type is not None:
            # What the proxy said last, in the failed test's captured output:
            # a hang under load is only explained by it.
            print(f"--- the last 80 lines of {self.args} ---", *self.lines[-80:], sep="\n")

    async def stop(self, timeout: float = 10) -> int:
        assert self._proc
        if self._proc.returncode is None:
            await self._let_closing_connections_finish()
        return await super().stop(timeout)

    async def _let_closing_connections_finish(self, timeout: float = 0.3) -> None:
        """mitmproxy 11 prints a traceback when it is stopped while it is still
        closing a client's connection (its handler task is cancelled under
        asyncio's callback): a client that has just closed is let go first.
        Briefly, and without failing: some tests stop the proxy with
        connections open on purpose."""

        def all_closed() -> bool:
            opened = sum(bool(CLIENT_CONNECT.search(line)) for line in self.lines)
            closed = sum(bool(CLIENT_DISCONNECT.search(line)) for line in self.lines)
            return closed >= opened

        await self.until(all_closed, timeout)

    async def wait_for(self, pattern: str | re.Pattern, timeout: float = EVENT_TIMEOUT) -> str:
        """The first log line matching `pattern`, waiting for it if need be."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern

        def found() -> str | None:
            return next((line for line in self.lines if rx.search(line)), None)

        await self.until(found, timeout)
        line = found()
        if line is None:
            raise AssertionError(f"no log line matching {rx.pattern!r} in:\n{self.log}")
        return line

    async def wait_for_count(self, pattern: str, count: int, timeout: float = EVENT_TIMEOUT) -> None:
        """Wait until `count` log lines match `pattern`."""
        rx = re.compile(pattern)

        def enough() -> bool:
            return sum(bool(rx.search(line)) for line in self.lines) >= count

        assert await self.until(enough, timeout), self.log

    def records(self) -> list[dict]:
        assert self.report
        return whole_records(self.report)

    async def wait_for_record(self, timeout: float = EVENT_TIMEOUT, **fields) -> dict:
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


def whole_records(report: Path) -> list[dict]:
    """The records in a report a mitmdump may be writing: its whole lines. A
    read can fall inside the write of a record (the kernel copies a write into
    the file a page at a time, and a read does not wait for it)."""
    if not report.exists():
        return []
    written = report.read_bytes()
    return [json.loads(line) for line in written[:written.rfind(b"\n") + 1].splitlines()]


def addon_copy(tmp_path: Path) -> Path:
    """The addon in a folder of its own, to be changed (and so reloaded) by a
    test: touching the shared file would reload the addon in every mitmdump
    of the suite running at the time, the other mitmproxy line's included."""
    folder = tmp_path / "addon"
    shutil.copytree(ROOT / "addon", folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder / "ws_encode.py"


async def reload_script(md: Mitmdump, script: Path) -> None:
    """Change the script's file and wait until mitmproxy has loaded it again
    (it watches the file's mtime)."""
    loading = re.escape(f"Loading script {script}")
    loads = sum(bool(re.search(loading, line)) for line in md.lines)
    stat = script.stat()
    os.utime(script, (stat.st_atime, stat.st_mtime + 1))
    await md.wait_for_count(loading, loads + 1, timeout=15)


async def h2_client(md: Mitmdump, authority: str = "localhost"):
    """An HTTP/2 client connection to `md`, its SETTINGS exchanged."""

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


# The stall threshold of the proxies reverse_to and proxied start, and the
# authority their HTTP/2 clients ask for.
STALL = 0.5
AUTHORITY = "localhost"


def reverse_to(url: str, *options: str, report=None) -> Mitmdump:
    """A mitmdump in reverse mode to `url` (not started)."""
    return Mitmdump(
        "--mode", f"reverse:{url}", "--ssl-insecure", "--set", f"ws_encode_stall={STALL}", *options,
        report=report,
    )


async def proxied(faults, report, *options: str):
    """A started fault_server.FaultServer with `faults` and a started mitmdump
    in front of it; end both with close_proxied."""
    server = FaultServer(faults)
    await server.start()
    md = Mitmdump(
        "--mode", f"reverse:http://127.0.0.1:{server.port}",
        "--set", f"ws_encode_stall={STALL}",
        *options,
        report=report,
    )
    await md.__aenter__()
    return server, md


@contextlib.asynccontextmanager
async def on_one_port_number(udp_server: Callable[[], AbstractAsyncContextManager],
                             tcp_server: Callable[[int], AbstractAsyncContextManager]):
    """A UDP server (HTTP/3) and a TCP server on the port of the same number, as an
    origin that serves both has them (mitmproxy's HTTP/1.1 fallback goes to the same
    address over TCP); yields the two. The UDP port is the one the system gives; where
    its number is taken on TCP (every outgoing connection takes one from the same
    range), it is another try."""
    for attempt in range(20):
        async with contextlib.AsyncExitStack() as servers:
            udp = await servers.enter_async_context(udp_server())
            try:
                tcp = await servers.enter_async_context(tcp_server(udp.port))
            except OSError as e:
                if e.errno != errno.EADDRINUSE or attempt == 19:
                    raise
                continue
            yield udp, tcp
            return


async def close_proxied(server, md: Mitmdump) -> None:
    await md.stop()
    await server.stop()


# The other mitmproxy line's environment, by this one's major version.
OTHER_VENVS = {"12": ROOT / ".venv-mitmproxy11", "11": ROOT / ".venv-mitmproxy12"}
READ_FLOWS = "import sys; from mitmproxy import io; print(len(list(io.FlowReader(open(sys.argv[1], 'rb')).stream())))"


def flows_read_by_each_line(path: Path) -> dict[str, str]:
    """How many flows each mitmproxy line reads from the flow file at `path`
    (this one, and the other one where it is set up), by its Python; a
    reader that fails answers its error instead."""
    from mitmproxy.version import VERSION

    other = OTHER_VENVS[VERSION.split(".")[0]] / "bin" / "python"
    if not other.exists() and os.environ.get("CI"):
        pytest.fail(f"{other} is missing: the other mitmproxy line must read the file too")
    counts = {}
    for python in [sys.executable, *([str(other)] if other.exists() else [])]:
        done = subprocess.run([python, "-c", READ_FLOWS, str(path)], capture_output=True, text=True, timeout=60)
        counts[python] = done.stdout.strip() if done.returncode == 0 else done.stderr
    return counts


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


def handshake_request(method="GET", version="HTTP/1.1", **headers) -> http.Request:
    """A WebSocket handshake request object (mitmproxy's test request); a header
    given as None is left out, `_` in a name stands for `-`."""
    base = {
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-key": base64.b64encode(b"0123456789abcdef").decode(),
        "sec-websocket-version": "13",
    }
    base.update({k.replace("_", "-"): v for k, v in headers.items()})
    req = tutils.treq(method=method.encode(), http_version=version.encode())
    req.headers.clear()
    for k, v in base.items():
        if v is not None:
            req.headers[k] = v
    return req


def extended_connect_request(version="HTTP/2.0", protocol="websocket", **headers) -> http.Request:
    """An extended CONNECT (RFC 8441, RFC 9220) as the flow keeps it:
    `:protocol` as its first header field; like `handshake_request`."""
    base = {"sec-websocket-version": "13", "origin": "https://chat.test"}
    base.update({k.replace("_", "-"): v for k, v in headers.items()})
    req = tutils.treq(method=b"CONNECT", http_version=version.encode(), path=b"/chat", authority=b"chat.test:8443")
    req.headers.clear()
    req.headers[":protocol"] = protocol
    for k, v in base.items():
        if v is not None:
            req.headers[k] = v
    return req


class LabAlone:
    """`python -m wslab.lab OPTIONS` on its own, as a person runs it, in
    `cwd`: `with` it, `printed` is what it said up to "lab: ready"; on leaving,
    SIGTERM, and `rest` is what it printed after, `returncode` how it exited."""

    def __init__(self, cwd: Path, *options: str) -> None:
        self.cwd = cwd
        self.options = options
        self.printed = self.rest = ""
        self.returncode: int | None = None

    def __enter__(self) -> LabAlone:
        self.proc = subprocess.Popen([sys.executable, "-m", "wslab.lab", *self.options], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=self.cwd)
        head = []
        for line in self.proc.stdout:
            head.append(line)
            if line.startswith("lab: ready"):
                break
        self.printed = "".join(head)
        return self

    def __exit__(self, *exc_info) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.rest, _ = self.proc.communicate(timeout=10)
        self.returncode = self.proc.returncode


class ManualClock:
    """Time and a scheduler (as the event loop's `call_later`), both driven by
    the test: `advance` runs the timers due by a time, each late by `lag` (a
    busy event loop), and `fire_all` every one, moving time to each."""

    def __init__(self, now: float = 1000.0):
        self.now = now
        self.pending: list[list] = []  # [due, callback, cancelled]

    def __call__(self) -> float:
        return self.now

    def schedule(self, delay, callback):
        entry = [self.now + delay, callback, False]
        self.pending.append(entry)

        class Handle:
            def cancel(self_inner):
                entry[2] = True

        return Handle()

    @property
    def live(self) -> list[list]:
        return [e for e in self.pending if not e[2]]

    def advance(self, to: float, lag: float = 0.0) -> int:
        fired = 0
        while due := [e for e in self.live if e[0] + lag <= to]:
            entry = min(due, key=lambda e: e[0])
            entry[2] = True
            self.now = max(self.now, entry[0] + lag)
            entry[1]()
            fired += 1
        self.now = max(self.now, to)
        return fired

    def fire_all(self) -> int:
        fired = 0
        while self.live:
            fired += self.advance(min(e[0] for e in self.live))
        return fired


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
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")  # ("\udcff": the byte 0xff)


# -- the session: what every test finds in place, and the quick subset --

# `scripts/test.sh --quick` (pytest -m quick): the test files that start no
# proxy and open no socket, and one test through a real mitmdump per transport.
QUICK_FILES = {"test_core.py", "test_addon.py", "test_stallwatch.py", "test_h2codecs.py", "test_h1codec.py",
               "test_extconnect.py", "test_stream.py", "test_bundle.py", "test_replay.py"}
QUICK_TESTS = {"test_h1_proxy.py::test_observe_reports_stall_while_client_waits",
               "test_h2_proxy.py::test_h2_stall_is_reported_live_and_strip_opens_it",
               "test_h3_proxy.py::test_an_h3_stall_is_reported_live_and_strip_opens_it"}


def pytest_configure(config: pytest.Config) -> None:
    # Registered here rather than in pyproject.toml: scripts/venv.sh stamps the
    # environments with that file's hash, so editing it reinstalls them.
    config.addinivalue_line("markers", "quick: the quick subset (scripts/test.sh --quick)")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by it
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    names = set()
    for item in items:
        name = f"{item.path.name}::{item.originalname}"
        names.update((item.path.name, name))
        if item.path.name in QUICK_FILES or name in QUICK_TESTS:
            item.add_marker(pytest.mark.quick)
    missing = (QUICK_FILES | QUICK_TESTS) - names
    if missing and config.args_source is pytest.Config.ArgsSource.TESTPATHS:  # the whole suite: all should be here
        raise pytest.UsageError(f"tests/conftest.py's quick subset names tests that do not exist: {sorted(missing)}")


# An example's time says how busy the machine is, not how fast the code is
# (the bench measures that): no deadline, and no health check on slowness.
settings.register_profile("ws-encode", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ws-encode")


def pytest_sessionstart(session: pytest.Session) -> None:
    make_mitmproxy_ca(Path(CONF_DIR).expanduser())


def pytest_sessionfinish(session: pytest.Session) -> None:
    if FORK_SERVER is not None:
        FORK_SERVER.stop()
        shutil.rmtree(FORK_SERVER.folder, ignore_errors=True)


def make_mitmproxy_ca(confdir: Path) -> None:
    """The certificate authority every mitmdump of the suite loads from
    `confdir`, made before any starts. mitmproxy makes one at start-up where
    it is missing, writing its files in place, so on a fresh machine two
    mitmdumps starting at once (the two lines run side by side) could read
    each other's half-written key. Here it is made in a folder of its own and
    renamed into place, under a lock the other line's session waits on."""
    key_file = confdir / f"{CONF_BASENAME}-ca.pem"
    if key_file.exists():
        return
    confdir.mkdir(parents=True, exist_ok=True)
    folder = os.open(confdir, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        if key_file.exists():  # the other session made it meanwhile
            return
        with tempfile.TemporaryDirectory(dir=confdir) as new:
            CertStore.create_store(Path(new), CONF_BASENAME, KEY_SIZE)
            # The key file last: mitmproxy makes a store wherever it is missing.
            for made in sorted(Path(new).iterdir(), key=lambda f: f.name == key_file.name):
                os.replace(made, confdir / made.name)
    finally:
        os.close(folder)  # (and so unlocked)


@pytest.fixture(scope="session")
def cert(tmp_path_factory):
    """A self-signed certificate for localhost and 127.0.0.1: (cert file, key file)."""
    return h2ws.make_self_signed_cert(tmp_path_factory.mktemp("cert"))


@pytest.fixture
def home(tmp_path_factory):
    """A short folder for Chromium's HOME and TMPDIR: its singleton socket
    lives there, and a Unix socket path must stay under 108 bytes."""
    return tmp_path_factory.mktemp("c")


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


# -- bundles: flows and records as the addon makes them, and scripts/replay --

# What the tools in scripts/ are run with: the width their output is written for.
SCRIPTS_ENV = dict(os.environ, COLUMNS="200")

# Each secret is unique, so finding any of them anywhere in the bundle is a leak.
SECRETS = {
    "cookie": "cookie-value-c00k1e",
    "set-cookie": "set-cookie-value-5e7",
    "authorization": "Bearer auth-value-a07h",
    "proxy-authorization": "Basic proxy-auth-value-9x",
    "token": "token-value-70ken",
    "jsessionid": "jsession-value-j5e55",
    "userinfo": "userinfo-pw-u5er",
    "referer": "referer-token-r3f",
    "fragment": "fragment-value-fr4g",
}


def handshake_flow(path: str, h2: bool = False) -> http.HTTPFlow:
    """A WebSocket handshake carrying every kind of secret, answered with a set-cookie."""
    f = tflow.tflow(resp=True)
    request = f.request
    request.path = path
    request.authority = f"alice:{SECRETS['userinfo']}@example.com:443" if h2 else ""
    request.http_version = "HTTP/2.0" if h2 else "HTTP/1.1"
    request.method = "CONNECT" if h2 else "GET"
    request.headers.clear()
    request.headers.update({
        "host": f"alice:{SECRETS['userinfo']}@example.com",
        "upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "13",
        "accept-encoding": "gzip, deflate, br, zstd",
        "cookie": f"sid={SECRETS['cookie']}",
        "authorization": SECRETS["authorization"],
        "proxy-authorization": SECRETS["proxy-authorization"],
        "referer": f"https://bob:{SECRETS['userinfo']}@example.com/app?next={SECRETS['referer']}",
        "origin": "https://example.com",
        "x-kept": "kept-value",
    })
    request.headers.add("cookie", f"other={SECRETS['cookie']}")
    f.response.status_code = 200 if h2 else 101
    f.response.headers.clear()
    f.response.headers["set-cookie"] = f"sid={SECRETS['set-cookie']}; Secure"
    f.response.headers["location"] = f"/next?token={SECRETS['token']}"
    return f


def record(f: http.HTTPFlow, event: str, **fields) -> dict:
    base = {
        "event": event, "ts": "2026-12-01T18:43:46.206+00:00", "flow_id": f.id, "transport": "h2",
        "upstream_transport": "h2", "url": "https://example.com/echo/x", "policy": "observe",
        "accept_encoding_client": "gzip, deflate, br, zstd", "accept_encoding_upstream": "gzip, deflate, br, zstd",
        "waited_s": 5.976, "status": None, "upstream_status": None, "client_bytes_before_status": 0,
        "stuck_in": "forwarded", "received_s": 6.015, "diagnosis": "No status: the client gave up.",
    }
    if event == "handshake":
        base.update(outcome="no-status", stalled=True, content_encoding=None)
    return {**base, **fields}


def replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bugreport.replay", *args], capture_output=True, text=True,
                          timeout=90, env=SCRIPTS_ENV)
