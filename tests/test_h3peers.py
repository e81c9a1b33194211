"""The RFC 9220 (WebSockets over HTTP/3) test peers themselves, peer to peer
on UDP 127.0.0.1 with no proxy in between, and headless Chromium against the
server: so that the peers can be trusted when mitmproxy is put between them."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pylsqpack
import pytest
from aioquic.h3.connection import FrameType, encode_frame
from hypothesis import given
from hypothesis import strategies as st
from peers import chromium
from wspeers import h3ws
from wspeers.h3ws import ErrorCode, Setting

AUTHORITY = "localhost"
pytestmark = pytest.mark.timeout(30)


def server(cert, **options) -> h3ws.H3WebSocketServer:
    return h3ws.H3WebSocketServer(*cert, **options)


def client(port: int) -> h3ws.H3WebSocketClient:
    return h3ws.H3WebSocketClient("127.0.0.1", port)


def test_echo_over_rfc9220_and_a_get_on_the_same_quic_connection(cert):
    async def scenario():
        async with server(cert) as srv, client(srv.port) as cl:
            assert cl.settings[Setting.ENABLE_CONNECT_PROTOCOL] == 1
            ws = await cl.open_websocket("/chat", AUTHORITY)
            assert await ws.wait_status() == 200
            await ws.send_text("hello")
            assert await ws.receive() == "hello"
            await ws.send_fragmented([b"\x00", b"\xff"])
            assert await ws.receive() == b"\x00\xff"
            assert await ws.ping(b"there?") == b"there?"
            assert await cl.get("/page", AUTHORITY) == (200, b"ok")
            await ws.close()
            assert cl.closed is None
        return srv, ws, cl

    srv, ws, cl = asyncio.run(scenario())
    assert (ws.close_code, ws.ended_with) == (1000, "end_stream")
    connect, get = srv.requests
    assert connect["pseudo"] == {":method": "CONNECT", ":protocol": "websocket", ":scheme": "https",
                                 ":path": "/chat", ":authority": AUTHORITY}
    assert (connect["alpn"], get["pseudo"][":method"]) == ("h3", "GET")
    assert {connect["connection"], get["connection"]} == {0} and srv.connections_accepted == 1
    assert cl.closed.initiator == "us" and cl.closed.error_code == ErrorCode.H3_NO_ERROR
    assert srv.closed_connections[0].initiator == "peer"


def test_a_withheld_status_stays_withheld_until_the_client_speaks(cert):
    async def scenario():
        async with server(cert, withhold_status_when_encoding=True) as srv, client(srv.port) as cl:
            plain = await cl.open_websocket("/", AUTHORITY)
            assert await plain.wait_status() == 200  # no accept-encoding: no encoder holds it
            held = await cl.open_websocket("/", AUTHORITY, headers=[("accept-encoding", "gzip")])
            # A client that waits for the status before speaking waits until it gives up.
            with pytest.raises(asyncio.TimeoutError):
                await held.wait_status(0.5)
            assert held.status is None and held.events == []
            await held.send_text("first")  # the client speaks anyway: the echo carries the status out
            assert await held.wait_status() == 200 and await held.receive() == "first"
            eager = await cl.open_websocket("/", AUTHORITY, headers=[("accept-encoding", "br")],
                                            data_before_status=b"before the status")
            assert await eager.wait_status() == 200 and await eager.receive() == "before the status"
            return list(held.events)

    assert asyncio.run(scenario()) == ["status:200", "message"]


def test_version_fallback_resets_only_the_stream(cert):
    async def scenario():
        async with server(cert, reset_after_connect=True, reset_code=ErrorCode.H3_VERSION_FALLBACK) as srv, \
                client(srv.port) as cl:
            ws = await cl.open_websocket("/", AUTHORITY)
            with pytest.raises(h3ws.StreamResetError) as reset:
                await ws.wait_status()
            await ws.wait_ended()
            assert await cl.get("/", AUTHORITY) == (200, b"ok")  # the connection lives on
            return reset.value, ws, cl.closed

    reset, ws, closed = asyncio.run(scenario())
    assert (reset.code, reset.by_peer) == (0x110, True)
    assert ws.ended_with == "reset:272" and "stop_sending:272" in ws.events
    assert closed is None


def test_a_hundred_websockets_share_one_quic_connection(cert):
    count = 100

    async def scenario():
        async with server(cert) as srv, client(srv.port) as cl:
            sockets = [await cl.open_websocket(f"/ws/{i}", AUTHORITY) for i in range(count)]
            assert await asyncio.gather(*(ws.wait_status() for ws in sockets)) == [200] * count
            for i, ws in enumerate(sockets):
                await ws.send_text(f"message {i}")
            echoes = await asyncio.gather(*(ws.receive() for ws in sockets))
            await asyncio.gather(*(ws.close() for ws in sockets))
            return srv, sockets, echoes

    srv, sockets, echoes = asyncio.run(scenario())
    assert echoes == [f"message {i}" for i in range(count)]
    assert all(ws.ended_with == "end_stream" for ws in sockets)
    assert srv.connections_accepted == 1 and len({r["stream_id"] for r in srv.requests}) == count


def test_the_client_will_not_send_an_extended_connect_the_settings_do_not_enable(cert):
    async def scenario():
        async with server(cert, enable_connect_protocol=False) as srv, client(srv.port) as cl:
            assert Setting.ENABLE_CONNECT_PROTOCOL not in cl.settings
            with pytest.raises(h3ws.ConnectProtocolNotEnabled, match="ENABLE_CONNECT_PROTOCOL is absent"):
                await cl.open_websocket("/", AUTHORITY)
            assert await cl.get("/", AUTHORITY) == (200, b"ok")
            sent_before = [r["pseudo"][":method"] for r in srv.requests]
            # Sent anyway (as a broken client would): RFC 8441 §3 makes it malformed, a stream error.
            forced = cl.send_request([(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
                                      (b":path", b"/"), (b":authority", AUTHORITY.encode())], end_stream=False)
            assert await forced.wait_ended() == f"reset:{ErrorCode.H3_MESSAGE_ERROR}"
            assert await cl.get("/", AUTHORITY) == (200, b"ok")
            return sent_before, cl.closed

    sent_before, closed = asyncio.run(scenario())
    assert sent_before == ["GET"]  # the refused WebSocket sent nothing
    assert closed is None


def test_plain_refusals_and_an_unknown_protocol(cert):
    async def scenario():
        async with server(cert, status=403, response_headers=[("x-why", "closed")]) as srv, client(srv.port) as cl:
            refused = await cl.open_websocket("/", AUTHORITY)
            assert await refused.wait_status() == 403
            assert await refused.wait_ended() == "end_stream"
            unknown = await cl.open_websocket("/", AUTHORITY, protocol="webtransport")
            assert await unknown.wait_status() == 501  # RFC 9220 §3
            return refused

    refused = asyncio.run(scenario())
    assert bytes(refused.response_body) == b"rejected\n" and ("x-why", "closed") in refused.response_headers


def test_a_request_malformed_by_rfc9220_costs_its_stream_and_one_aioquic_refuses_costs_the_connection(cert):
    """aioquic's own header checks close the whole connection (H3_MESSAGE_ERROR)
    where RFC 9114 §4.1.2 asks for a stream error: the client reports which."""
    async def scenario():
        async with server(cert) as srv, client(srv.port) as cl:
            protocol_on_get = cl.send_request([(b":method", b"GET"), (b":protocol", b"websocket"),
                                               (b":scheme", b"https"), (b":path", b"/"),
                                               (b":authority", b"localhost")])
            assert await protocol_on_get.wait_ended() == f"reset:{ErrorCode.H3_MESSAGE_ERROR}"
            assert cl.closed is None
            open_ws = await cl.open_websocket("/", AUTHORITY)
            await open_ws.wait_status()
            uppercase = cl.send_request([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"),
                                         (b":authority", b"localhost"), (b"X-Upper", b"1")])
            await cl.connection_lost.wait()
            return cl.closed, uppercase, open_ws

    closed, uppercase, open_ws = asyncio.run(scenario())
    assert (closed.initiator, closed.error_code) == ("peer", ErrorCode.H3_MESSAGE_ERROR)
    assert uppercase.ended_with == open_ws.ended_with == "connection_lost"


# Lengths across each of QPACK's prefixed-integer classes (3-bit name, 7-bit value prefixes).
FIELD_BYTES = st.binary(min_size=1, max_size=300)
VALUES = st.binary(max_size=300) | st.sampled_from([b"v" * 126, b"v" * 127, b"v" * 16511, b"v" * 65535])


@given(st.lists(st.tuples(FIELD_BYTES, VALUES), min_size=1))
def test_qpack_literals_decode_to_exactly_the_fields_given(fields):
    decoder = pylsqpack.Decoder(4096, 16)
    assert decoder.feed_header(0, h3ws.qpack_literals(fields))[1] == fields


def test_raw_stream_bytes_reach_the_server_as_they_are(cert):
    """A DATA frame before any HEADERS on a request stream is a connection
    error of type H3_FRAME_UNEXPECTED (RFC 9114 §4.1): the client sends it
    as given and reports the server's close."""
    async def scenario():
        async with server(cert) as srv, client(srv.port) as cl:
            first = await cl.open_websocket("/", AUTHORITY)
            await first.wait_status()
            cl.send_stream_bytes(encode_frame(FrameType.DATA, b"no headers first"))
            await cl.connection_lost.wait()
            return cl.closed, first.ended_with, srv.requests

    closed, first_ended, requests = asyncio.run(scenario())
    assert (closed.initiator, closed.error_code) == ("peer", ErrorCode.H3_FRAME_UNEXPECTED)
    assert first_ended == "connection_lost" and len(requests) == 1


def test_an_unread_websocket_keeps_its_window_shut_while_the_connection_goes_on(cert):
    window = 1 << 20  # aioquic's initial max_stream_data

    async def scenario():
        async with server(cert) as srv, client(srv.port) as cl:
            deaf = await cl.open_websocket("/?deaf", AUTHORITY)
            assert await deaf.wait_status() == 200
            await deaf.send_bytes(bytes(3 * window))
            key = (0, deaf.stream_id)
            await srv.wait_until(lambda: srv.unread_bytes[key] > window - 4096)
            # Another WebSocket moves a window's worth of bytes both ways on the
            # same connection: the unread one would have got more meanwhile.
            echo = await cl.open_websocket("/", AUTHORITY)
            await echo.send_bytes(bytes(window))
            assert len(await echo.receive()) == window
            return srv.unread_bytes[key]

    assert asyncio.run(scenario()) <= window


def test_the_command_line_peers(cert):
    """`python -m wspeers.h3ws server/client` as a person runs them: a withheld
    status is a stall (exit 1), no encoding an echo (exit 0)."""
    server_proc = subprocess.Popen([sys.executable, "-m", "wspeers.h3ws", "server", "--withhold",
                                    "--cert", cert[0], "--key", cert[1]],
                                   stdout=subprocess.PIPE, text=True)
    try:
        line = server_proc.stdout.readline()
        assert line.startswith("listening on udp 127.0.0.1:"), line
        url = f"https://127.0.0.1:{int(line.split(':')[1].split()[0])}/"

        def run_client(*options: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "wspeers.h3ws", "client", "--url", url, "--timeout", "1",
                                   *options], capture_output=True, text=True, timeout=20)

        stalled, echoed = run_client("--accept-encoding", "gzip"), run_client()
    finally:
        server_proc.terminate()
        server_proc.wait(timeout=10)
        server_proc.stdout.close()
    assert stalled.returncode == 1 and "handshake stalled" in stalled.stdout, stalled
    assert echoed.returncode == 0 and "echo: hello" in echoed.stdout, echoed


# -- a browser ----------------------------------------------------------------

PAGE = """<!doctype html><title>h3ws</title><script>
const ws = new WebSocket(`wss://${location.host}/echo`);
ws.onopen = () => ws.send("hello over HTTP/3");
ws.onmessage = (e) => fetch("/result?echo=" + encodeURIComponent(e.data));
ws.onerror = () => fetch("/result?error=1");
</script>"""


@chromium.needs_chromium
def test_chromium_opens_a_websocket_over_http3(cert, home):
    async def scenario():
        async with server(cert, pages={"/": ("text/html", PAGE.encode())}) as srv:
            browser = await chromium.start(f"https://127.0.0.1:{srv.port}/", home,
                                           quic=chromium.quic_flags(srv.port, cert[0]))
            try:
                await srv.wait_until(lambda: any(r["pseudo"].get(":path", "").startswith("/result")
                                                 for r in srv.requests), timeout=60)
            finally:
                await chromium.stop(browser)
            return srv.requests

    requests = asyncio.run(scenario())
    result = next(r for r in requests if r["pseudo"][":path"].startswith("/result"))
    assert result["pseudo"][":path"] == "/result?echo=hello%20over%20HTTP%2F3"
    connect = next(r for r in requests if r["pseudo"][":method"] == "CONNECT")
    assert connect["pseudo"][":protocol"] == "websocket" and connect["alpn"] == "h3"
    # The WebSocket took the page's QUIC connection (the server speaks nothing but QUIC).
    page = next(r for r in requests if r["pseudo"][":path"] == "/")
    assert connect["connection"] == page["connection"]


def test_a_client_never_comes_back_to_a_destination_from_a_port_it_used_before():
    # mitmproxy leaves a reused address pair unanswered (docs/upstream.md, tests/test_upstream_docs.py):
    # here half the system's ephemeral ports count as used towards one destination, so a choice
    # left to the system would land on one about every other time.
    low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    remote = ("127.0.0.1", 9)  # (nothing is sent: the sockets are only bound)
    taken = set(range(low, high + 1, 2))

    async def scenario():
        h3ws._PORTS_USED[remote] |= taken
        ports = []
        try:
            for _ in range(40):
                transport, _peer = await h3ws.client_endpoint(asyncio.DatagramProtocol, remote)
                ports.append(transport.get_extra_info("sockname")[1])
                transport.close()
        finally:
            del h3ws._PORTS_USED[remote]
        return ports

    ports = asyncio.run(scenario())
    assert not taken & set(ports) and len(set(ports)) == len(ports), ports
