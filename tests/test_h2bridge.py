"""Installing and removing the HTTP/2 bridge: the one place that touches mitmproxy internals."""

from __future__ import annotations

import asyncio
import logging

import json
import re

import h2.errors
import pytest
import ws_encode
from conftest import ADDON, ROOT, Mitmdump, addon_copy, assert_clean_log, h2_echo_once, reload_script, upgrade_request
from wspeers.fault_server import Faults, FaultServer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1, _http2
from mitmproxy.test import taddons
from wspeers import h2ws
from wspeers.h2ws import DualAlpnServer

from wsencode.bridge import internals
from wsencode.core.extconnect import MAX_EARLY_BYTES
from wsencode.bridge.h2 import WsHttp2Client, WsHttp2Server
from wsencode.bridge.stream import WsHttpStream
from wsencode.bridge import Bridge

STOCK = {"Http2Server": _http2.Http2Server, "Http2Client": _http2.Http2Client}


def current() -> dict[str, type]:
    return {name: getattr(http_layers, name) for name in STOCK}


@pytest.fixture(autouse=True)
def stock_afterwards():
    stream = http_layers.HttpStream
    yield
    for name, cls in STOCK.items():
        setattr(http_layers, name, cls)
    http_layers.HttpStream = stream


BRIDGED = {"Http2Server": WsHttp2Server, "Http2Client": WsHttp2Client}


def test_install_swaps_the_classes_and_uninstall_restores_them():
    stream = http_layers.HttpStream
    bridge = Bridge()
    bridge.install(h2=False, h3=False)  # off from the start: nothing of mitmproxy's HTTP/2 is replaced
    assert current() == STOCK and http_layers.HttpStream is stream and not bridge.installed
    bridge.install(h2=True, h3=True)
    bridge.install(h2=True, h3=True)  # idempotent
    assert current() == BRIDGED and http_layers.HttpStream is WsHttpStream
    # Turned off: new client connections are stock; what connections opened
    # before may still need (the stream, the upstream codecs) stays.
    bridge.install(h2=False, h3=True)
    assert current() == {**BRIDGED, "Http2Server": STOCK["Http2Server"]} and http_layers.HttpStream is WsHttpStream
    bridge.uninstall()
    bridge.uninstall()
    assert current() == STOCK and http_layers.HttpStream is stream


def test_the_option_and_unloading_drive_the_bridge():
    stream = http_layers.HttpStream
    addon = ws_encode.WsEncode()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ws_encode_h2="true")
        assert http_layers.Http2Server is WsHttp2Server
        tctx.configure(addon, ws_encode_h2="false")
        assert http_layers.Http2Server is STOCK["Http2Server"] and http_layers.HttpStream is WsHttpStream
        tctx.configure(addon, ws_encode_h2="true")
        addon.done()
        assert current() == STOCK and http_layers.HttpStream is stream


def test_this_mitmproxy_has_everything_the_bridge_uses():
    assert internals.incompatibility() is None


class MovedHttpLayer(http_layers.HttpLayer):
    """As if HttpLayer had moved to a module of its own, importing the
    classes it makes: its functions would not see the bridge's."""

    def make_stream(self, stream_id):
        raise AssertionError("never called")

    get_connection = _handle_event = make_stream


def passthrough_nothing(self, event):  # as if mitmproxy's stream no longer relayed an upgraded stream
    yield from ()


def refuse_every_status(h2_headers):  # as if mitmproxy's HTTP/2 client could not read a response any more
    raise ValueError("changed")


def read_no_head(self, event):  # as if mitmproxy's HTTP/1.1 client read responses some other way
    yield from ()


@pytest.mark.parametrize("change, named", [
    (lambda mp: mp.setattr(http_layers.HttpStream, "passthrough", passthrough_nothing),
     "the WebSocket's messages go upstream on the stream"),
    (lambda mp: mp.setattr(_http2, "parse_h2_response_headers", refuse_every_status),
     "the HTTP/2 upstream codec hands the stream the upstream's 2xx"),
    (lambda mp: mp.setattr(_http1.Http1Client, "read_headers", read_no_head),
     "the HTTP/1.1 upstream codec hands the stream a 200 for the 101 that answers its key"),
    (lambda mp: mp.setattr(http_layers, "HttpLayer", MovedHttpLayer), "HttpLayer does not look up HttpStream"),
    (lambda mp: mp.setattr(_http2.Http2Client, "__init__", lambda self, context: None),
     "cannot check what the bridge needs (AttributeError"),
])
def test_changed_internals_are_named_and_nothing_is_replaced(monkeypatch, caplog, change, named):
    """The bridge checks what mitmproxy does, not its names or version: one
    extended CONNECT driven through its classes in memory. A changed
    behaviour, or a class that would not see the replacement, each stop it
    with one line saying which step, and mitmproxy stays stock."""
    change(monkeypatch)
    caplog.set_level(logging.WARNING)
    stream = http_layers.HttpStream
    bridge = Bridge()
    bridge.install(h2=True, h3=True)
    bridge.install(h2=True, h3=True)
    assert current() == STOCK and http_layers.HttpStream is stream and not bridge.installed
    [line] = [r.getMessage() for r in caplog.records]
    assert named in line and "HTTP/1.1 WebSocket diagnosis keeps working" in line


def test_a_mitmproxy_that_carries_rfc8441_itself_is_left_as_it_is(monkeypatch, caplog):
    """One day mitmproxy may advertise RFC 8441 and keep `:protocol` itself
    (its issue #4607): then the bridge would only shadow it."""
    stock_init, stock_parse = _http2.Http2Server.__init__, _http2.parse_h2_request_headers

    def advertising(self, context):
        stock_init(self, context)
        self.h2_conn.local_settings.enable_connect_protocol = 1
        self.h2_conn.local_settings.acknowledge()  # (sent with the preface)

    def keeping_protocol(h2_headers):
        return stock_parse([(k, v) for k, v in h2_headers if k != b":protocol"])

    monkeypatch.setattr(_http2.Http2Server, "__init__", advertising)
    monkeypatch.setattr(_http2, "parse_h2_request_headers", keeping_protocol)
    caplog.set_level(logging.INFO)
    stream = http_layers.HttpStream
    bridge = Bridge()
    bridge.install(h2=True, h3=True)
    assert current() == STOCK and http_layers.HttpStream is stream and not bridge.installed
    [line] = [r.getMessage() for r in caplog.records if "ws_encode_h2" in r.getMessage()]
    assert "carries HTTP/2 WebSockets (RFC 8441) itself" in line


def test_reloading_the_script_keeps_http2_websockets_working(tmp_path):
    cert = h2ws.make_self_signed_cert(tmp_path)
    script = addon_copy(tmp_path)

    async def scenario():
        async with h2ws.H2WebSocketServer(*cert) as upstream:
            async with Mitmdump("--mode", f"reverse:https://127.0.0.1:{upstream.port}", "--ssl-insecure",
                                addon=script) as md:
                before = await h2_echo_once(md, "before")
                await reload_script(md, script)
                after = await h2_echo_once(md, "after")
        return before, after, md

    before, after, md = asyncio.run(scenario())
    assert (before, after) == ((200, "before"), (200, "after"))
    assert_clean_log(md)


def test_after_a_reload_a_connection_still_opens_any_number_of_websockets(tmp_path):
    """mitmproxy lets a client connection have 5 connections to one server;
    the bridge lets WebSockets past that (each keeps its HTTP/1.1 connection
    for life). The earlier copy of the module had set that up on a live
    connection with checks holding its own classes, so after a reload the
    sixth WebSocket on that connection waited forever (and any test touching
    the addon's file reloaded it in every mitmdump running then)."""
    script = addon_copy(tmp_path)
    count = 8

    async def scenario():
        server = FaultServer(Faults())
        await server.start()
        try:
            async with Mitmdump("--mode", f"reverse:http://127.0.0.1:{server.port}", addon=script) as md:
                client = h2ws.H2WebSocketClient("127.0.0.1", md.port, server_hostname="localhost")
                await client.connect()
                first = await client.open_websocket("/before", "localhost")
                assert await first.wait_status(10) == 200
                await reload_script(md, script)
                sockets = [await client.open_websocket(f"/after{i}", "localhost") for i in range(count)]
                statuses = await asyncio.gather(*(ws.wait_status(10) for ws in sockets), return_exceptions=True)
                await client.close()
        finally:
            await server.stop()
        return statuses, md

    statuses, md = asyncio.run(scenario())
    assert statuses == [200] * count
    assert_clean_log(md)


def test_after_a_reload_the_record_keeps_what_a_connection_from_before_saw(tmp_path):
    """A connection made before a reload keeps the earlier copy's codecs,
    which noted what they saw in that copy's module-level table, out of the
    new copy's sight: its records said no data came before the status and
    missed the status arriving with the first data."""
    cert = h2ws.make_self_signed_cert(tmp_path)
    script = addon_copy(tmp_path)
    report = tmp_path / "report.jsonl"

    async def scenario():
        async with h2ws.H2WebSocketServer(*cert, withhold_status_when_encoding=True) as upstream:
            async with Mitmdump("--mode", f"reverse:https://127.0.0.1:{upstream.port}", "--ssl-insecure",
                                "--set", "ws_encode_stall=0.2", addon=script, report=report) as md:
                client = h2ws.H2WebSocketClient("127.0.0.1", md.port, server_hostname="localhost")
                await client.connect()
                await reload_script(md, script)
                ws = await client.open_websocket("/chat", "localhost", headers=[("accept-encoding", "gzip")])
                await md.wait_for_record(event="stall")
                await ws.send_text("first")
                status = await ws.wait_status(5)
                await client.close()
                return status, await md.wait_for_record(event="handshake"), md

    status, record, md = asyncio.run(scenario())
    assert status == 200
    assert record["client_bytes_before_status"] == len(b"first") + 6  # a masked 5-byte text frame
    assert "together with the first response data" in record["diagnosis"]
    assert_clean_log(md)


COMMAND_ANSWERS = ROOT / "tests" / "command_answers.py"


async def waiting(client: h2ws.H2WebSocketClient) -> dict[str, str]:
    """wsencode.waiting's answer, one text per waiting handshake by its path
    (an entry is a line and the indented lines under it)."""
    status, body = await client.get("/__wsencode__/wsencode.waiting", "localhost")
    assert status == 200
    entries: list[str] = []
    for line in json.loads(body):
        if line[:1].isspace() and entries:
            entries[-1] += " " + line.strip()
        else:
            entries.append(line)
    return {path: entry for entry in entries for path in ("/first", "/second") if f"{path} " in entry or entry.endswith(path)}


def test_a_handshake_behind_max_concurrent_streams_is_queued_not_forwarded(cert):
    """The upstream takes one stream at a time and holds the first
    WebSocket's status: the second waits inside the proxy, and says so."""

    async def scenario():
        upstream = h2ws.H2WebSocketServer(*cert, withhold_status_when_encoding=True, max_concurrent_streams=1)
        async with upstream:
            async with Mitmdump(
                "--mode", f"reverse:https://127.0.0.1:{upstream.port}", "--ssl-insecure", "-s", str(COMMAND_ANSWERS)
            ) as md:
                client = h2ws.H2WebSocketClient("127.0.0.1", md.port, server_hostname="localhost")
                await client.connect()
                first = await client.open_websocket("/first", "localhost", headers=[("accept-encoding", "gzip")])
                second = await client.open_websocket("/second", "localhost")
                # Each answer is a round trip through the proxy, after the
                # handshakes the client sent before it.

                async def both_seen() -> dict[str, str]:
                    entries = await waiting(client)
                    while len(entries) < 2 or "not forwarded" in entries["/first"]:
                        entries = await waiting(client)
                    return entries

                entries = await asyncio.wait_for(both_seen(), 10)
                await first.reset()
                status = await second.wait_status(5)
                after = await waiting(client)
                await client.close()
        return entries, status, after, md

    entries, status, after, md = asyncio.run(scenario())
    assert re.search(r"\bforwarded\b", entries["/first"]) and "queued" not in entries["/first"]
    assert re.search(r"\bqueued\b", entries["/second"]) and "not forwarded" in entries["/second"]
    assert status == 200 and after == {}
    assert_clean_log(md)


def test_a_stream_the_proxy_resets_itself_is_not_blamed_on_the_upstream(cert, tmp_path):
    """More than MAX_EARLY_BYTES before the status (one message that never
    ends, so none of it can go upstream): the bridge resets the stream."""
    report = tmp_path / "report.jsonl"

    async def scenario():
        async with h2ws.H2WebSocketServer(*cert, withhold_status_when_encoding=True) as upstream:
            async with Mitmdump("--mode", f"reverse:https://127.0.0.1:{upstream.port}", "--ssl-insecure", report=report) as md:
                client = h2ws.H2WebSocketClient("127.0.0.1", md.port, server_hostname="localhost")
                await client.connect()
                ws = await client.open_websocket("/big", "localhost", headers=[("accept-encoding", "gzip")])
                ws._send_now(ws._frames.send_data(bytes(MAX_EARLY_BYTES + 1), fin=False))
                client._pump()
                client._flush()
                ended = await ws.wait_ended(10)
                record = await md.wait_for_record(event="handshake")
                await client.close()
        return ended, record, md

    ended, record, md = asyncio.run(scenario())
    assert ended == f"reset:{int(h2.errors.ErrorCodes.PROTOCOL_ERROR)}"
    assert record["outcome"] == "no-status"
    assert "proxy itself reset the stream" in record["diagnosis"] and "before the status" in record["diagnosis"]
    assert "upstream" not in record["diagnosis"]
    assert_clean_log(md)


# Loaded before the addon: mitmproxy with one internal the bridge uses
# changed, stock mitmproxy itself unaffected.
CHANGED_INTERNALS = {
    # A name the bridge imports is gone: the bridge cannot even be loaded.
    "renamed": "from mitmproxy.proxy.layers.http import _http_h2\n"
               "del _http_h2.BufferedH2Connection  # (mitmproxy's _http2 keeps its own reference)\n",
    # A behaviour that changed under the same names: the bridge loads, its check refuses it.
    "changed behaviour": "from mitmproxy.proxy.layers.http import _http2\n"
                         "def parse_h2_response_headers(h2_headers):\n"
                         "    raise ValueError('changed')\n"
                         "_http2.parse_h2_response_headers = parse_h2_response_headers\n",
}


@pytest.mark.parametrize("change", CHANGED_INTERNALS)
def test_a_mitmproxy_the_bridge_does_not_fit_keeps_http1_diagnosis(tmp_path, report, change):
    """One clear line, HTTP/2 as stock mitmproxy has it, and an HTTP/1.1
    stall still caught and reported."""
    changed = tmp_path / "changed_internals.py"
    changed.write_text(CHANGED_INTERNALS[change])

    async def scenario():
        server = FaultServer(Faults(withhold_when_encoded=True))
        await server.start()
        try:
            async with Mitmdump("--mode", f"reverse:http://127.0.0.1:{server.port}", "-s", str(ADDON),
                                "--set", "ws_encode_stall=0.3", report=report, addon=changed) as md:
                reader, writer = await asyncio.open_connection("127.0.0.1", md.port)
                writer.write(upgrade_request("/chat", accept_encoding="gzip"))
                await writer.drain()
                stall = await md.wait_for_record(event="stall")
                writer.close()
                client = h2ws.H2WebSocketClient("127.0.0.1", md.port, server_hostname="localhost")
                await client.connect()
                enables = client.server_enables_connect_protocol
                await client.close()
        finally:
            await server.stop()
        return stall, enables, md

    stall, enables, md = asyncio.run(scenario())
    assert stall["transport"] == "h1" and "encoding layer" in stall["diagnosis"]
    assert not enables  # stock mitmproxy's HTTP/2: no extended CONNECT
    [line] = [line for line in md.lines if "ws_encode_h2:" in line]
    assert "HTTP/1.1 WebSocket diagnosis keeps working" in line
    assert ("cannot load the bridge" if change == "renamed" else "the HTTP/2 upstream codec hands the stream") in line
    assert_clean_log(md)


# Loaded after the addon: holds WebSocket handshakes in the request hook
# until a request for /release arrives (an intercept, or a slow addon).
HOLD_UNTIL_RELEASED = '''
import asyncio
from mitmproxy import http

class HoldUntilReleased:
    def __init__(self):
        self.released = None

    async def request(self, flow):
        if self.released is None:
            self.released = asyncio.get_running_loop().create_future()
        if flow.request.path == "/release":
            self.released.set_result(None)
            flow.response = http.Response.make(200, b"released")
        elif flow.request.method == "CONNECT":  # the extended CONNECT
            await self.released

addons = [HoldUntilReleased()]
'''


def test_a_client_reset_while_a_hook_holds_the_handshake_is_the_client_giving_up(tmp_path, report):
    """mitmproxy queues what arrives for a stream while one of its hooks
    runs, and fires the error hook for it as soon as the hook returns, before
    the stream handles the event: who ended the stream must be known by then
    (it was blamed on the upstream, as unreachable)."""
    hold = tmp_path / "hold_until_released.py"
    hold.write_text(HOLD_UNTIL_RELEASED)

    async def scenario():
        server = FaultServer(Faults())
        await server.start()
        try:
            async with Mitmdump("--mode", f"reverse:http://127.0.0.1:{server.port}", "-s", str(hold),
                                report=report) as md:
                client = h2ws.H2WebSocketClient("127.0.0.1", md.port, server_hostname="localhost")
                await client.connect()
                ws = await client.open_websocket("/held", "localhost")
                await ws.reset()  # the browser gives up while the request hook still runs
                # On the same connection, so after the reset: the hook lets go.
                released = await client.get("/release", "localhost")
                record = await md.wait_for_record(event="handshake")
                await client.close()
        finally:
            await server.stop()
        return released, record, server.received, md

    released, record, received, md = asyncio.run(scenario())
    assert released == (200, b"released")
    assert record["outcome"] == "no-status" and "client gave up" in record["diagnosis"]
    assert "unreachable" not in record["diagnosis"] and received == []
    assert_clean_log(md)


# Loaded after the addon: an addon of the user's that chooses what every
# upstream connection offers.
OFFERS_H2 = '''
class OffersH2:
    def server_connect(self, data):
        data.server.alpn_offers = (b"h2", b"http/1.1")

addons = [OffersH2()]
'''


def test_the_http1_fallback_offers_http1_whatever_another_addon_chose(tmp_path, cert, report):
    """A WebSocket to an HTTP/2 upstream without RFC 8441 goes over a separate
    HTTP/1.1 connection, which must offer only HTTP/1.1 in its TLS handshake.
    That was set at server_connect, where another addon (or, in upstream-proxy
    mode, the proxy's connection in place of the origin's) could undo it; the
    fallback then negotiated HTTP/2 again and failed."""

    offers = tmp_path / "offers_h2.py"
    offers.write_text(OFFERS_H2)

    async def scenario():
        async with DualAlpnServer(cert, FaultServer(Faults())) as upstream:
            async with Mitmdump("--mode", f"reverse:https://127.0.0.1:{upstream.port}", "--ssl-insecure",
                                "-s", str(offers), report=report) as md:
                echoed = await h2_echo_once(md, "over HTTP/1.1")
                record = await md.wait_for_record(event="handshake")
        return echoed, record, md

    echoed, record, md = asyncio.run(scenario())
    assert echoed == (200, "over HTTP/1.1")
    assert record["upstream_transport"] == "h1" and record["upstream_status"] == 101
    assert_clean_log(md)


def refuse_every_h3_status(self, event):  # as if mitmproxy's HTTP/3 client read responses some other way
    raise ValueError("changed")


def test_an_http3_part_that_does_not_behave_leaves_http3_unadvertised_and_the_rest_carried(monkeypatch, caplog):
    """What over HTTP/3 keeps a client from being cut off stays (no RFC 9220
    advertised, an extended CONNECT refused on its own stream): one line
    says so, and HTTP/2 WebSockets are carried as before."""
    from mitmproxy.proxy.layers.http import _http3
    from wsencode.bridge.h3 import QuietHttp3Server

    monkeypatch.setattr(_http3.Http3Client, "parse_headers", refuse_every_h3_status)
    caplog.set_level(logging.WARNING)
    bridge = Bridge()
    bridge.install(h2=True, h3=True)
    assert bridge.installed and current() == BRIDGED and http_layers.Http3Server is QuietHttp3Server
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("ws_encode_h3: in memory, the HTTP/3 upstream codec hands the stream the upstream's 2xx")
    assert "does not advertise WebSockets over HTTP/3" in line
    bridge.uninstall()
    assert http_layers.Http3Server is _http3.Http3Server
