"""Header sections too large for aioquic's QPACK encoder, through a real
mitmdump in `reverse:http3://`: mitmproxy re-encodes every header section it
forwards to an HTTP/3 peer, and pylsqpack takes about 4 KB (a field of at
most 4096 bytes, a section of at most 4080 encoded). Stock mitmproxy crashes
the connection's handler on more ("mitmproxy has crashed!", the stream never
answered); with the addon, such a request or response gets a 502 on its own
stream, says why in one line, and the connection serves the next request.
Found by tests/test_fuzz.py's HTTP/3 header blocks (their 2-8 KB values)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Mitmdump, assert_clean_log
from hypothesis import given, settings
from hypothesis import strategies as st
from wspeers import h3ws

from wsencode.bridge.h3 import qpack_encodes

pytestmark = pytest.mark.timeout(90)
AUTHORITY = "localhost"
GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", AUTHORITY.encode()), (b":path", b"/page")]
CONNECT = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
           (b":authority", AUTHORITY.encode()), (b":path", b"/chat"), (b"sec-websocket-version", b"13")]
# Another addon's hooks, adding a large field to what goes out: the request
# to the upstream, or the response to the client.
GROWING = '''
def request(flow):
    if flow.request.path.startswith("/grow-request"):
        flow.request.headers["x-large"] = "r" * 5000

def responseheaders(flow):
    if flow.request.path.startswith("/grow-response"):
        flow.response.headers["x-large"] = "s" * 5000
'''


def test_what_aioquics_encoder_takes_is_told_apart_without_touching_a_connections_encoder():
    assert qpack_encodes(GET + [(b"cookie", b"c" * 3900)])
    assert qpack_encodes(GET + [(b"x-a", b"v" * 2100), (b"x-b", b"v" * 2100)])  # Huffman: it fits
    assert qpack_encodes(GET + [(b"x-%d" % i, b"%05d" % i * 300) for i in range(4)])  # digits too
    assert not qpack_encodes(GET + [(b"cookie", b"c" * 4100)])  # one field past 4096 bytes
    assert not qpack_encodes(GET + [(b"x-%d" % i, b"~" * 1500) for i in range(4)])  # a section past 4080


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"cookie", b"x-a", b"authorization"]),
                          st.binary(min_size=0, max_size=3000)), max_size=5))
def test_whatever_it_says_encodes_does_encode_on_an_encoder_with_a_dynamic_table(fields):
    import pylsqpack

    encoder = pylsqpack.Encoder()
    encoder.apply_settings(4096, 16)  # a connection's, as aioquic sets it up
    encoder.encode(0, [(b"x-warm", b"up")])
    if qpack_encodes(fields):
        encoder.encode(4, fields)  # raises if the scratch check was wrong


async def exchange(client: h3ws.H3WebSocketClient, headers, end_stream: bool = True):
    exchange = client.send_request(headers, end_stream=end_stream)
    status = await exchange.wait_status(10)
    await exchange.wait_ended(10)  # (an open request side closes with the connection)
    return status, bytes(exchange.response_body)


def test_a_request_or_response_too_large_for_qpack_gets_a_502_on_its_stream_and_the_connection_lives(
        cert, tmp_path):
    script = tmp_path / "growing.py"
    script.write_text(GROWING)

    async def scenario():
        async with h3ws.H3WebSocketServer(*cert, pages={"/page": ("text/plain", b"page")}) as upstream:
            async with Mitmdump("--mode", f"reverse:http3://127.0.0.1:{upstream.port}", "--ssl-insecure",
                                "-s", str(script)) as md:
                client = await h3ws.H3WebSocketClient("127.0.0.1", md.port, server_hostname=AUTHORITY).connect()
                seen = {
                    "big cookie": await exchange(client, GET + [(b"cookie", b"c" * 5000)]),
                    "many fields": await exchange(client, GET + [(b"x-%d" % i, b"~" * 1500) for i in range(4)]),
                    "websocket": await exchange(client, CONNECT + [(b"cookie", b"c" * 5000)], end_stream=False),
                    "grown request": await exchange(client, [*GET[:3], (b":path", b"/grow-request")]),
                    "grown response": await exchange(client, [*GET[:3], (b":path", b"/grow-response")]),
                    "fits": await exchange(client, GET + [(b"cookie", b"c" * 3900)]),
                    "next": await exchange(client, GET),
                }
                closed = client.closed
                await client.close()
            return seen, closed, upstream.requests, md

    seen, closed, reached, md = asyncio.run(scenario())
    for name in ("big cookie", "many fields", "websocket", "grown request", "grown response"):
        status, body = seen[name]
        assert status == 502 and b"too large to encode for HTTP/3" in body, (name, seen[name])
    assert seen["fits"] == (200, b"page") and seen["next"] == (200, b"page")
    assert closed is None  # one connection served them all
    # Only what could be sent reached the upstream (the grown response's request did).
    assert len(reached) == 3, reached
    assert md.log.count("too large to encode for HTTP/3") >= 5
    assert_clean_log(md)



def test_a_handshake_too_large_to_send_upstream_is_recorded_as_the_proxys_doing(cert, report):
    async def scenario():
        async with h3ws.H3WebSocketServer(*cert) as upstream:
            async with Mitmdump("--mode", f"reverse:http3://127.0.0.1:{upstream.port}", "--ssl-insecure",
                                report=report) as md:
                client = await h3ws.H3WebSocketClient("127.0.0.1", md.port, server_hostname=AUTHORITY).connect()
                status = await exchange(client, CONNECT + [(b"cookie", b"c" * 5000)], end_stream=False)
                record = await md.wait_for_record(event="handshake")
                await client.close()
            return status, record, upstream.requests

    (status, _body), record, reached = asyncio.run(scenario())
    assert status == 502 and reached == []
    assert record["transport"] == "h3" and record["outcome"] == "no-status", record
    assert "the proxy itself reset the stream" in record["diagnosis"] and "too large" in record["diagnosis"], record
    assert "c" * 50 not in str(record)  # (the cookie, a secret, is nowhere)
