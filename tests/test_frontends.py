"""What a person sees of a stalled handshake in mitmproxy's two front ends.

The console (`mitmproxy -s`) runs in a detached tmux session of a fixed size,
driven with send-keys and read with capture-pane each time it writes to its
pane; mitmweb (`mitmweb -s`) is read by headless Chromium through the
DevTools protocol each time its page changes, and asked for
`wsencode.summary` through its HTTP API. Both sit in reverse mode in front of
a server that withholds its 101 while the handshake offers accept-encoding,
so the handshake stalls while the client waits, and ends when it gives up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (ADDON, EVENT_TIMEOUT, LOOPBACK_ONLY, Mitmdump, assert_clean_log, upgrade_request,
                      whole_records)
from wspeers import h2ws
from wspeers.fault_server import Faults, FaultServer
from peers import chromium
from peers.chromium import CHROMIUM

TMUX = shutil.which("tmux")
MITMPROXY = Path(sys.executable).with_name("mitmproxy")
MITMWEB = Path(sys.executable).with_name("mitmweb")
STALL = "1"
# The console and mitmweb both turn the addon's `:hourglass:` into the emoji (mitmweb's
# text holds it; without an emoji font, as Debian's headless Chromium here, it shows as a box).
MARK = "⌛"
DEADLINE = EVENT_TIMEOUT  # seconds any one thing may take to show up on screen


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on, from /proc: mitmweb, given port
    0 for its UI, says port 0."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # an fd closed meanwhile
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def withholding_server() -> FaultServer:
    server = FaultServer(Faults(withhold_when_encoded=True))
    await server.start()
    return server


async def open_stalling_handshake(port: int) -> asyncio.StreamWriter:
    """A client that sends a handshake offering encoding and then waits, as a
    browser does, for a status that will not come."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request("/echo?token=frontend-secret", Host=f"127.0.0.1:{port}",
                                 accept_encoding="gzip, deflate, br, zstd"))
    await writer.drain()
    return writer


def flat(text: str) -> str:
    """Screen text with its line breaks and runs of blanks as single spaces."""
    return " ".join(text.split())


# -- the console, in tmux --------------------------------------------------


class Tmux:
    """A tmux server of this test's own (its own socket name), holding one
    detached session of a fixed size; only this server is ever killed."""

    def __init__(self, home: Path, width: int = 150, height: int = 45):
        self.home = home
        self.socket = f"ws-encode-test-{os.getpid()}-{secrets.token_hex(4)}"
        self.width, self.height = width, height
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TMUX")}
        self.env.update(HOME=str(home), TERM="xterm-256color", LANG="C.UTF-8", LC_ALL="C.UTF-8")
        # Set before the program starts: keep the pane when it exits, so a crash stays readable.
        self.config = home / "tmux.conf"
        self.config.write_text("set-option -g remain-on-exit on\n")
        self.started = False
        # Set on each write the console makes to its pane: the event a look at the screen waits on.
        self.written = asyncio.Event()
        self.output: int | None = None  # where those writes arrive

    def run(self, *args: str) -> str:
        return subprocess.run([TMUX, "-u", "-L", self.socket, "-f", str(self.config), *args], env=self.env,
                              check=True, capture_output=True, text=True, timeout=10).stdout

    async def start(self, *argv: str) -> None:
        self.run("new-session", "-d", "-s", "t", "-x", str(self.width), "-y", str(self.height),
                 "env", *(f"{k}={self.env[k]}" for k in ("HOME", "TERM", "LANG", "LC_ALL")), *argv)
        self.started = True
        self.socket_path = self.run("display-message", "-p", "#{socket_path}").strip()
        self._follow_output()

    def _follow_output(self) -> None:
        """tmux copies all the pane's output into a FIFO (pipe-pane) this
        test reads, so each write sets `written`."""
        fifo = self.home / "pane-output"
        os.mkfifo(fifo)
        # Opened for writing too, so it never reads as ended while tmux's `cat` is not there yet.
        self.output = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.output, self._read_output)
        self.run("pipe-pane", "-O", "-t", "t", f"exec cat > {shlex.quote(str(fifo))}")

    def _read_output(self) -> None:
        os.read(self.output, 1 << 16)
        self.written.set()

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.run("send-keys", "-t", "t", *(["-l"] if literal else []), *keys)

    def command(self, text: str) -> None:
        """Type a command at the console's `:` prompt and run it."""
        self.keys(":")
        self.keys(text, literal=True)
        self.keys("Enter")

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "t")

    async def wait_until(self, shown: Callable[[str], bool], what: str) -> str:
        """The screen, once `shown` says it shows `what`: looked at again
        after each write the console makes to its pane, until DEADLINE."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while True:
            self.written.clear()  # before the look: a write after it wakes the wait below
            screen = self.screen()
            if shown(screen):
                return screen
            try:
                await asyncio.wait_for(self.written.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                raise AssertionError(f"the console never showed {what}:\n{self.screen()}") from None

    async def wait_for(self, *needles: str, gone: str | None = None) -> str:
        """The screen, once it shows every needle (in its text with line
        breaks as spaces) and not `gone`."""

        def shown(screen: str) -> bool:
            text = flat(screen)
            return all(flat(n) in text for n in needles) and not (gone and gone in text)

        return await self.wait_until(shown, f"{needles} (without {gone!r})")

    async def viewer(self, *needles: str) -> tuple[str, list[str]]:
        """The screen and the rows of the console's data viewer, once they
        show every needle and the whole box is drawn, every row's right edge
        as well as its left: a look may fall between two chunks of one
        redraw (a CI run under load saw the headline, then a row of which
        only the left edge was drawn yet)."""

        def drawn(screen: str) -> bool:
            if "Data viewer" not in screen or not data_viewer_whole(screen):
                return False
            text = flat("\n".join(data_viewer_rows(screen)))
            return all(flat(n) in text for n in needles)

        screen = await self.wait_until(drawn, f"the data viewer with {needles}")
        return screen, data_viewer_rows(screen)

    async def resize(self, width: int, height: int) -> str:
        """Resize the window, and wait until the console has drawn itself at
        the new width: it learns of a resize (SIGWINCH) at its own pace, and
        keys sent before it has are answered at the old width."""
        self.run("resize-window", "-t", "t", "-x", str(width), "-y", str(height))
        return await self.wait_until(lambda screen: drawn_at(screen, width), f"a screen {width} columns wide")

    def stop(self) -> None:
        if self.started:
            subprocess.run([TMUX, "-L", self.socket, "kill-server"], env=self.env, capture_output=True, timeout=10)
            Path(self.socket_path).unlink(missing_ok=True)  # tmux leaves it behind
        if self.output is not None:
            self.loop.remove_reader(self.output)  # (nothing to do once asyncio.run has closed the loop)
            os.close(self.output)


def drawn_at(screen: str, width: int) -> bool:
    """Whether the console has drawn `screen` at `width` columns: its status
    bar ends with the address it listens on, at the right edge."""
    return any(len(line) == width and re.search(r"\[127\.0\.0\.1:\d+\]$", line) for line in screen.splitlines())


@pytest.fixture
def tmux(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    tmux = Tmux(home)
    yield tmux
    tmux.stop()


async def start_console(tmux: Tmux, upstream: FaultServer, report: Path) -> int:
    """The console with the addon, in reverse mode to `upstream`; the port it listens on."""
    await tmux.start(str(MITMPROXY), "-s", str(ADDON), "-s", str(LOOPBACK_ONLY),
                     "--listen-host", "127.0.0.1", "-p", "0",
                     "--mode", f"reverse:http://127.0.0.1:{upstream.port}",
                     "--set", f"ws_encode_stall={STALL}", "--set", f"ws_encode_report={report}")
    # The status bar shows the address the proxy is bound to once it is.
    return int(re.search(r"\[127\.0\.0\.1:(\d+)\]", flat(await tmux.wait_for("[127.0.0.1:"))).group(1))


def data_viewer_whole(screen: str) -> bool:
    """Whether the "Data viewer" box is drawn whole: each of its rows has
    its right edge as well as its left, down to its bottom edge or to the
    status bar, which covers the bottom of a box as tall as the screen (its
    last rows, never blank). A box that stops at a blank row is half drawn:
    a loaded run saw its title and two rows, then nothing."""
    lines = screen.splitlines()
    top = next(i for i, line in enumerate(lines) if "Data viewer" in line)
    left, right = lines[top].index("┌"), lines[top].rindex("┐")
    rows = 0
    for at in range(top + 1, len(lines)):
        line = lines[at]
        if line[left:left + 1] == "└":
            return line[right:right + 1] == "┘"
        if line[left:left + 1] != "│":
            last = max(i for i, row in enumerate(lines) if row.strip())
            return rows > 0 and line.strip() != "" and at > last - STATUS_ROWS
        if line[right:right + 1] != "│":
            return False
        rows += 1
    return False


# The console's last rows drawn: its status bar (two, where it wraps) and the command line.
STATUS_ROWS = 3


def data_viewer_rows(screen: str) -> list[str]:
    """The rows inside the console's "Data viewer" box, without the frame."""
    lines = screen.splitlines()
    top = next(i for i, line in enumerate(lines) if "Data viewer" in line)
    left = lines[top].index("┌")
    rows = []
    for line in lines[top + 1:]:
        if line[left:left + 1] != "│":
            break
        inner = line[left + 1:]
        rows.append(inner[:inner.index("│")].rstrip() if "│" in inner else inner.rstrip())
    return rows


def headline_and_sentence(rows: list[str], url: str) -> tuple[str, list[str]]:
    """A `wsencode.stalls` entry: its headline row and the sentence's rows under it."""
    start = next(i for i, row in enumerate(rows) if row.startswith("[flow ") and row.endswith(url))
    body = []
    for row in rows[start + 1:]:
        if not row.startswith("    "):
            break
        body.append(row.strip())
    return rows[start], body


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (Debian package tmux): the console test needs it")
def test_the_console_shows_the_mark_the_commands_and_the_outcome(tmux, tmp_path):
    report = tmp_path / "report.jsonl"
    async def scenario():
        upstream = await withholding_server()
        upstream_url = f"http://127.0.0.1:{upstream.port}/echo?token=REDACTED"
        try:
            port = await start_console(tmux, upstream, report)
            client = await open_stalling_handshake(port)

            # The flow list marks the handshake ⌛ once it stalls.
            screen = await tmux.wait_for(MARK)
            row = next(line for line in screen.splitlines() if "/echo" in line)
            assert row.rstrip().endswith(MARK), screen
            stall = next(r for r in whole_records(report) if r["event"] == "stall")

            # wsencode.stalls: a headline with the flow and the URL, the sentence wrapped at words.
            tmux.command("wsencode.stalls")
            screen, rows = await tmux.viewer("[flow ")
            headline, sentence = headline_and_sentence(rows, upstream_url)
            assert re.fullmatch(r"\[flow [0-9a-f]{8}\] " + re.escape(upstream_url), headline), screen
            assert stall["flow_id"].startswith(headline[6:14])
            # (as wide as the viewer, 80 % of the terminal less its frame: not the 60 columns of old)
            assert sentence and all(len(row) <= tmux.width * 0.8 - 4 for row in sentence), screen
            assert max(len(row) for row in sentence) > 80, screen
            joined = " ".join(sentence)
            assert joined == stall["diagnosis"], screen  # every word whole, none lost
            assert "frontend-secret" not in screen

            # In an 80-column terminal the data viewer is narrower (80% of the
            # width, less its frame) and cuts longer rows wherever they reach its edge.
            tmux.keys("q")
            await tmux.wait_for(gone="Data viewer")
            await tmux.resize(80, 24)
            tmux.command("wsencode.stalls")
            screen, rows = await tmux.viewer("[flow ")
            start = next(i for i, row in enumerate(rows) if row.startswith("    "))
            words = " ".join(rows[start:]).split()
            assert words == stall["diagnosis"].split(), screen  # at 80 columns too, no word is cut
            await tmux.resize(tmux.width, tmux.height)

            # wsencode.summary: one fact a row.
            tmux.keys("q")
            await tmux.wait_for(gone="Data viewer")
            tmux.command("wsencode.summary")
            screen, rows = await tmux.viewer("waiting for a status now", "report:")
            rows = [row.strip() for row in rows if row.strip()]
            assert re.match(r"0 WebSocket handshakes finished|no WebSocket handshake", rows[0]), screen
            assert re.fullmatch(r"1 waiting for a status now, longest \d+\.\d s", rows[1]), screen
            assert re.fullmatch(r"1 stalls? reported", rows[2]), screen
            # The report's path is as long as pytest's temporary folder: the
            # viewer wraps it wherever its edge falls.
            at = next(i for i, row in enumerate(rows) if row.startswith("report:"))
            assert re.sub(r"\s", "", "".join(rows[at:])) == re.sub(r"\s", "", f"report: {report}"), screen
            tmux.keys("q")
            await tmux.wait_for(gone="Data viewer")

            # The client gives up: the outcome is appended to the comment, which
            # the flow's Detail tab shows under the stall's sentence.
            client.close()
            await tmux.wait_for("no-status")  # the console's status bar shows the warning
            end = next(r for r in whole_records(report) if r["event"] == "handshake")
            assert end["outcome"] == "no-status" and end["diagnosis"].startswith("No status: the client gave up")

            tmux.command("wsencode.stalls")  # now with the latest sentence
            screen, rows = await tmux.viewer("No status: the client gave up")
            _, sentence = headline_and_sentence(rows, upstream_url)
            assert re.sub(r"- ", "-", " ".join(sentence)) == end["diagnosis"], screen
            tmux.keys("q")
            await tmux.wait_for(gone="Data viewer")

            tmux.keys("Enter")  # the focused flow, the only one
            await tmux.wait_for("Flow Details", "Request", "Response", "Detail")
            tmux.keys("Right")
            tmux.keys("Right")
            screen = await tmux.wait_for("Comment:", "Metadata:")  # (what follows it: the comment is whole)
            comment = flat(screen.split("Comment:", 1)[1].split("Metadata:", 1)[0])
            assert comment == f"{stall['diagnosis']} {end['diagnosis']}", screen
            assert MARK in screen.splitlines()[1], screen  # the detail's title row keeps the mark
            assert "Traceback" not in screen
        finally:
            await upstream.stop()

    asyncio.run(scenario())


# -- mitmweb, read by headless Chromium ---------------------------------------



@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (Debian package tmux): the console test needs it")
def test_the_console_shows_http2_websockets_as_they_were_on_the_wire(tmux, tmp_path):
    """Over HTTP/2 the client sends an extended CONNECT and gets a 200: once
    a handshake has its outcome, its flow in the list and its detail say so,
    the stalled one keeps its mark, and the comment says where the proxy
    translated."""
    report = tmp_path / "report.jsonl"

    async def scenario():
        upstream = await withholding_server()
        clients = []
        try:
            port = await start_console(tmux, upstream, report)
            for _ in range(2):
                clients.append(h2ws.H2WebSocketClient("127.0.0.1", port, server_hostname="localhost"))
                await clients[-1].connect()
            opened = await clients[0].open_websocket("/open", "localhost")
            assert await opened.wait_status(DEADLINE) == 200
            stalling = await clients[1].open_websocket(
                "/stalls?token=frontend-secret", "localhost", headers=[("accept-encoding", "gzip, br")])
            screen = await tmux.wait_for(MARK)
            # While it waits, the stalled flow is already the extended CONNECT the client sent.
            assert re.search(r" CON(NECT|…) .*/stalls.*" + MARK, screen) and "GET" not in screen, screen
            await stalling.reset()
            # The list: both CONNECTs (a narrow method column), each with its
            # path in a column of its own; the WebSocket answered 200, the
            # stalled one keeps its mark. (The status bar's warning follows the record.)
            screen = await tmux.wait_for("no-status")
            end = next(r for r in whole_records(report) if r.get("outcome") == "no-status")
            rows = [line for line in screen.splitlines() if re.search(r" CON(NECT|…) ", line)]
            assert len(rows) == 2 and "GET" not in screen, screen
            assert "/open" in rows[0] and re.search(r" 200 ", rows[0]) and MARK not in rows[0], screen
            assert "/stalls" in rows[1] and MARK in rows[1], screen

            # The stalled flow's request is the extended CONNECT, :protocol first.
            tmux.keys("Down")
            tmux.keys("Enter")
            screen = await tmux.wait_for("Flow Details", ":protocol", "accept-encoding")
            assert "CONNECT" in screen and "sec-websocket-key" not in screen and "upgrade" not in screen.lower(), screen
            tmux.keys("Right")
            tmux.keys("Right")
            screen = await tmux.wait_for("Comment:", "On the wire", "Metadata:")
            comment = flat(screen.split("Comment:", 1)[1].split("Metadata:", 1)[0])
            assert comment.startswith("Stall: no status") and end["diagnosis"] in comment, screen
            wire = comment[comment.index("On the wire:"):]
            assert re.fullmatch(re.escape(
                "On the wire: HTTP/2 extended CONNECT (:protocol websocket) /stalls?token=REDACTED → no status; "
                "the proxy sent the HTTP/1.1 upstream a GET upgrade (Sec-WebSocket-Key "
            ) + r"[A-Za-z0-9+/]{22}==\)\.", wire), screen
            assert "frontend-secret" not in comment and "Traceback" not in screen
        finally:
            for client in clients:
                await client.close()
            await upstream.stop()

    asyncio.run(scenario())


def above_four(fd: int) -> int:
    """`fd` moved to a number above 4 (closed at exec unless passed on), so
    that putting the other end on 3 or 4 cannot overwrite it."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


# In the page: a promise of its text once it holds every needle, looked at
# again at each change of the document, or of what it holds after `ms`.
TEXT_SHOWN = """(needles, ms) => new Promise(resolve => {
    const text = () => document.body ? document.body.innerText : "";
    const answer = () => ({all: needles.every(n => text().includes(n)), text: text()});
    const observer = new MutationObserver(() => answer().all && end());
    const timer = setTimeout(() => end(), ms);
    const end = () => { observer.disconnect(); clearTimeout(timer); resolve(answer()); };
    observer.observe(document, {childList: true, subtree: true, characterData: true});
    if (answer().all) end();
})"""


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe: the browser
    reads commands on its fd 3 and writes answers on its fd 4, each message
    JSON ended by a NUL byte. No port is opened."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.next_id = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.awaited: dict[str, list[asyncio.Future]] = {}  # by the event's method
        self.session: str | None = None

    async def start(self, home: Path) -> DevTools:
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        to_browser_r, from_browser_w = (above_four(fd) for fd in (to_browser_r, from_browser_w))
        # A Python launcher puts the two ends on fds 3 and 4 and becomes Chromium.
        launcher = (f"import os, sys; os.dup2({to_browser_r}, 3); os.dup2({from_browser_w}, 4); "
                    "os.execv(sys.argv[1], sys.argv[1:])")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", launcher,
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            # Every name but loopback is not found, even if something resolves locally.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
            "--remote-debugging-pipe", "--window-size=1400,800", f"--user-data-dir={home / 'profile'}",
            "about:blank",
            env=dict(os.environ, HOME=str(home), TMPDIR=str(home)), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            pass_fds=(to_browser_r, from_browser_w), start_new_session=True,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        loop = asyncio.get_running_loop()
        self.reader = asyncio.StreamReader(limit=64 * 1024 * 1024)  # a screenshot is one message
        self.read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(self.reader),
                                     os.fdopen(from_browser_r, "rb", 0))
        self.writer, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(to_browser_w, "wb", 0))
        self.read_task = asyncio.create_task(self._read())
        # A page of its own: the one it opens at start may not be there yet.
        page = await self.send("Target.createTarget", url="about:blank")
        attached = await self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)
        self.session = attached["sessionId"]
        await self.send("Page.enable")
        return self

    async def _read(self) -> None:
        try:
            while True:
                message = json.loads((await self.reader.readuntil(b"\0"))[:-1])
                if "id" in message:
                    futures = [self.pending.pop(message["id"], None)]
                else:  # an event
                    futures = self.awaited.pop(message["method"], [])
                for future in futures:
                    if future is not None and not future.done():
                        future.set_result(message)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        for future in [*self.pending.values(), *(f for fs in self.awaited.values() for f in fs)]:
            if not future.done():
                future.set_exception(ConnectionError("Chromium closed its DevTools pipe"))

    async def navigate(self, url: str) -> None:
        """Open `url` in the page and wait for its load event, so that what is
        evaluated next runs in its document."""
        loaded = asyncio.get_running_loop().create_future()
        self.awaited.setdefault("Page.loadEventFired", []).append(loaded)
        await self.send("Page.navigate", url=url)
        await asyncio.wait_for(loaded, DEADLINE)

    async def send(self, method: str, timeout: float = DEADLINE, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        self.writer.write(json.dumps(message).encode() + b"\0")
        answer = await asyncio.wait_for(future, timeout)
        if "error" in answer:
            raise AssertionError(f"{method}: {answer['error']}")
        return answer["result"]

    async def evaluate(self, expression: str):
        answer = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return answer["result"].get("value")

    async def command(self, name: str, *arguments: str) -> dict:
        """`POST /commands/<name>` from mitmweb's page, as its own command bar
        sends it: with the page's auth cookie (mitmweb 12) and the XSRF token
        from the cookie mitmweb set, echoed in a header."""
        body = json.dumps({"arguments": list(arguments)})
        script = """(async (path, body) => {
            const xsrf = document.cookie.split("; ").find(c => c.split("=")[0].includes("xsrf")).split("=")[1];
            const headers = {"Content-Type": "application/json", "X-XSRFToken": xsrf};
            const r = await fetch(path, {method: "POST", body, headers});
            return {status: r.status, body: await r.text()};
        })"""
        answer = await self.send("Runtime.evaluate", awaitPromise=True, returnByValue=True,
                                 expression=f"{script}({json.dumps('/commands/' + name)}, {json.dumps(body)})")
        assert "exceptionDetails" not in answer, answer
        result = answer["result"]["value"]
        assert result["status"] == 200, result
        return json.loads(result["body"])

    async def wait_for_text(self, *needles: str) -> str:
        """The page's text once it holds every needle: the page renders what
        mitmweb pushes over its own WebSocket, and a MutationObserver in it
        answers at the first change that shows them all (or at DEADLINE)."""
        answer = await self.send("Runtime.evaluate", timeout=DEADLINE + 5, awaitPromise=True, returnByValue=True,
                                 expression=f"({TEXT_SHOWN})({json.dumps(needles)}, {DEADLINE * 1000})")
        assert "exceptionDetails" not in answer, answer
        shown = answer["result"]["value"]
        if not shown["all"]:
            raise AssertionError(f"mitmweb's page never showed {needles}:\n{shown['text']}")
        return shown["text"]

    async def stop(self) -> None:
        if self.proc is None:
            return
        await chromium.stop(self.proc)
        # Chromium's crash handler leaves the group and may hold the pipe a
        # while longer: stop reading instead of waiting for its end.
        self.writer.close()
        self.read_task.cancel()
        self.read_transport.close()


class Mitmweb(Mitmdump):
    """mitmweb with the addon: conftest's Mitmdump (its log, its records, its
    stop by pid), started as mitmweb with the Comment column on."""

    def __init__(self, upstream: str, report: Path, home: Path):
        # The Comment column is not among mitmweb's default columns: add it.
        columns = ["tls", "icon", "path", "method", "status", "size", "time", "comment"]
        super().__init__(
            "--mode", f"reverse:{upstream}", "--web-host", "127.0.0.1", "--web-port", "0",
            "--set", "web_open_browser=false", *(a for c in columns for a in ("--set", f"web_columns={c}")),
            "--set", f"ws_encode_stall={STALL}", report=report, mitmdump=MITMWEB, env={"HOME": str(home)},
        )

    async def __aenter__(self) -> Mitmweb:
        await super().__aenter__()
        # mitmweb 12 prints its UI's URL with a fresh token (?token=...); 11 needs none.
        line = await self.wait_for("Web server listening at http://")
        # It says port 0, as it was given: the UI's is the other one it listens on.
        [web_port] = listening_ports(self._proc.pid) - {self.port}
        self.url = re.search(r"(http://\S+)", line).group(1).replace("127.0.0.1:0/", f"127.0.0.1:{web_port}/", 1)
        return self


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package chromium)")
def test_mitmweb_shows_the_mark_the_comment_and_answers_the_summary(tmp_path_factory, tmp_path):
    # A short folder for Chromium's HOME: its singleton socket must stay under 108 bytes.
    home = tmp_path_factory.mktemp("w")
    report = tmp_path / "report.jsonl"

    async def scenario():
        upstream = await withholding_server()
        web = await Mitmweb(f"http://127.0.0.1:{upstream.port}", report, home).__aenter__()
        browser = DevTools()
        try:
            client = await open_stalling_handshake(web.port)
            stall = await web.wait_for_record(event="stall")

            await browser.start(home)
            await browser.navigate(web.url)
            text = await browser.wait_for_text("/echo", "Comment", "Stall: no status")
            row = next(line for line in text.splitlines() if "Stall: no status" in line)
            assert stall["diagnosis"] in row, text  # the whole sentence is in the Comment cell
            assert MARK in text, text  # the mark, in the flow's row
            shot = await browser.send("Page.captureScreenshot", format="png")
            (tmp_path / "mitmweb-stalled.png").write_bytes(base64.b64decode(shot["data"]))

            client.close()
            end = await web.wait_for_record(event="handshake")
            text = await browser.wait_for_text("No status: the client gave up")
            row = next(line for line in text.splitlines() if "Stall: no status" in line)
            assert f"{stall['diagnosis']} {end['diagnosis']}" in flat(row), text  # the outcome after the stall
            shot = await browser.send("Page.captureScreenshot", format="png")
            (tmp_path / "mitmweb-ended.png").write_bytes(base64.b64decode(shot["data"]))

            answer = await browser.command("wsencode.summary")
            assert re.fullmatch(r"1 WebSocket handshakes? finished: 1 no-status \(1 over h1\)", answer["value"][0]), answer
            assert any(re.fullmatch(r"1 stalls? reported", line) for line in answer["value"]), answer
            assert answer["value"][-1] == f"report: {report}", answer
            stalls = await browser.command("wsencode.stalls")
            url = f"http://127.0.0.1:{upstream.port}/echo?token=REDACTED"
            assert stalls["value"][0] == f"[flow {stall['flow_id'][:8]}] {url}", stalls
            assert "frontend-secret" not in json.dumps([answer, stalls]) + report.read_text()

            # An HTTP/2 handshake that stalls and is given up: once it has its
            # outcome, its detail is the extended CONNECT its client sent; its
            # row keeps the mark, and the comment says where the proxy translated.
            h2_client = h2ws.H2WebSocketClient("127.0.0.1", web.port, server_hostname="localhost")
            await h2_client.connect()
            ws = await h2_client.open_websocket("/over-h2", "localhost", headers=[("accept-encoding", "br")])
            await web.wait_for_record(event="stall", transport="h2")
            await ws.reset()
            await web.wait_for_record(event="handshake", transport="h2")
            text = await browser.wait_for_text("/over-h2", "On the wire")
            lines = text.splitlines()
            at = next(i for i, line in enumerate(lines) if "/over-h2" in line)
            row = lines[at]
            assert re.search(r"Stall: no status .* No status: the client gave up .* On the wire: HTTP/2 extended "
                             r"CONNECT \(:protocol websocket\) /over-h2 → no status; the proxy sent the HTTP/1\.1 upstream a GET upgrade",
                             flat(row)), text
            assert MARK in lines[at - 1] + row, text  # the mark, in its row (the icon cell comes first)
            await browser.evaluate(
                "for (const type of ['mousedown', 'click']) [...document.querySelectorAll('tr')]"
                ".find(r => r.innerText.includes('/over-h2')).dispatchEvent(new MouseEvent(type, {bubbles: true}))"
            )
            text = await browser.wait_for_text(":protocol:")
            assert re.search(r"CONNECT\s+\S+/over-h2\s+HTTP/2\.0\s+:protocol:?\s+websocket", text), text
            assert "sec-websocket-key" not in text, text
            await h2_client.close()
        finally:
            await browser.stop()
            await web.stop()
            await upstream.stop()
        return web

    assert_clean_log(asyncio.run(scenario()))


# Screens as tmux showed them (80 columns; the status bar wraps), shortened to what the check reads.
BOX_TOP = "  >> GET h┌───────────────────────── Data viewer ────────────────────────┐      ⌛"
BOX_ROW = "          │    Stall: no status 1.0 s after a WebSocket handshake that   │"
BOX_END = "          └──────────────────────────────────────────────────────────────┘"
STATUS = ["⇩  [1/1]   [reverse:http://127.0.0.1:367                       [127.0.0.1:51741]",
          "95][scripts:2]", ": wsencode.stalls", ""]


@pytest.mark.parametrize("screen,whole", [
    (["Flows", BOX_TOP, BOX_ROW, BOX_ROW, BOX_END, "", "", *STATUS], True),
    (["Flows", BOX_TOP, *[BOX_ROW] * 5, *STATUS], True),  # as tall as the screen: the status bar covers its end
    (["Flows", BOX_TOP, BOX_ROW, BOX_ROW, "", "", "", *STATUS], False),  # (a shake run, mitmproxy 11)
    (["Flows", BOX_TOP, BOX_ROW, BOX_ROW[:11], BOX_END, *STATUS], False),  # (a CI run: a row's left edge only)
    (["Flows", BOX_TOP, *STATUS], False),
], ids=["ended", "to the status bar", "stops at a blank row", "a row half drawn", "no row"])
def test_a_data_viewer_is_whole_only_when_every_row_and_its_end_are_drawn(screen, whole):
    assert data_viewer_whole("\n".join(screen)) is whole
