"""The original report over HTTP/3: headless Chromium opens a WebSocket over
QUIC (RFC 9220) through mitmdump in reverse mode to the lab's HTTP/3 side.

Chromium sends `accept-encoding: gzip, deflate, br, zstd` on its extended
CONNECT. Behind `hold-until-body` the 200 waits for a message the page only
sends once it has the 200: the page hangs, the stall is reported while it
waits, and `strip` makes it open. Beside it, stock mitmdump, for what a user
meets without the addon.

mitmdump presents the test's own certificate (mitmproxy's `certs` option), so
Chromium can be told to trust its key: over QUIC only
--ignore-certificate-errors-spki-list is heeded.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path
from typing import NamedTuple

from aioquic.h3.connection import ErrorCode
from conftest import ADDON, Mitmdump, assert_clean_log
from mitmproxy import io as mitmio
from peers import chromium

from wslab.server import LabServer

pytestmark = chromium.MARKS

STALL = 1.0
# How long the page waits for its WebSocket to open before it gives up: long after the
# stall is due, so that the stall is reported while the page still waits.
GIVE_UP_S = 4
BROWSER = "gzip, deflate, br, zstd"
ERR_QUIC_PROTOCOL_ERROR = -356  # Chromium's net error

# The page reports once, what its WebSocket did ("open,echo:hi,close:1000",
# "error,close:1006", "gave-up"), straight to the lab's TCP side: past the
# proxy, so that what the proxy does to the QUIC connection cannot lose it.
# Then it closes its window, and Chromium exits, unless it leaves the
# WebSocket open after the echo.
PAGE = """<!doctype html><script>
const events = [];
let done = false;
const finish = (...last) => {{
  if (done) return;
  done = true;
  events.push(...last);
  fetch("https://127.0.0.1:{lab}/result?" + events.join(","), {{mode: "no-cors"}})
    .finally(() => {{ if (!{leave_open}) window.close(); }});
}};
// A request first, so Chromium has a QUIC connection to the origin: it only
// takes RFC 9220 on an existing one (with credentials, like a WebSocket's).
fetch("https://127.0.0.1:{proxy}/warmup", {{mode: "no-cors", credentials: "include"}}).then(() => {{
  const ws = new WebSocket("wss://127.0.0.1:{proxy}/echo");
  const giveUp = setTimeout(() => {{ finish("gave-up"); ws.close(); }}, {give_up_ms});
  ws.onopen = () => {{ clearTimeout(giveUp); events.push("open"); ws.send("hi"); }};
  ws.onmessage = (e) => {{
    events.push("echo:" + e.data);
    if ({leave_open}) finish(); else ws.close(1000);
  }};
  ws.onerror = () => events.push("error");
  ws.onclose = (e) => {{ clearTimeout(giveUp); finish("close:" + e.code); }};
}}, () => finish("warmup-failed"));
</script>"""


def leaf_pem(cert, folder: Path) -> Path:
    """The test's certificate and its key in one file, as mitmproxy's `certs`
    takes them: presented for every name, instead of a leaf of mitmproxy's CA."""
    certfile, keyfile = cert
    pem = folder / "leaf.pem"
    pem.write_bytes(Path(certfile).read_bytes() + Path(keyfile).read_bytes())
    return pem


def reverse_h3(lab: LabServer, cert, folder: Path, *options: str, report: Path | None = None,
               addon: Path = ADDON) -> Mitmdump:
    """mitmdump in front of the lab's HTTP/3 side, presenting the test's certificate."""
    return Mitmdump("--mode", f"reverse:http3://127.0.0.1:{lab.h3.port}", "--ssl-insecure",
                    "--set", f"certs=*={leaf_pem(cert, folder)}", *options, report=report, addon=addon)


async def open_page(lab: LabServer, md: Mitmdump, cert, home: Path, leave_open: bool = False,
                    extra: list[str] | None = None) -> asyncio.subprocess.Process:
    """Chromium on the page, QUIC to the proxy from its first request on."""
    html = PAGE.format(proxy=md.port, lab=lab.port, give_up_ms=GIVE_UP_S * 1000,
                       leave_open=str(leave_open).lower())
    return await chromium.start(chromium.page(html), home, quic=chromium.quic_flags(md.port, cert[0]),
                                extra=[chromium.DATA_PAGE_TO_LOOPBACK, *(extra or [])])


async def reported(lab: LabServer) -> str:
    # Bounded: the page reports within GIVE_UP_S of its warmup request.
    return urllib.parse.unquote(await asyncio.wait_for(lab.app.results.get(), 30))


def websockets_seen(lab: LabServer) -> list[tuple]:
    """(scope type, HTTP version, path, accept-encoding) of each WebSocket the lab got."""
    return [r for r in lab.app.requests if r[0] == "websocket"]


class Visit(NamedTuple):
    result: str  # what the page reported
    record: dict  # the handshake's
    records: list[dict]  # every record the addon wrote
    websockets: list[tuple]  # what the lab got (websockets_seen)
    md: Mitmdump


def visit(behaviour: str, cert, home: Path, folder: Path, report: Path, *options: str) -> Visit:
    """The page, through mitmdump with the addon, to the lab's `behaviour`,
    until the page reports and its handshake's record is written."""
    async def scenario():
        async with LabServer(behaviour, *cert, h3=True) as lab:
            async with reverse_h3(lab, cert, folder, "--set", f"ws_encode_stall={STALL}", *options,
                                  report=report) as md:
                browser = await open_page(lab, md, cert, home)
                try:
                    result = await reported(lab)
                    record = await md.wait_for_record(event="handshake", kind="websocket")
                finally:
                    await chromium.stop(browser)
            return Visit(result, record, md.records(), websockets_seen(lab), md)

    return asyncio.run(scenario())


def test_a_healthy_websocket_opens_over_http3_through_the_proxy_and_echoes(cert, home, report, tmp_path):
    flows_file = tmp_path / "flows.mitm"
    result, record, _, websockets, md = visit("fixed", cert, home, tmp_path, report, "-w", str(flows_file))
    assert result == "open,echo:hi,close:1000"
    # HTTP/3 on both sides: Chromium to the proxy, the proxy to the lab.
    assert (record["transport"], record["upstream_transport"], record["status"], record["outcome"]) == (
        "h3", "h3", 200, "upgraded")
    assert record["accept_encoding_client"] == BROWSER and not record["stalled"]
    assert websockets == [("websocket", "3", "/echo", BROWSER)]
    with flows_file.open("rb") as f:
        [flow] = [x for x in mitmio.FlowReader(f).stream() if x.websocket is not None]
    assert (flow.request.method, flow.request.http_version, flow.response.status_code) == ("CONNECT", "HTTP/3", 200)
    assert flow.request.headers[":protocol"] == "websocket"
    assert (flow.client_conn.alpn, flow.server_conn.alpn) == (b"h3", b"h3")
    assert [m.text for m in flow.websocket.messages] == ["hi", "hi"]
    assert (flow.websocket.closed_by_client, flow.websocket.close_code) == (True, 1000)
    assert_clean_log(md)


def test_the_encoder_bug_hangs_the_page_and_the_stall_is_reported_while_it_waits(cert, home, report, tmp_path):
    async def scenario():
        async with LabServer("hold-until-body", *cert, h3=True) as lab:
            async with reverse_h3(lab, cert, tmp_path, "--set", f"ws_encode_stall={STALL}", report=report) as md:
                browser = await open_page(lab, md, cert, home)
                try:
                    stall = await md.wait_for_record(event="stall", kind="websocket", timeout=30)
                    waiting = lab.app.results.empty()  # the page has not given up yet
                    result = await reported(lab)
                    end = await md.wait_for_record(event="handshake", kind="websocket")
                finally:
                    await chromium.stop(browser)
            return stall, waiting, result, end, websockets_seen(lab), md

    stall, waiting, result, end, websockets, md = asyncio.run(scenario())
    assert waiting and result == "gave-up"  # no status, no error, no close in GIVE_UP_S: a hang
    assert (stall["transport"], stall["upstream_transport"], stall["stuck_in"], stall["status"]) == (
        "h3", "h3", "forwarded", None)
    assert stall["accept_encoding_client"] == BROWSER
    assert "an encoding layer upstream is probably holding the response status" in stall["diagnosis"]
    # The page's close after it gave up resets the stream: the handshake ends without a status.
    assert (end["outcome"], end["stalled"]) == ("no-status", True) and "client gave up" in end["diagnosis"]
    assert [r["event"] for r in md.records()] == ["stall", "handshake"]
    assert websockets == [("websocket", "3", "/echo", BROWSER)]
    assert_clean_log(md)


def test_strip_opens_the_same_page_at_once(cert, home, report, tmp_path):
    result, record, records, websockets, md = visit("hold-until-body", cert, home, tmp_path, report,
                                                    "--set", "ws_encode_policy=strip")
    assert result == "open,echo:hi,close:1000"
    assert [r["event"] for r in records] == ["handshake"]  # opened before a stall was due
    assert (record["transport"], record["upstream_transport"], record["policy"], record["outcome"]) == (
        "h3", "h3", "strip", "upgraded")
    assert (record["accept_encoding_client"], record["accept_encoding_upstream"]) == (BROWSER, None)
    assert websockets == [("websocket", "3", "/echo", None)]
    assert_clean_log(md)


def test_mitmdump_stopped_with_chromiums_websocket_open_exits_cleanly(cert, home, report, tmp_path):
    """A user's Ctrl-C with a page's WebSocket open: mitmproxy closes the
    client's connection and the lab's, and each side's end reaches the
    WebSocket layer after it has finished (it crashed on an error there)."""
    async def scenario():
        async with LabServer("fixed", *cert, h3=True) as lab:
            async with reverse_h3(lab, cert, tmp_path, report=report) as md:
                browser = await open_page(lab, md, cert, home, leave_open=True)
                try:
                    result = await reported(lab)
                    # (Its exit status is not asserted: stock mitmdump too
                    # sometimes ends with SIGSEGV when stopped with a QUIC
                    # connection open.)
                    await md.stop()
                finally:
                    await chromium.stop(browser)
            return result, md

    result, md = asyncio.run(scenario())
    assert result == "open,echo:hi"
    assert_clean_log(md)


def test_stock_mitmdump_closes_chromiums_quic_connection_at_its_extended_connect(cert, home, tmp_path):
    """What a user of stock mitmproxy sees: the page's request goes through
    over HTTP/3, and its WebSocket fails at once with an error event and
    close code 1006; Chromium does not try it another way. mitmdump prints a
    client connect and disconnect, no flow and no reason: only Chromium's
    network log (--log-net-log) shows why."""
    nothing = tmp_path / "nothing.py"
    nothing.write_text("")
    net_log = tmp_path / "netlog.json"

    async def scenario():
        async with LabServer("fixed", *cert, h3=True) as lab:
            async with reverse_h3(lab, cert, tmp_path, addon=nothing) as md:
                browser = await open_page(lab, md, cert, home, extra=[chromium.net_log_flag(net_log)])
                try:
                    result = await reported(lab)
                    await asyncio.wait_for(browser.wait(), 15)  # its network log finished
                finally:
                    await chromium.stop(browser)
            return result, lab.app.requests, md

    result, requests, md = asyncio.run(scenario())
    assert result == "error,close:1006"
    events = chromium.net_log(net_log)
    connect = next(e for e in events if e.name == "HTTP3_HEADERS_SENT" and ":method: CONNECT" in e.params["headers"])
    assert ":protocol: websocket" in connect.params["headers"]
    session = [e for e in events if e.source == connect.source]  # the QUIC connection to the proxy
    [settings] = [e.params for e in session if e.name == "HTTP3_SETTINGS_RECEIVED"]
    assert settings["SETTINGS_ENABLE_CONNECT_PROTOCOL"] == 1  # mitmproxy advertises RFC 9220 (aioquic's default)...
    # ...and closes the whole connection for the extended CONNECT that believes it.
    [closed] = [e.params for e in session if e.name == "QUIC_SESSION_CONNECTION_CLOSE_FRAME_RECEIVED"]
    assert closed["quic_wire_error"] == ErrorCode.H3_GENERAL_PROTOCOL_ERROR
    assert closed["details"] == "Invalid HTTP/3 request headers: Unknown pseudo headers: {b':protocol': b'websocket'}"
    assert any(e.name == "REQUEST_ALIVE" and e.params.get("net_error") == ERR_QUIC_PROTOCOL_ERROR
               for e in events)  # the WebSocket's request
    assert ("http", "3", "/warmup", BROWSER) in requests and not any(r[0] == "websocket" for r in requests)
    assert not any("CONNECT" in line or "/echo" in line for line in md.lines)
    assert any(line.endswith("client disconnect") for line in md.lines)
    assert_clean_log(md)
