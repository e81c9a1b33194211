"""HTTP/2 WebSockets (RFC 8441) through a real mitmdump running the addon.

Clients and the fault server are built from h2 + wsproto (scripts/wspeers/h2ws.py);
upstreams include mitmproxy-independent servers (Node's http2, hypercorn) and
an HTTP/1.1 server for the translation path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import AUTHORITY, ROOT, STALL, assert_clean_log, h2_client, h2_echo_once, reverse_to
from mitmproxy import io as mitmio
from wspeers.fault_server import Faults, FaultServer
from wspeers import h2ws
from wspeers.h2ws import DualAlpnServer

pytestmark = pytest.mark.timeout(90)



def run(coro):
    return asyncio.run(coro)


def test_h2_upstream_echo_close_and_other_requests(cert, report):
    async def scenario():
        async with h2ws.H2WebSocketServer(*cert) as upstream:
            async with reverse_to(f"https://127.0.0.1:{upstream.port}", report=report) as md:
                client = await h2_client(md)
                assert client.server_enables_connect_protocol
                ws = await client.open_websocket("/chat?token=t0k", AUTHORITY, headers=[("accept-encoding", "gzip")])
                status = await ws.wait_status(5)
                await ws.send_text("hello")
                echo = await ws.receive(5)
                get = await client.get("/plain", AUTHORITY)
                await ws.close()
                await client.close()
                record = await md.wait_for_record(event="handshake")
            return status, echo, get, ws.ended_with, record, upstream.requests, md

    status, echo, get, ended, record, requests, md = run(scenario())
    assert status == 200 and echo == "hello" and get == (200, b"ok")
    assert ended == "end_stream"  # an orderly close, not RST_STREAM
    connect = requests[0]
    assert connect["pseudo"][":method"] == "CONNECT" and connect["pseudo"][":protocol"] == "websocket"
    assert not {"upgrade", "connection", "sec-websocket-key"} & {k for k, _ in connect["headers"]}
    assert record["transport"] == "h2" and record["upstream_transport"] == "h2"
    assert record["status"] == 200 and record["upstream_status"] == 200
    assert record["outcome"] == "upgraded" and record["url"].endswith("?token=REDACTED")
    assert_clean_log(md)


def test_h2_stall_is_reported_live_and_strip_opens_it(cert, report):
    async def scenario(policy):
        async with h2ws.H2WebSocketServer(*cert, withhold_status_when_encoding=True) as upstream:
            async with reverse_to(
                f"https://127.0.0.1:{upstream.port}", "--set", f"ws_encode_policy={policy}", report=report
            ) as md:
                client = await h2_client(md)
                sent = time.monotonic()
                ws = await client.open_websocket("/chat", AUTHORITY, headers=[("accept-encoding", "gzip, deflate, br, zstd")])
                if policy == "observe":
                    stall = await md.wait_for_record(event="stall", policy=policy)
                    seen = time.monotonic() - sent
                    still_waiting = ws.status is None
                    await ws.reset()
                    end = await md.wait_for_record(event="handshake", policy=policy)
                    outcome = (stall, seen, still_waiting, end)
                else:
                    status = await ws.wait_status(5)
                    await ws.send_text("hi")
                    outcome = (status, await ws.receive(5), await md.wait_for_record(event="handshake", policy=policy))
                await client.close()
            return outcome, upstream.requests

    (stall, seen, still_waiting, end), _ = run(scenario("observe"))
    assert still_waiting and STALL <= stall["received_s"] <= seen  # (how late: the bench's goal 4)
    assert stall["waited_s"] <= stall["received_s"] and stall["stuck_in"] == "forwarded"
    assert stall["transport"] == "h2" and stall["upstream_transport"] == "h2"
    assert "encoding layer" in stall["diagnosis"]
    assert end["outcome"] == "no-status" and end["stalled"] and "client gave up" in end["diagnosis"]

    (status, echo, record), requests = run(scenario("strip"))
    assert status == 200 and echo == "hi"
    assert "accept-encoding" not in dict(requests[0]["headers"])
    assert record["accept_encoding_client"] == "gzip, deflate, br, zstd"
    assert record["accept_encoding_upstream"] is None and not record["stalled"]


def test_a_late_status_arriving_with_the_first_data_is_diagnosed(cert, report):
    """The encoder's fingerprint: the 200 held until the server's first
    message, which here only comes once the client speaks, after the stall."""
    async def scenario():
        async with h2ws.H2WebSocketServer(*cert, withhold_status_when_encoding=True) as upstream:
            async with reverse_to(f"https://127.0.0.1:{upstream.port}", report=report) as md:
                client = await h2_client(md)
                ws = await client.open_websocket("/chat", AUTHORITY, headers=[("accept-encoding", "gzip")])
                await md.wait_for_record(event="stall")
                await ws.send_text("first")
                status = await ws.wait_status(5)
                echo = await ws.receive(5)
                await client.close()
                return status, echo, await md.wait_for_record(event="handshake")

    status, echo, record = run(scenario())
    assert status == 200 and echo == "first"
    assert record["client_bytes_before_status"] == len(b"first") + 6  # a masked 5-byte text frame
    assert record["stalled"] and "together with the first response data" in record["diagnosis"]


def test_a_prompt_status_with_the_first_data_says_nothing_of_encoders(cert, report):
    async def scenario():
        async with h2ws.H2WebSocketServer(*cert, withhold_status_when_encoding=True) as upstream:
            async with reverse_to(f"https://127.0.0.1:{upstream.port}", report=report) as md:
                client = await h2_client(md)
                ws = await client.open_websocket(
                    "/chat", AUTHORITY, headers=[("accept-encoding", "gzip")], data_before_status=b"first"
                )
                status = await ws.wait_status(5)
                await client.close()
                return status, await md.wait_for_record(event="handshake")

    status, record = run(scenario())
    assert status == 200 and not record["stalled"]
    assert "nothing withheld the status" in record["diagnosis"] and "encoder" not in record["diagnosis"]


def test_translation_to_an_http1_upstream(cert, report):
    async def scenario():
        upstream = FaultServer(Faults())
        await upstream.start()
        async with reverse_to(f"http://127.0.0.1:{upstream.port}", report=report) as md:
            client = await h2_client(md)
            ws = await client.open_websocket("/chat", AUTHORITY, headers=[("accept-encoding", "br")], data_before_status=b"early")
            status = await ws.wait_status(5)
            early = await ws.receive(5)
            await ws.send_bytes(b"\x00" * 1_000_000)
            big = await ws.receive(10)
            await ws.close()
            await client.close()
            record = await md.wait_for_record(event="handshake")
        await upstream.stop()
        return status, early, big, ws.ended_with, record, upstream.received

    status, early, big, ended, record, received = run(scenario())
    assert status == 200 and early == "early" and big == b"\x00" * 1_000_000
    assert ended == "end_stream"
    head = received[0]
    assert head.method == "GET" and head.headers["upgrade"].lower() == "websocket"
    assert len(head.headers["sec-websocket-key"]) == 24 and head.headers["accept-encoding"] == "br"
    assert record["transport"] == "h2" and record["upstream_transport"] == "h1"
    assert record["status"] == 200 and record["upstream_status"] == 101
    assert record["client_bytes_before_status"] == 11


@pytest.mark.parametrize("upstream_kind", ["http/1.1", "h2"])
def test_the_flow_says_what_was_on_the_wire(cert, tmp_path, upstream_kind):
    """Once it is answered, an HTTP/2 WebSocket's flow is what the client
    sent and got (CONNECT with :protocol, 200), in mitmdump's output and the
    flow file alike; the comment and the metadata say where the proxy
    translated, and what the upstream was sent."""
    flows_file, har_file = tmp_path / "flows.mitm", tmp_path / "flows.har"

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            if upstream_kind == "h2":
                upstream = await stack.enter_async_context(h2ws.H2WebSocketServer(*cert))
                url = f"https://127.0.0.1:{upstream.port}"
            else:
                upstream = FaultServer(Faults())
                await upstream.start()
                stack.push_async_callback(upstream.stop)
                url = f"http://127.0.0.1:{upstream.port}"
            async with reverse_to(url, "-w", str(flows_file), "--set", f"hardump={har_file}") as md:
                echoed = await h2_echo_once(md, "wire")
                await md.wait_for("WebSocket connection closed|handshake upgraded", timeout=5)
        return echoed, md

    echoed, md = run(scenario())
    assert echoed == (200, "wire")
    with flows_file.open("rb") as f:
        [flow] = [x for x in mitmio.FlowReader(f).stream() if x.websocket is not None]
    request, response = flow.request, flow.response
    assert (request.method, request.path, request.http_version) == ("CONNECT", "/chat", "HTTP/2.0")
    assert request.headers.fields[0] == (b":protocol", b"websocket")
    assert not {"upgrade", "connection", "sec-websocket-key"} & {k.lower() for k in request.headers}
    assert (response.status_code, response.reason, response.http_version) == (200, "", "HTTP/2.0")
    assert not {"upgrade", "connection", "sec-websocket-accept"} & {k.lower() for k in response.headers}
    assert [m.text for m in flow.websocket.messages] == ["wire", "wire"]
    # HAR, written at exit: mitmproxy's form of a CONNECT's URL (the authority)
    [entry] = json.loads(har_file.read_text())["log"]["entries"]
    assert (entry["request"]["method"], entry["response"]["status"], entry["_resourceType"]) == ("CONNECT", 200, "websocket")
    assert {"name": ":protocol", "value": "websocket"} in entry["request"]["headers"]
    # mitmdump's own lines for the flow, printed at the response hook after the addon's
    assert any(re.search(r": CONNECT 127\.0\.0\.1:\d+ HTTP/2\.0$", x) for x in md.lines)
    assert any(re.search(r"<< HTTP/2\.0 200 ", x) for x in md.lines)
    wire = flow.metadata["ws_encode_wire"]
    assert wire["client_sent"] == "CONNECT :protocol websocket (RFC 8441)" and wire["client_got"] == 200
    line = next(x for x in flow.comment.splitlines() if x.startswith("On the wire:"))
    assert line.startswith("On the wire: HTTP/2 extended CONNECT (:protocol websocket) /chat → 200; ")
    if upstream_kind == "http/1.1":
        key = wire["sec_websocket_key_sent"]
        assert len(base64.b64decode(key)) == 16 and wire["upstream_status"] == 101
        assert line.endswith(f"; the proxy sent the HTTP/1.1 upstream a GET upgrade (Sec-WebSocket-Key {key}), answered 101.")
    else:
        assert wire["upstream_sent"] == "CONNECT :protocol websocket (RFC 8441)" and wire["upstream_status"] == 200
        assert "sec_websocket_key_sent" not in wire
        assert line.endswith("; the HTTP/2 upstream got the extended CONNECT, answered 200.")
    assert_clean_log(md)


LATER_ADDON = """
import asyncio


class AfterWsEncode:
    # Loaded after ws_encode: notes the form each hook sees, and at the
    # response hook it holds the status or fails the handshake.

    def _saw(self, hook, flow):
        if flow.request.path == "/chat":
            status = flow.response.status_code if flow.response else None
            flow.metadata.setdefault("seen", []).append(
                [hook, flow.request.method, flow.request.headers.fields[0][0].decode(), status]
            )

    def requestheaders(self, flow):
        self._saw("requestheaders", flow)

    def request(self, flow):
        self._saw("request", flow)

    def responseheaders(self, flow):
        self._saw("responseheaders", flow)

    def websocket_start(self, flow):
        self._saw("websocket_start", flow)

    def websocket_message(self, flow):
        self._saw("websocket_message", flow)

    def websocket_end(self, flow):
        self._saw("websocket_end", flow)

    def response(self, flow):
        self._saw("response", flow)
        if flow.websocket is None:
            return
        flow.comment += f"\\nseen at response: {flow.request.method} {flow.response.status_code}"
        if FAIL:
            flow.response.status_code = 403
        if HOLD:
            flow.intercept()
            asyncio.get_running_loop().call_later(HOLD_S, flow.resume)


addons = [AfterWsEncode()]
"""


@pytest.mark.parametrize("hold,fail", [(True, False), (False, True)], ids=["holds the status", "fails the handshake"])
def test_every_hook_of_another_addon_sees_one_form_and_it_may_hold_or_fail_the_handshake(cert, tmp_path, report, hold, fail):
    """From the first hook to the last the flow is the extended CONNECT with
    its :protocol, answered 200 (or not yet answered); a later
    addon holding the response (an intercept, as the console's and mitmweb's
    come after every script) or changing its status still gets what it asked
    for: the status reaches the client when resumed, a stall held by
    interception is reported meanwhile; or the client gets the 403."""
    script, flows_file = tmp_path / "after.py", tmp_path / "flows.mitm"
    script.write_text(f"HOLD, FAIL, HOLD_S = {hold}, {fail}, {2 * STALL}\n" + LATER_ADDON)

    async def scenario():
        async with h2ws.H2WebSocketServer(*cert) as upstream:
            async with reverse_to(f"https://127.0.0.1:{upstream.port}", "-s", str(script), "-w", str(flows_file),
                                  report=report) as md:
                client = await h2_client(md)
                ws = await client.open_websocket("/chat", AUTHORITY)
                status = await ws.wait_status(5)
                echo = None
                if status == 200:
                    await ws.send_text("held")
                    echo = await ws.receive(5)
                    await ws.close()
                else:
                    await ws.wait_ended(5)
                await client.close()
                await md.wait_for("client disconnect", timeout=5)
            return status, echo, md

    status, echo, md = run(scenario())
    with flows_file.open("rb") as f:
        [flow] = [x for x in mitmio.FlowReader(f).stream() if x.request.path == "/chat"]
    assert "seen at response: CONNECT 200" in flow.comment
    # One form in every hook: what the client sent, and the status it got
    # (or, before it, none); never a GET or a 101 in between.
    seen = flow.metadata["seen"]
    assert [hook for hook, *_ in seen[:4]] == ["requestheaders", "request", "responseheaders", "response"]
    assert all(method == "CONNECT" and first == ":protocol" for _, method, first, _ in seen)
    assert [status for *_, status in seen[:4]] == [None, None, 200, 200]
    assert all(status == (200 if hold else 403) for *_, status in seen[4:])
    if hold:
        assert [hook for hook, *_ in seen[4:]] == ["websocket_start", "websocket_message", "websocket_message", "websocket_end"]
    records = [json.loads(line) for line in report.read_text().splitlines()]
    if hold:
        assert (status, echo) == (200, "held")
        assert (flow.request.method, flow.response.status_code) == ("CONNECT", 200)
        assert [m.text for m in flow.websocket.messages] == ["held", "held"]
        stall, end = records
        assert stall["event"] == "stall" and stall["stuck_in"] == "intercepted"
        assert end["outcome"] == "upgraded" and end["stalled"] and end["received_s"] >= 2 * STALL
    else:
        assert (status, echo) == (403, None)
        assert (flow.request.method, flow.response.status_code) == ("CONNECT", 403)
        [end] = records
        assert end["outcome"] == "rejected" and end["status"] == 403
    assert_clean_log(md)


def test_wrong_accept_from_http1_upstream_fails_the_handshake(cert, report):
    async def scenario():
        upstream = FaultServer(Faults(wrong_accept=True))
        await upstream.start()
        async with reverse_to(f"http://127.0.0.1:{upstream.port}", report=report) as md:
            client = await h2_client(md)
            ws = await client.open_websocket("/chat", AUTHORITY)
            status = await ws.wait_status(5)
            await ws.wait_ended(5)
            body = ws.response_body
            await client.close()
            record = await md.wait_for_record(event="handshake")
        await upstream.stop()
        return status, body, record, md

    status, body, record, md = run(scenario())
    assert status == 502 and b"wrong Sec-WebSocket-Accept" in body
    assert record["outcome"] == "rejected" and record["status"] == 502 and record["upstream_status"] == 101
    assert "Sec-WebSocket-Accept" in record["diagnosis"]
    assert_clean_log(md)


def test_h2_upstream_without_rfc8441_falls_back_to_http1(cert, report):
    async def scenario():
        h1 = FaultServer(Faults())
        async with DualAlpnServer(cert, h1) as upstream:
            async with reverse_to(f"https://127.0.0.1:{upstream.port}", report=report) as md:
                client = await h2_client(md)
                get_before = await client.get("/before", AUTHORITY)  # the HTTP/2 connection exists
                ws = await client.open_websocket("/chat", AUTHORITY)
                status = await ws.wait_status(5)
                await ws.send_text("via http/1.1")
                echo = await ws.receive(5)
                get_after = await client.get("/after", AUTHORITY)
                await ws.close()
                await client.close()
                record = await md.wait_for_record(event="handshake")
            return status, echo, get_before, get_after, record, h1.received, upstream.requests, md

    status, echo, before, after, record, h1_received, h2_requests, md = run(scenario())
    assert status == 200 and echo == "via http/1.1"
    assert before == after == (200, b"ok")
    assert [r.method for r in h1_received] == ["GET"] and h1_received[0].headers["upgrade"] == "websocket"
    assert all(r["pseudo"][":method"] == "GET" for r in h2_requests)  # no CONNECT went over h2
    assert record["upstream_transport"] == "h1" and record["outcome"] == "upgraded"
    assert_clean_log(md)


def test_many_websockets_and_a_reset_on_one_connection(cert, report):
    async def scenario():
        async with h2ws.H2WebSocketServer(*cert) as upstream:
            async with reverse_to(f"https://127.0.0.1:{upstream.port}", report=report) as md:
                client = await h2_client(md)
                sockets = [await client.open_websocket(f"/ws{i}", AUTHORITY) for i in range(3)]
                assert [await ws.wait_status(5) for ws in sockets] == [200, 200, 200]
                await sockets[1].reset()
                replies = []
                for i in (0, 2):
                    await sockets[i].send_text(f"still {i}")
                    replies.append(await sockets[i].receive(5))
                replies.append(await client.get("/plain", AUTHORITY))
                big = "x" * 1_000_000
                await sockets[2].send_text(big)
                replies.append(await sockets[2].receive(10) == big)
                for i in (0, 2):
                    await sockets[i].close()
                await client.close()
                records = [await md.wait_for_record(event="handshake", url=f"https://127.0.0.1:{upstream.port}/ws{i}") for i in range(3)]
            return replies, records, md

    replies, records, md = run(scenario())
    assert replies == ["still 0", "still 2", (200, b"ok"), True]
    assert [r["outcome"] for r in records] == ["upgraded"] * 3
    assert_clean_log(md)


def test_upstream_reset_while_waiting(cert, report):
    async def scenario():
        async with h2ws.H2WebSocketServer(*cert, reset_after_connect=True) as upstream:
            async with reverse_to(f"https://127.0.0.1:{upstream.port}", report=report) as md:
                client = await h2_client(md)
                ws = await client.open_websocket("/chat", AUTHORITY)
                try:
                    status = await ws.wait_status(5)
                except h2ws.WebSocketClosed:
                    status = None
                record = await md.wait_for_record(event="handshake")
                other = await client.get("/plain", AUTHORITY)
                await client.close()
            return status, record, other, md

    status, record, other, md = run(scenario())
    assert status in (None, 502)
    assert record["outcome"] == "no-status" and "upstream closed or reset" in record["diagnosis"]
    assert other == (200, b"ok")
    assert_clean_log(md)


def test_bad_protocol_is_refused_on_its_stream_only(cert, report):
    async def scenario():
        async with h2ws.H2WebSocketServer(*cert) as upstream:
            async with reverse_to(f"https://127.0.0.1:{upstream.port}", report=report) as md:
                client = await h2_client(md)
                bad = await client.open_websocket("/x", AUTHORITY, headers=[], protocol="not-websocket")
                bad_status = await bad.wait_status(5)
                ws = await client.open_websocket("/chat", AUTHORITY)
                good_status = await ws.wait_status(5)
                await client.close()
            return bad_status, good_status, md

    bad_status, good_status, md = run(scenario())
    assert bad_status == 501 and good_status == 200
    assert "refused HTTP/2 stream" in md.log
    assert_clean_log(md)


def test_websocket_messages_are_saved_with_w(cert, tmp_path):
    flows_file = tmp_path / "flows.mitm"

    async def scenario():
        async with h2ws.H2WebSocketServer(*cert) as upstream:
            async with reverse_to(f"https://127.0.0.1:{upstream.port}", "-w", str(flows_file)) as md:
                client = await h2_client(md)
                ws = await client.open_websocket("/chat", AUTHORITY)
                await ws.wait_status(5)
                await ws.send_text("saved")
                await ws.receive(5)
                await ws.close()
                await client.close()
                await md.wait_for("WebSocket connection closed")

    run(scenario())
    from mitmproxy import io

    with open(flows_file, "rb") as f:
        [flow] = [fl for fl in io.FlowReader(f).stream() if fl.websocket]
    assert [m.content for m in flow.websocket.messages] == [b"saved", b"saved"]
    assert flow.metadata["ws_encode"]["outcome"] == "upgraded"


def test_ws_encode_h2_off_leaves_mitmproxy_stock(cert):
    async def scenario():
        async with h2ws.H2WebSocketServer(*cert) as upstream:
            async with reverse_to(f"https://127.0.0.1:{upstream.port}", "--set", "ws_encode_h2=false") as md:
                client = await h2_client(md)
                advertised = client.server_enables_connect_protocol
                await client.close()
            return advertised

    assert run(scenario()) is False


def test_node_http2_server_through_the_proxy(cert, report):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")

    async def scenario():
        proc = await asyncio.create_subprocess_exec(
            node, str(ROOT / "tests" / "peers" / "node_h2_ws_server.js"), "0", *cert,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
            port = int(line.split()[-1])
            async with reverse_to(f"https://127.0.0.1:{port}", report=report) as md:
                client = await h2_client(md)
                ws = await client.open_websocket("/node", AUTHORITY)
                status = await ws.wait_status(5)
                await ws.send_text("to node")
                echo = await ws.receive(5)
                await ws.close()
                await client.close()
                record = await md.wait_for_record(event="handshake")
        finally:
            proc.terminate()
            await proc.wait()
        return status, echo, record, md

    status, echo, record, md = run(scenario())
    assert status == 200 and echo == "to node"
    assert record["upstream_transport"] == "h2" and record["upstream_status"] == 200
    assert_clean_log(md)


HYPERCORN_APP = '''
async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            event = await receive()
            if event["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": event.get("text"), "bytes": event.get("bytes")})
    elif scope["type"] == "http":
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
'''


HYPERCORN_LISTENING = re.compile(rb"Running on https://127\.0\.0\.1:(\d+)")


async def hypercorn_port(proc: asyncio.subprocess.Process) -> int:
    """The port hypercorn bound (it binds port 0 itself, so no other process
    can take the port in between), or the reason it did not start."""
    seen = []
    while line := await asyncio.wait_for(proc.stdout.readline(), 20):
        seen.append(line)
        if m := HYPERCORN_LISTENING.search(line):
            return int(m.group(1))
    raise AssertionError(f"hypercorn exited ({await proc.wait()}) before listening:\n" + b"".join(seen).decode(errors="replace"))


def test_hypercorn_through_the_proxy(cert, report, tmp_path):
    (tmp_path / "echo_app.py").write_text(HYPERCORN_APP)

    async def scenario():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hypercorn", "--certfile", cert[0], "--keyfile", cert[1],
            "--bind", "127.0.0.1:0", "echo_app:app",
            cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            port = await hypercorn_port(proc)
            async with reverse_to(f"https://127.0.0.1:{port}", report=report) as md:
                client = await h2_client(md)
                ws = await client.open_websocket("/hyper", AUTHORITY, headers=[("accept-encoding", "gzip")])
                status = await ws.wait_status(5)
                await ws.send_text("to hypercorn")
                echo = await ws.receive(5)
                await client.close()
                record = await md.wait_for_record(event="handshake")
        finally:
            proc.terminate()
            await proc.wait()
        return status, echo, record

    status, echo, record = run(scenario())
    assert status == 200 and echo == "to hypercorn"
    assert record["transport"] == record["upstream_transport"] == "h2"


def test_malformed_extended_connects_are_refused_per_stream(cert):
    """h2 would close the whole connection; each bad stream is refused alone."""
    import ssl

    import h2.config
    import h2.connection
    import h2.events

    requests = {
        1: [(":method", "GET"), (":protocol", "websocket"), (":scheme", "https"), (":path", "/a"), (":authority", AUTHORITY)],
        3: [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"), (":authority", AUTHORITY)],
        5: [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"), (":path", "/c"), (":authority", AUTHORITY)],
        7: [(":method", "GET"), (":scheme", "https"), (":path", "/ok"), (":authority", AUTHORITY)],
        9: [(":method", "GET"), (":scheme", "https"), (":path", "/b"), (":authority", AUTHORITY),
            ("authorization", " Bearer header-SECRET ")],
    }

    async def scenario():
        async with h2ws.H2WebSocketServer(*cert) as upstream:
            async with reverse_to(f"https://127.0.0.1:{upstream.port}") as md:
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
                context.set_alpn_protocols(["h2"])
                reader, writer = await asyncio.open_connection("127.0.0.1", md.port, ssl=context)
                conn = h2.connection.H2Connection(
                    h2.config.H2Configuration(
                        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
                    )
                )
                conn.initiate_connection()
                for sid, headers in requests.items():
                    conn.send_headers(sid, headers, end_stream=sid in (7, 9))
                writer.write(conn.data_to_send())
                outcome: dict[int, str] = {}
                while len(outcome) < len(requests):
                    data = await asyncio.wait_for(reader.read(65536), 10)
                    assert data, f"connection closed, outcome so far: {outcome}"
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.StreamReset):
                            outcome[event.stream_id] = f"reset:{event.error_code}"
                        elif isinstance(event, h2.events.ResponseReceived):
                            outcome[event.stream_id] = dict(event.headers)[b":status"].decode()
                    writer.write(conn.data_to_send())
                writer.close()
            return outcome, md

    outcome, md = run(scenario())
    assert outcome == {1: "reset:1", 3: "reset:1", 5: "400", 7: "200", 9: "reset:1"}
    assert md.log.count("ws_encode: reset HTTP/2 stream") == 3
    assert "header-SECRET" not in md.log
    assert_clean_log(md)


@pytest.mark.parametrize("policy", ["observe", "strip"])
def test_a_200_with_content_encoding(cert, report, policy):
    async def scenario():
        async with h2ws.H2WebSocketServer(*cert, response_headers=[("content-encoding", "br")]) as upstream:
            async with reverse_to(
                f"https://127.0.0.1:{upstream.port}", "--set", f"ws_encode_policy={policy}", report=report
            ) as md:
                client = await h2_client(md)
                ws = await client.open_websocket("/chat", AUTHORITY, headers=[("accept-encoding", "br")])
                status = await ws.wait_status(5)
                headers = dict(ws.response_headers)
                await client.close()
                return status, headers, await md.wait_for_record(event="handshake")

    status, headers, record = run(scenario())
    assert status == 200
    assert record["content_encoding"] == "br" and "content-encoding: br" in record["diagnosis"]
    assert ("content-encoding" in headers) == (policy == "observe")


def test_an_early_message_in_fragments_goes_upstream_only_when_whole(cert, report, tmp_path):
    """The first fragment alone is held (mitmproxy's WebSocket layer, which
    takes over at the status, must not start inside a message); once the
    message is whole it goes upstream, and the withholding server answers."""

    async def scenario():
        async with h2ws.H2WebSocketServer(*cert, withhold_status_when_encoding=True) as upstream:
            async with reverse_to(f"https://127.0.0.1:{upstream.port}", "-w", str(tmp_path / "f.mitm"), report=report) as md:
                client = await h2_client(md)
                ws = await client.open_websocket("/chat", AUTHORITY, headers=[("accept-encoding", "gzip")])
                await ws._send_frames([ws._frames.send_data("hel", fin=False)], 5)
                stall = await md.wait_for_record(event="stall")
                await ws._send_frames([ws._frames.send_data("lo", fin=True)], 5)
                status = await ws.wait_status(5)
                first = await ws.receive(5)
                await ws.send_text("after")
                second = await ws.receive(5)
                await ws.close()
                await client.close()
                record = await md.wait_for_record(event="handshake")
            return stall, status, first, second, record, md

    stall, status, first, second, record, md = run(scenario())
    assert stall["client_bytes_before_status"] > 0
    assert (status, first, second) == (200, "hello", "after")
    assert record["outcome"] == "upgraded" and record["stalled"]
    assert "together with the first response data" in record["diagnosis"]
    assert_clean_log(md)
    from mitmproxy import io

    with open(tmp_path / "f.mitm", "rb") as f:
        [flow] = [fl for fl in io.FlowReader(f).stream() if fl.websocket]
    # The early message went past mitmproxy's WebSocket layer, and is kept all the same.
    assert [(m.from_client, m.text) for m in flow.websocket.messages] == [
        (True, "hello"), (False, "hello"), (True, "after"), (False, "after")
    ]


@pytest.mark.parametrize("upgraded", [True, False], ids=["after the 200", "before the 200"])
def test_trailers_on_a_websocket_stream_reset_only_that_stream(cert, upgraded):
    async def scenario():
        async with h2ws.H2WebSocketServer(*cert, withhold_status_when_encoding=not upgraded) as upstream:
            async with reverse_to(f"https://127.0.0.1:{upstream.port}") as md:
                client = await h2_client(md)
                ws = await client.open_websocket("/bad", AUTHORITY, headers=[("accept-encoding", "gzip")])
                if upgraded:
                    await ws.wait_status(5)
                client.conn.send_headers(ws.stream_id, [("x-trailer", "1")], end_stream=True)
                client._flush()
                ended = await ws.wait_ended(5)
                other = await client.open_websocket("/good", AUTHORITY)
                await other.wait_status(5)
                await other.send_text("fine")
                reply = await other.receive(5)
                await client.close()
            return ended, reply, md

    ended, reply, md = run(scenario())
    assert ended.startswith("reset") and reply == "fine"
    assert "trailers on a WebSocket stream" in md.log
    assert_clean_log(md)


def test_http_1_1_required_moves_the_websocket_and_its_early_data_to_http1(cert, report):
    import h2.errors

    async def scenario():
        h1 = FaultServer(Faults())
        upstream = DualAlpnServer(
            cert, h1, enable_connect_protocol=True,
            reset_after_connect=True, reset_code=h2.errors.ErrorCodes.HTTP_1_1_REQUIRED,
        )
        async with upstream:
            async with reverse_to(f"https://127.0.0.1:{upstream.port}", report=report) as md:
                client = await h2_client(md)
                ws = await client.open_websocket("/chat", AUTHORITY, data_before_status=b"early")
                status = await ws.wait_status(5)
                early = await ws.receive(5)
                await client.close()
                record = await md.wait_for_record(event="handshake")
        return status, early, record, h1.received, md

    status, early, record, h1_received, md = run(scenario())
    assert status == 200 and early == "early"  # nothing the client sent was lost
    assert len(h1_received) == 1 and record["upstream_transport"] == "h1"
    assert record["outcome"] == "upgraded"
    assert_clean_log(md)


def old_form_flows() -> list:
    """HTTP/2 WebSocket flows as earlier versions of the addon saved them:
    one still waiting (the GET upgrade the bridge then handed mitmproxy's
    stream, on HTTP/2.0), and one finished (the CONNECT with :protocol and
    200 it showed from the outcome on)."""
    from mitmproxy import http as mhttp
    from mitmproxy.test import tflow, tutils
    from mitmproxy.websocket import WebSocketData, WebSocketMessage

    waiting = tflow.tflow(req=tutils.treq(
        method=b"GET", path=b"/chat", http_version=b"HTTP/2.0", authority=b"localhost",
        headers=mhttp.Headers(upgrade="websocket", connection="Upgrade", sec_websocket_key="dGhlIHNhbXBsZSBub25jZQ==",
                              sec_websocket_version="13")))
    finished = tflow.tflow(req=tutils.treq(
        method=b"CONNECT", path=b"/chat", http_version=b"HTTP/2.0", authority=b"localhost",
        headers=mhttp.Headers([(b":protocol", b"websocket"), (b"sec-websocket-version", b"13")])),
        resp=tutils.tresp(status_code=200, reason=b"", http_version=b"HTTP/2.0", headers=mhttp.Headers()))
    finished.websocket = WebSocketData(messages=[WebSocketMessage(1, True, b"hello"), WebSocketMessage(1, False, b"hello")])
    finished.comment = "On the wire: HTTP/2 extended CONNECT (:protocol websocket) /chat → 200; the proxy ran it as a GET upgrade."
    finished.metadata["ws_encode_wire"] = {"client_sent": "CONNECT :protocol websocket (RFC 8441)", "client_got": 200}
    return [waiting, finished]


def test_flow_files_written_by_the_old_form_still_load_and_replay_through_the_addon(tmp_path):
    """What earlier versions wrote: mitmdump reads it with the addon loaded
    (-nr runs every flow through the addons' hooks), and writes it again."""
    old, again = tmp_path / "old.mitm", tmp_path / "again.mitm"
    with old.open("wb") as f:
        writer = mitmio.FlowWriter(f)
        for flow in old_form_flows():
            writer.add(flow)
    done = subprocess.run([str(Path(sys.executable).with_name("mitmdump")), "-n", "-r", str(old), "-w", str(again), "-s", str(ROOT / "addon" / "ws_encode.py")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    with again.open("rb") as f:
        flows = list(mitmio.FlowReader(f).stream())
    by_method = {x.request.method: x for x in flows}
    assert sorted(by_method) == ["CONNECT", "GET"] and by_method["GET"].response is None
    assert by_method["CONNECT"].response.status_code == 200
    assert [m.text for m in by_method["CONNECT"].websocket.messages] == ["hello", "hello"]
