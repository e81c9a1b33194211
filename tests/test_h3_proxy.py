"""HTTP/3 WebSockets (RFC 9220) through a real mitmdump running the addon.

Clients and servers are aioquic peers (scripts/wspeers/h3ws.py), on UDP
127.0.0.1; the HTTP/2 and HTTP/1.1 upstreams a WebSocket falls back to are
the h2ws and fault servers, on the TCP port of the same number.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from aioquic.h3.connection import ErrorCode
from conftest import STALL, Mitmdump, assert_clean_log, on_one_port_number
from mitmproxy import io as mitmio
from wspeers import h2ws, h3ws
from wspeers.fault_server import Faults, FaultServer

pytestmark = pytest.mark.timeout(90)

AUTHORITY = "localhost"


def run(coro):
    return asyncio.run(coro)


def reverse_h3(port: int, *options: str, report=None) -> Mitmdump:
    """mitmdump in front of an HTTP/3 server (QUIC on UDP `port`)."""
    return Mitmdump("--mode", f"reverse:http3://127.0.0.1:{port}", "--ssl-insecure",
                    "--set", f"ws_encode_stall={STALL}", *options, report=report)


async def h3_client(md: Mitmdump) -> h3ws.H3WebSocketClient:
    return await h3ws.H3WebSocketClient("127.0.0.1", md.port, server_hostname=AUTHORITY).connect()


@contextlib.asynccontextmanager
async def tcp_server(cert, port: int = 0, enable_connect_protocol: bool = False):
    """TLS on TCP: HTTP/2 (with RFC 8441 or without) and HTTP/1.1 WebSockets,
    by ALPN (the HTTP/1.1 ones the fault server's, `.h1`)."""
    h1 = FaultServer(Faults())
    await h1.start()
    server = h2ws.DualAlpnServer(cert, h1, enable_connect_protocol=enable_connect_protocol, port=port)
    try:
        async with server:
            yield server
    finally:
        await h1.stop()


def h3_and_tcp(cert, **h3_options):
    """An HTTP/3 server on UDP and `tcp_server` on the TCP port of the same number."""
    return on_one_port_number(lambda: h3ws.H3WebSocketServer(*cert, **h3_options),
                              lambda port: tcp_server(cert, port=port))


def test_an_h3_websocket_goes_upstream_as_an_extended_connect_beside_other_requests(cert, tmp_path, report):
    flows_file = tmp_path / "flows.mitm"

    async def scenario():
        async with h3ws.H3WebSocketServer(*cert, pages={"/page": ("text/plain", b"page")}) as upstream:
            async with reverse_h3(upstream.port, "-w", str(flows_file), report=report) as md:
                client = await h3_client(md)
                assert client.server_enables_connect_protocol
                ws = await client.open_websocket("/chat?token=SECRET", AUTHORITY, headers=[("accept-encoding", "gzip")])
                status = await ws.wait_status(5)
                await ws.send_text("over h3")
                echo = await ws.receive(5)
                page = await client.get("/page", AUTHORITY)
                await ws.close()
                closed = client.closed
                await client.close()
                record = await md.wait_for_record(event="handshake")
        return status, echo, page, closed, ws.ended_with, record, upstream.requests, md

    status, echo, page, closed, ended, record, requests, md = run(scenario())
    assert (status, echo, page, closed, ended) == (200, "over h3", (200, b"page"), None, "end_stream")
    connect = next(r for r in requests if r["pseudo"].get(":method") == "CONNECT")
    assert connect["pseudo"][":protocol"] == "websocket" and connect["pseudo"][":path"] == "/chat?token=SECRET"
    assert (record["transport"], record["upstream_transport"], record["status"], record["upstream_status"]) == ("h3", "h3", 200, 200)
    assert record["url"].endswith("/chat?token=REDACTED") and record["outcome"] == "upgraded"
    with flows_file.open("rb") as f:
        [flow] = [x for x in mitmio.FlowReader(f).stream() if x.websocket is not None]
    assert (flow.request.method, flow.request.http_version, flow.response.status_code) == ("CONNECT", "HTTP/3", 200)
    assert flow.request.headers.fields[0] == (b":protocol", b"websocket")
    assert [m.text for m in flow.websocket.messages] == ["over h3", "over h3"]
    line = next(x for x in flow.comment.splitlines() if x.startswith("On the wire:"))
    assert line.startswith("On the wire: HTTP/3 extended CONNECT (:protocol websocket) /chat?token=REDACTED → 200")
    assert "SECRET" not in flow.comment
    assert_clean_log(md)


def test_an_h3_stall_is_reported_live_and_strip_opens_it(cert, report):
    async def attempt(policy: str):
        async with h3ws.H3WebSocketServer(*cert, withhold_status_when_encoding=True) as upstream:
            async with reverse_h3(upstream.port, "--set", f"ws_encode_policy={policy}", report=report) as md:
                client = await h3_client(md)
                ws = await client.open_websocket("/chat", AUTHORITY, headers=[("accept-encoding", "gzip, br")])
                if policy == "observe":
                    stall = await md.wait_for_record(event="stall")
                    await ws.reset()
                    end = await md.wait_for_record(event="handshake")
                    await client.close()
                    return stall, end
                status = await ws.wait_status(5)
                await ws.send_text("opened")
                echo = await ws.receive(5)
                await client.close()
                return status, echo

    stall, end = run(attempt("observe"))
    assert stall["transport"] == "h3" and stall["stuck_in"] == "forwarded" and stall["upstream_transport"] == "h3"
    assert "encoding layer upstream is probably holding" in stall["diagnosis"]
    assert end["outcome"] == "no-status" and end["stalled"] and "client gave up" in end["diagnosis"]
    report.write_text("")
    assert run(attempt("strip")) == (200, "opened")
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert [r["event"] for r in records] == ["handshake"] and records[0]["accept_encoding_upstream"] is None


def test_a_client_that_speaks_first_is_carried_to_a_server_that_waits_for_it(cert, report):
    """The encoder bug's deadlock, broken by the client speaking before the
    status: what it sent goes upstream at once, in whole messages."""
    async def scenario():
        async with h3ws.H3WebSocketServer(*cert, withhold_status_when_encoding=True) as upstream:
            async with reverse_h3(upstream.port, report=report) as md:
                client = await h3_client(md)
                ws = await client.open_websocket("/chat", AUTHORITY, headers=[("accept-encoding", "gzip")],
                                                 data_before_status=b"first")
                status = await ws.wait_status(5)
                echo = await ws.receive(5)
                await ws.close()
                await client.close()
                return status, echo, await md.wait_for_record(event="handshake")

    status, echo, record = run(scenario())
    assert (status, echo) == (200, "first")
    assert record["client_bytes_before_status"] > 0 and record["outcome"] == "upgraded"


@pytest.mark.parametrize("upstream_says", ["no RFC 9220 in its SETTINGS", "H3_VERSION_FALLBACK"])
def test_an_upstream_that_cannot_take_it_over_h3_gets_it_over_http1_on_tcp(cert, report, upstream_says):
    async def scenario():
        options = ({"enable_connect_protocol": False} if upstream_says.startswith("no")
                   else {"reset_after_connect": True, "reset_code": ErrorCode.H3_VERSION_FALLBACK})
        async with h3_and_tcp(cert, **options) as (upstream, tcp):
            async with reverse_h3(upstream.port, report=report) as md:
                client = await h3_client(md)
                ws = await client.open_websocket("/chat", AUTHORITY)
                status = await ws.wait_status(5)
                await ws.send_text("over tcp")
                echo = await ws.receive(5)
                await ws.close()
                await client.close()
                record = await md.wait_for_record(event="handshake")
                return status, echo, record, tcp.h1.received, md

    status, echo, record, received, md = run(scenario())
    assert (status, echo) == (200, "over tcp")
    assert [(r.method, r.headers["upgrade"]) for r in received] == [("GET", "websocket")]
    assert (record["transport"], record["upstream_transport"], record["upstream_status"]) == ("h3", "h1", 101)
    assert any("retrying over HTTP/1.1" in line for line in md.lines)


@pytest.mark.parametrize("rfc8441", [True, False], ids=["HTTP/2 with RFC 8441", "HTTP/1.1"])
def test_ws_encode_h3_upstream_tcp_sends_an_h3_clients_websocket_over_tcp(cert, report, rfc8441):
    """Most origins behind an HTTP/3 front speak HTTP/1.1 or HTTP/2. (Over
    HTTP/1.1 this is also stock mitmproxy's crash on an HTTP/3 client's
    upgrade: an assert on stream id 0.)"""
    async def scenario():
        async with tcp_server(cert, enable_connect_protocol=rfc8441) as origin:  # (nothing on its UDP port)
            async with reverse_h3(origin.port, "--set", "ws_encode_h3_upstream=tcp",
                                  "--set", "connection_strategy=lazy", report=report) as md:
                client = await h3_client(md)
                ws = await client.open_websocket("/chat", AUTHORITY)
                status = await ws.wait_status(5)
                await ws.send_text("tcp")
                echo = await ws.receive(5)
                await ws.close()
                await client.close()
                record = await md.wait_for_record(event="handshake")
                return status, echo, record, md

    status, echo, record, md = run(scenario())
    assert (status, echo) == (200, "tcp")
    assert record["upstream_transport"] == ("h2" if rfc8441 else "h1")
    assert "has crashed" not in md.log
    assert_clean_log(md)


REFUSED = {
    "another protocol": ([(b":protocol", b"connect-udp")], 501),
    "no sec-websocket-version": ([(b":protocol", b"websocket")], 400),
    "an uppercase field name": ([(b":protocol", b"websocket"), (b"sec-websocket-version", b"13"), (b"X-Bad", b"1")], 400),
    "a pseudo-header after a field": ([(b":protocol", b"websocket"), (b"sec-websocket-version", b"13"),
                                       (b":path", b"/again")], 400),
}


@pytest.mark.parametrize("why", REFUSED)
def test_a_bad_extended_connect_is_refused_on_its_stream_and_the_connection_lives_on(cert, report, why):
    extra, status = REFUSED[why]

    async def scenario():
        async with h3ws.H3WebSocketServer(*cert) as upstream:
            async with reverse_h3(upstream.port, report=report) as md:
                client = await h3_client(md)
                headers = [(b":method", b"CONNECT"), (b":scheme", b"https"), (b":authority", b"localhost"),
                           (b":path", b"/chat"), *extra]
                if why == "no sec-websocket-version" or why == "another protocol":
                    headers.append((b"origin", b"https://localhost"))
                if why == "another protocol":
                    headers.append((b"sec-websocket-version", b"13"))
                refused = client.send_request(headers, end_stream=False)
                await refused.wait_ended(5)
                page = await client.get("/", AUTHORITY)
                ws = await client.open_websocket("/chat", AUTHORITY)
                opened = await ws.wait_status(5)
                closed = client.closed
                await client.close()
                return refused.status, page, opened, closed, md

    got, page, opened, closed, md = run(scenario())
    assert got == status and page[0] == 200 and opened == 200 and closed is None
    assert any("refused HTTP/3 stream" in line for line in md.lines)


def test_ws_encode_h3_false_stops_advertising_and_still_never_closes_the_connection(cert, report):
    async def scenario():
        async with h3ws.H3WebSocketServer(*cert) as upstream:
            async with reverse_h3(upstream.port, "--set", "ws_encode_h3=false", report=report) as md:
                client = await h3_client(md)
                advertised = client.server_enables_connect_protocol
                forced = client.send_request([
                    (b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
                    (b":authority", b"localhost"), (b":path", b"/chat"), (b"sec-websocket-version", b"13")],
                    end_stream=False)
                await forced.wait_ended(5)
                page = await client.get("/", AUTHORITY)
                closed = client.closed
                await client.close()
                return advertised, forced.status, page, closed, md

    advertised, forced, page, closed, md = run(scenario())
    assert not advertised and forced == 501 and page[0] == 200 and closed is None
    assert any("ws_encode_h3 is off" in line for line in md.lines)


def test_stock_mitmdump_closes_the_whole_quic_connection_for_an_extended_connect(cert, tmp_path):
    """What the addon makes right, as stock mitmproxy does it (the notes,
    NOTES-rfc9220): mitmproxy advertises RFC 9220, then ends the whole QUIC
    connection with H3_GENERAL_PROTOCOL_ERROR for the first extended CONNECT."""
    nothing = tmp_path / "nothing.py"
    nothing.write_text("")

    async def scenario():
        async with h3ws.H3WebSocketServer(*cert) as upstream:
            async with Mitmdump("--mode", f"reverse:http3://127.0.0.1:{upstream.port}", "--ssl-insecure",
                                addon=nothing) as md:
                client = await h3_client(md)
                advertised = client.server_enables_connect_protocol
                ws = await client.open_websocket("/chat", AUTHORITY)
                with contextlib.suppress(h3ws.WebSocketClosed):
                    await ws.wait_status(5)  # (it ends with the connection)
                return advertised, client.closed

    advertised, closed = run(scenario())
    assert advertised and closed is not None and closed.error_code == ErrorCode.H3_GENERAL_PROTOCOL_ERROR


def test_each_websocket_of_an_h3_client_gets_an_http1_connection_of_its_own(cert, report):
    """An HTTP/1.1 connection carries one request at a time, and a WebSocket
    holds it for its whole life: mitmproxy hands an HTTP/3 client's next
    request an HTTP/1.1 connection it already has (it keeps only HTTP/2
    clients' off them), and the second WebSocket crashed mitmproxy."""
    async def scenario():
        async with tcp_server(cert) as origin:  # HTTP/2 without RFC 8441, and HTTP/1.1
            async with reverse_h3(origin.port, "--set", "ws_encode_h3_upstream=tcp",
                                  "--set", "connection_strategy=lazy", report=report) as md:
                client = await h3_client(md)
                first = await client.open_websocket("/one", AUTHORITY)
                assert await first.wait_status(5) == 200
                second = await client.open_websocket("/two", AUTHORITY)
                assert await second.wait_status(5) == 200
                echoes = []
                for ws, text in ((first, "one"), (second, "two")):
                    await ws.send_text(text)
                    echoes.append(await ws.receive(5))
                    await ws.close()
                await client.close()
                return echoes, [r.target for r in origin.h1.received], md

    echoes, targets, md = run(scenario())
    assert echoes == ["one", "two"] and sorted(targets) == ["/one", "/two"]
    assert "has crashed" not in md.log


def test_a_handshake_waiting_for_the_upstreams_quic_handshake_is_stuck_in_tls(cert, report):
    """An HTTP/3 upstream that never answers QUIC: the stall is the proxy's
    own wait (`stuck_in: tls`, the QUIC handshake), never blamed on the
    upstream or an encoder."""
    async def scenario():
        loop = asyncio.get_running_loop()
        silent, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        try:
            port = silent.get_extra_info("sockname")[1]
            async with reverse_h3(port, "--set", "connection_strategy=lazy", report=report) as md:
                client = await h3_client(md)
                ws = await client.open_websocket("/chat", AUTHORITY, headers=[("accept-encoding", "gzip")])
                stall = await md.wait_for_record(event="stall")
                await ws.reset()
                await client.close()
                return stall
        finally:
            silent.close()

    stall = run(scenario())
    assert stall["stuck_in"] == "tls" and stall["waited_s"] is None and stall["upstream_transport"] is None
    assert "neither the upstream nor an encoder is the cause" in stall["diagnosis"]
