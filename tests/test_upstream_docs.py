"""The mitmproxy issue texts in docs/ stay true, and docs/upstream.md names what exists.

Each issue text (docs/mitmproxy-issue-*.md) gives a loopback reproduction: ```sh blocks (mitmdump's
command, then the client's), ```python blocks (each file named on its first line, `# NAME.py:`) and
```text blocks (what the client prints, then what mitmdump prints, in the order the text shows
them). The tests run them as written, with three changes: mitmdump listens on a port of its own
(the Mitmdump helper's `-p 0`) instead of the text's 8443, the origin gets a free port instead of
8444, and `python3` is this line's Python. They run against this line's stock mitmdump (an empty
script instead of ws-encode; the suite's loopback guard stays loaded), asserting the defect as the
text states it, and then with ws-encode loaded, asserting what the addon avoids (and, where
docs/upstream.md says so, what it does not).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import re
import shlex
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

import aioquic.h3.connection
from aioquic.quic.configuration import QuicConfiguration
import mitmproxy.version
import pytest
from conftest import ADDON, ROOT, Mitmdump
from mitmdump_proc import STARTED, free_ports
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import websocket
from mitmproxy.proxy.layers.http import _http1, _http2, _http3, _http_h3
from wspeers import h3ws

pytestmark = pytest.mark.timeout(120)

DOCS = ROOT / "docs"
PROXY_PORT, ORIGIN_PORT = "8443", "8444"  # as the texts write them
VERSION = mitmproxy.version.VERSION
LINE = VERSION.split(".")[0]
CLIENT_CONNECT = r"\] client connect$"
CLIENT_DISCONNECT = r"\] client disconnect$"
SERVER_CONNECT = r"\] server connect "
SERVER_DISCONNECT = r"\] server disconnect "


# -- the texts, read --

@dataclass
class Text:
    whole: str
    files: dict[str, str]  # the ```python blocks, by the name on their first line
    runs: list[list[list[str]]]  # the ```sh blocks, as commands of words
    outputs: list[str]  # the ```text blocks
    raw: list[str]  # the ```raw blocks (System Information)


def fenced(text: str, kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```", text, re.S | re.M)


def read(name: str) -> Text:
    whole = (DOCS / name).read_text()
    files = {}
    for source in fenced(whole, "python"):
        first = re.match(r"# (\w+\.py): ", source)
        assert first, f"a python block of {name} does not name its file on its first line:\n{source[:200]}"
        files[first.group(1)] = source
    runs = [[shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
            for block in fenced(whole, "sh")]
    return Text(whole, files, runs, fenced(whole, "text"), fenced(whole, "raw"))


EXTENDED_CONNECT = read("mitmproxy-issue-h3-extended-connect.md")
STREAM_ZERO = read("mitmproxy-issue-h3-stream-zero.md")


# -- running a reproduction --

def free_port() -> int:
    """A port free on 127.0.0.1 for UDP and TCP alike (the stream-zero origin takes both),
    from outside the range the system hands every outgoing connection: the text's origin
    binds it a moment after this has let it go (free_ports)."""
    while True:
        [port] = free_ports(1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def mitmdump_args(command: list[str], files: dict[str, Path], origin: int) -> list[str]:
    """The text's mitmdump command as the Mitmdump helper's arguments."""
    assert command[0] == "mitmdump", command
    args = command[1:]
    # The text's own listen address: the helper listens on 127.0.0.1 too, on a free port.
    for flag, value in (("--listen-host", "127.0.0.1"), ("-p", PROXY_PORT)):
        at = args.index(flag)
        assert args[at + 1] == value, command
        del args[at:at + 2]
    return [str(files[a]) if a in files else a.replace(f":{ORIGIN_PORT}", f":{origin}") for a in args]


async def run_client(command: list[str], files: dict[str, Path], proxy: int, origin: int) -> str:
    assert command[0] == "python3" and command[1] in files, command
    ports = {PROXY_PORT: str(proxy), ORIGIN_PORT: str(origin)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(files[command[1]]), *[ports.get(a, a) for a in command[2:]],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    except asyncio.TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        raise AssertionError(f"{command} did not finish:\n{out.decode()}")
    assert proc.returncode == 0, out.decode()
    return out.decode()


@dataclass
class Run:
    printed: str  # what the client printed
    log: list[str]  # mitmdump's lines, once every client connection had ended


def reproduce(text: Text, run: list[list[str]], folder: Path, addon: Path, *extra: str) -> Run:
    """One ```sh block of `text`: its mitmdump (with `addon`, and `extra` options) and its client."""
    files = {}
    for name, source in text.files.items():
        files[name] = folder / name
        files[name].write_text(source)
    proxy_command, client_command = run
    origin = free_port()

    async def scenario() -> Run:
        async with Mitmdump(*mitmdump_args(proxy_command, files, origin), *extra, addon=addon) as md:
            printed = await run_client(client_command, files, md.port, origin)
            connects = sum(bool(re.search(CLIENT_CONNECT, line)) for line in md.lines)
            assert connects > 0, md.log
            await md.wait_for_count(CLIENT_DISCONNECT, connects)
            # mitmproxy ends a server connection after its client's (and may crash again there,
            # which the stream-zero text quotes): every one is waited for too.
            upstreams = sum(bool(re.search(SERVER_CONNECT, line)) for line in md.lines)
            await md.wait_for_count(SERVER_DISCONNECT, upstreams)
            return Run(printed, list(md.lines))

    return asyncio.run(scenario())


@pytest.fixture
def stock(tmp_path) -> Path:
    """mitmdump without ws-encode: an empty script where the addon would be."""
    nothing = tmp_path / "nothing.py"
    nothing.write_text("")
    return nothing


# -- reading mitmdump's output --

CLIENT_LINE = re.compile(r"^\[[\d:.]+\]\[([\d.]+:\d+)\] ")  # [time][client] ...
FLOW_LINE = re.compile(r"^([\d.]+:\d+)[: ]")  # client: GET ..., client <- WebSocket message ...
CRASH = "mitmproxy has crashed!"


def sessions(log: list[str]) -> list[list[str]]:
    """mitmdump's lines by client connection, in the order the clients connected; a line that
    names no client (a traceback, a flow's `<<` line) goes with the one before it."""
    order: list[str] = []
    lines_of: dict[str, list[str]] = {}
    current = None
    for line in log:
        named = CLIENT_LINE.match(line) or FLOW_LINE.match(line)
        if named:
            current = named.group(1)
            if current not in lines_of:
                order.append(current)
                lines_of[current] = []
        if current is not None:
            lines_of[current].append(line)
    return [lines_of[client] for client in order]


def crashes(session: list[str]) -> list[list[str]]:
    """Each "mitmproxy has crashed!" of a session, with its traceback (up to the next line that
    names a client)."""
    blocks: list[list[str]] = []
    in_traceback = False
    for line in session:
        if CRASH in line:
            blocks.append([line])
            in_traceback = True
        elif CLIENT_LINE.match(line) or FLOW_LINE.match(line):
            in_traceback = False
        elif in_traceback:
            blocks[-1].append(line)
    return blocks


FRAME = re.compile(r'^  File ".*?(mitmproxy/[\w/]+\.py)", line (\d+), in (\w+)$')


def frames(traceback: list[str]) -> list[tuple[str, str, str, str]]:
    """(file from mitmproxy/ on, line, function, source line) of each frame."""
    found = []
    for at, line in enumerate(traceback):
        frame = FRAME.match(line)
        if frame:
            source = traceback[at + 1].strip() if at + 1 < len(traceback) else ""
            found.append((*frame.groups(), source))
    return found


def flow_lines(session: list[str]) -> list[str]:
    return [line for line in session if FLOW_LINE.match(line) or line.startswith(" << ")]


def normalized(lines: list[str]) -> list[str]:
    """Times and ports aside; the test's own scripts' loading, and their word that every
    addon has started (STARTED), left out."""
    return [re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:N", re.sub(r"^\[\d\d:\d\d:\d\d\.\d{3}\]", "[T]", line))
            for line in lines if "Loading script" not in line and STARTED not in line]


def passthrough_asserts(session: list[str]) -> list[list[str]]:
    return [c for c in crashes(session) if frames(c) and frames(c)[-1][2] == "passthrough" and c[-1] == "AssertionError"]


def websocket_layer_crashes(session: list[str]) -> list[list[str]]:
    # (in relay_messages, or in done if the origin's close came first)
    return [c for c in crashes(session) if re.match(r"AssertionError: Unexpected event type at WebsocketLayer\.\w+: ", c[-1])]


# -- the extended CONNECT that closes the whole QUIC connection --

def test_the_extended_connect_text_is_whole():
    text = EXTENDED_CONNECT
    assert set(text.files) == {"h3_extended_connect.py"} and len(text.runs) == 1 and len(text.outputs) == 2
    assert "### Problem Description" in text.whole and "### Steps to reproduce the behavior:" in text.whole
    assert "### System Information" in text.whole and len(text.raw) == 1


def test_stock_mitmdump_closes_the_whole_connection_as_the_text_says(tmp_path, stock):
    run = reproduce(EXTENDED_CONNECT, EXTENDED_CONNECT.runs[0], tmp_path, stock)
    printed, mitmdump_says = EXTENDED_CONNECT.outputs
    assert run.printed == printed
    # mitmdump's output, line for line: nothing on the first connection, the POST's flow failing
    # with the extended CONNECT's reason on the second.
    assert normalized(run.log) == normalized(mitmdump_says.splitlines()), "\n".join(run.log)


def test_stock_mitmdump_says_why_in_its_debug_trace(tmp_path, stock):
    run = reproduce(EXTENDED_CONNECT, EXTENDED_CONNECT.runs[0], tmp_path, stock,
                    "--set", "proxy_debug=true", "--set", "termlog_verbosity=debug")
    assert "--set proxy_debug=true --set termlog_verbosity=debug" in EXTENDED_CONNECT.whole
    assert "closed by the proxy, 0x101 H3_GENERAL_PROTOCOL_ERROR" in run.printed
    reason = "Invalid HTTP/3 request headers: Unknown pseudo headers: {b':protocol': b'websocket'}"
    assert sum(reason in line for line in sessions(run.log)[0]) >= 1  # (the first connection: no flow)


def test_with_the_addon_each_extended_connect_is_answered_on_its_stream(tmp_path):
    run = reproduce(EXTENDED_CONNECT, EXTENDED_CONNECT.runs[0], tmp_path, ADDON)
    lines = run.printed.splitlines()
    assert "closed by the proxy" not in run.printed
    assert lines.count("  the QUIC connection: open") == 2, run.printed
    assert lines.count("  the proxy's SETTINGS_ENABLE_CONNECT_PROTOCOL: 1") == 2  # (it carries them)
    # Nothing listens at the origin: each extended CONNECT, and the finished POST, get the
    # proxy's answer on their own streams.
    assert lines[2] == "  stream 0, extended CONNECT /chat: 502", run.printed
    assert lines[6:8] == ["  stream 0, POST /upload: 502", "  stream 4, extended CONNECT /chat: 502"], run.printed
    assert not any("Traceback" in line or CRASH in line for line in run.log), "\n".join(run.log)


# -- a QUIC client back from the same port --

def test_stock_mitmdump_leaves_a_quic_client_back_from_the_same_port_unanswered(cert, stock):
    """docs/upstream.md, "A QUIC client back from the same port": the reason every client of
    the peers' (h3ws.client_endpoint) comes from a port it has not used towards that proxy."""
    configuration = QuicConfiguration(is_client=True, alpn_protocols=h3ws.ALPN, server_name="localhost",
                                      verify_mode=ssl.CERT_NONE)

    async def settings_from(md: Mitmdump, sock: socket.socket) -> bool:
        """Whether a QUIC connection on `sock` gets the proxy's SETTINGS; then closed, with `sock`."""
        answered = asyncio.Event()

        def on_event(event) -> None:
            if isinstance(event, h3ws.SettingsReceived):
                answered.set()

        transport, peer = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: h3ws.H3Peer(h3ws.HeldWindowQuic(configuration=configuration), on_event), sock=sock)
        try:
            peer.connect(("127.0.0.1", md.port))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(answered.wait(), UNANSWERED)
            peer.close_connection()
            with contextlib.suppress(asyncio.TimeoutError):  # (one never answered may close slowly)
                await asyncio.wait_for(peer.wait_closed(), 5)
        finally:
            transport.close()
        return answered.is_set()

    async def scenario():
        async with h3ws.H3WebSocketServer(*cert) as origin:
            async with Mitmdump("--mode", f"reverse:http3://127.0.0.1:{origin.port}", "--ssl-insecure",
                                addon=stock) as md:
                sock, other = udp_socket(), udp_socket()
                same_port = sock.dup()  # (kept bound while the first connection's socket closes)
                first = await settings_from(md, sock)
                await md.wait_for(CLIENT_DISCONNECT)  # mitmproxy is done with that connection
                again = await settings_from(md, same_port)
                elsewhere = await settings_from(md, other)
                return first, again, elsewhere, md.log

    first, again, elsewhere, log = asyncio.run(scenario())
    assert first and elsewhere, log
    assert not again, log
    assert "A QUIC client back from the same port" in (DOCS / "upstream.md").read_text()


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


UNANSWERED = 3.0  # seconds a connection waits for SETTINGS a healthy proxy sends in milliseconds


# -- stream 0 in the HTTP/1.1 upstream codec --

def test_the_stream_zero_text_is_whole():
    text = STREAM_ZERO
    assert set(text.files) == {"over_tcp.py", "h3_stream_zero.py"} and len(text.runs) == 2
    assert len(text.outputs) == 4 and len(text.raw) == 1
    assert "### Problem Description" in text.whole and "### Steps to reproduce the behavior:" in text.whole
    # The first run loads the reporter's addon; the second needs none, only stock options.
    assert "-s" in text.runs[0][0] and "over_tcp.py" in text.runs[0][0]
    assert "-s" not in text.runs[1][0] and "--map-remote" in text.runs[1][0]
    code = [line for line in text.files["over_tcp.py"].splitlines() if line.strip() and not line.startswith("#")]
    assert len(code) == 4 and "a four-line addon" in text.whole, code


def test_stock_mitmdump_fails_stream_zero_over_tcp_as_the_text_says(tmp_path, stock):
    run = reproduce(STREAM_ZERO, STREAM_ZERO.runs[0], tmp_path, stock)
    printed, part1, traceback, _ = STREAM_ZERO.outputs
    assert run.printed == printed
    closes, upgrade0, upgrade4 = sessions(run.log)
    # Part 1: stream 4's flow fails at once; stream 0's only with the client's own close.
    assert normalized(flow_lines(closes)) == normalized(part1.splitlines()), "\n".join(closes)
    assert not crashes(closes)
    # Part 2: the crash the text quotes, then again when mitmproxy closes the server connection.
    asserts = passthrough_asserts(upgrade0)
    assert len(asserts) >= 2, "\n".join(upgrade0)
    assert_same_frames(asserts[0], traceback.splitlines())
    assert not any("WebSocket text message" in line for line in upgrade0)
    # Part 3: no such crash on stream 4; the greeting reaches the WebSocket layer. The troubles
    # the text lists as "also seen" are there, on stream 4.
    assert not passthrough_asserts(upgrade4), "\n".join(upgrade4)
    assert any("<- WebSocket text message <-" in line for line in upgrade4)
    assert any("DATA frame is not allowed in this state" in line for line in upgrade4)
    crashed = websocket_layer_crashes(upgrade4)
    assert crashed and all("got RequestProtocolError(stream_id=4," in c[-1] for c in crashed), "\n".join(upgrade4)
    # (Part 2's session mostly shows the WebSocket layer's crash too, at the client's close, but
    # once under load, on mitmproxy 11, it did not: after the first crash, what mitmproxy still
    # does with the stream depends on timing. The text claims it for stream 4 alone.)


def assert_same_frames(crash: list[str], quoted: list[str]) -> None:
    """The text's traceback, as mitmdump printed it: its frames end the crash's traceback, with
    the same line numbers on the line the text quotes (12.3.1) and the same functions and
    source lines on both."""
    assert CRASH in quoted[0] and quoted[-1] == crash[-1] == "AssertionError"
    theirs, ours = frames(quoted), frames(crash)[-6:]
    assert len(theirs) == 6 and theirs[-1][2:] == ("passthrough", "assert self.stream_id"), theirs
    if VERSION == "12.3.1":  # the version whose line numbers the text quotes
        assert ours == theirs, "\n".join(crash)
    else:
        assert [(f, fn, src) for f, _, fn, src in ours] == [(f, fn, src) for f, _, fn, src in theirs], "\n".join(crash)


def test_stock_mitmdump_fails_stream_zero_with_stock_options_alone(tmp_path, stock):
    run = reproduce(STREAM_ZERO, STREAM_ZERO.runs[1], tmp_path, stock)
    _, _, traceback, printed = STREAM_ZERO.outputs
    assert run.printed == printed
    upgrade0, upgrade4 = sessions(run.log)
    asserts = passthrough_asserts(upgrade0)
    assert asserts, "\n".join(upgrade0)
    assert_same_frames(asserts[0], traceback.splitlines())  # "the same way"
    assert not passthrough_asserts(upgrade4), "\n".join(upgrade4)
    # Plain HTTP/1.1 to the origin (http://), on the client's transport: UDP, with no script to change it.
    assert any(re.search(r": GET http://127\.0\.0\.1:\d+/chat HTTP/3$", line) for line in upgrade0)


@pytest.mark.parametrize("run_index", [0, 1], ids=["over TCP, with the reporter's addon", "over UDP, stock options"])
def test_with_the_addon_stream_zero_is_a_stream_like_any_other(tmp_path, run_index):
    run = reproduce(STREAM_ZERO, STREAM_ZERO.runs[run_index], tmp_path, ADDON)
    log = "\n".join(run.log)
    assert "assert self.stream_id" not in log, log
    found = sessions(run.log)
    if run_index == 0:
        assert "  stream 0, GET /close: 502\n  stream 4, GET /close: 502\n" in run.printed, run.printed
        found = found[1:]
    # Parts 2 and 3 as stock prints them, but for the upgrades: an HTTP/3 request with connection
    # fields is malformed (RFC 9114 section 4.2), and the bridge refuses it on its own stream
    # (docs/upstream.md); the connection serves the GET between them.
    assert run.printed.endswith(STREAM_ZERO.outputs[3].replace("(upgrade: websocket): 101", "(upgrade: websocket): 400")), run.printed
    assert sum("connection-specific field" in line for line in run.log) == 2, log
    assert not any(CRASH in line for session in found for line in session), log


# -- what the texts say of versions, and the names they use --

def test_the_texts_name_the_versions_tested():
    for text in (EXTENDED_CONNECT, STREAM_ZERO):
        [raw] = text.raw
        assert raw.startswith("Mitmproxy: 12.3.1\n") and "on mitmproxy 11.0.2" in text.whole
        if LINE == "12":
            assert raw.startswith(f"Mitmproxy: {VERSION}\n")
        else:
            assert f"on mitmproxy {VERSION} " in text.whole


def stock_classes() -> dict[str, type]:
    """The classes of mitmproxy's HTTP and WebSocket layers, and aioquic's HTTP/3 ones, by name.
    `ErrorCode` is mitmproxy's (12 only; the texts say so), never aioquic's of the same name."""
    found = {}
    for module in (_http1, _http2, _http3, _http_h3, http_layers, websocket, aioquic.h3.connection):
        for name, value in vars(module).items():
            if inspect.isclass(value) and not (name == "ErrorCode" and value.__module__.startswith("aioquic")):
                found.setdefault(name, value)
    return found


def bridge_names() -> dict[str, object]:
    """The bridge's modules, and what they define (classes, functions, constants), by name."""
    found = {}
    for name in ("common", "h1", "h2", "h3", "stream", "internals", "selftest"):
        module = importlib.import_module(f"wsencode.bridge.{name}")
        found[name] = module
        for attr, value in vars(module).items():
            defined_here = getattr(value, "__module__", None) == module.__name__
            constant = not callable(value) and not inspect.ismodule(value)
            if defined_here or constant:
                found.setdefault(attr, value)
    return found


STOCK_MODULES = {"_http1": _http1, "_http2": _http2, "_http3": _http3, "_http_h3": _http_h3}


def test_the_docs_name_only_what_exists():
    """Every `Class.attribute` the texts name, in the bridge or in this line's mitmproxy, and
    every bridge name they use bare, exists; every `addon/...` or `bridge/...` path too."""
    bridge, stock_ = bridge_names(), stock_classes()
    checked = 0
    for name in ("upstream.md", "mitmproxy-issue-h3-extended-connect.md", "mitmproxy-issue-h3-stream-zero.md"):
        text = (DOCS / name).read_text()
        text = "\n".join(b for b in re.split(r"^```.*?^```", text, flags=re.S | re.M))  # prose only
        for token in re.findall(r"`([\w./]+)`", text):
            parts = token.split(".")
            if token.startswith(("addon/", "bridge/", "tests/")):
                path = ROOT / "addon" / "wsencode" / token if token.startswith("bridge/") else ROOT / token
                assert path.exists(), f"{name}: {token}"
            elif len(parts) == 2 and parts[0] in bridge and parts[1] not in ("py", "md"):
                assert hasattr(bridge[parts[0]], parts[1]), f"{name}: {token}"
            elif len(parts) == 2 and parts[0] in stock_:
                assert hasattr(stock_[parts[0]], parts[1]), f"{name}: {token} (mitmproxy {VERSION})"
            elif len(parts) == 2 and parts[0] in STOCK_MODULES and parts[1] != "py":
                assert hasattr(STOCK_MODULES[parts[0]], parts[1]), f"{name}: {token} (mitmproxy {VERSION})"
            elif len(parts) == 3 and parts[0] == "core":
                assert hasattr(importlib.import_module(f"wsencode.{parts[0]}.{parts[1]}"), parts[2]), f"{name}: {token}"
            elif len(parts) == 1 and re.fullmatch(r"(Ws|Quiet)\w+|NeedsHttp1|STREAM_ZERO|\w+Address|Backlog|MAX_\w+"
                                                 r"|offer_alpn|as_upgrade|is_passthrough_close|_\w+", token):
                # A bridge name, or a method named after its class ("here `WsHttp1Client.send`, `_answer`").
                places = [*bridge.values(), *stock_.values()] if token.startswith("_") else bridge.values()
                assert token in bridge or any(hasattr(v, token) for v in places if inspect.isclass(v)), \
                    f"{name}: {token}"
            else:
                continue
            checked += 1
    assert checked >= 80, checked  # (the parsing itself: a text with no names would pass)
