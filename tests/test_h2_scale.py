"""Many HTTP/2 WebSockets on one client connection, through a real mitmdump.

What mitmproxy alone gets wrong once WebSockets share an HTTP/2 connection
(the bridge in addon/wsencode/bridge/ fixes each):

- its per-server throttle (5 upstream connections per client connection,
  each held until it closes) stops a sixth WebSocket to an HTTP/1.1 upstream
  for good;
- toward a client that does not read, nothing stops the upstream side, so
  the proxy buffers without bound;
- an upgraded stream is never dropped, so every finished WebSocket stays in
  memory until the connection closes.

Memory is read from /proc/<pid>/status (VmRSS) of the mitmdump under test,
and the proxy's own state from a script loaded into it (PROBE below).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import h2.errors
import pytest
from conftest import ROOT, Mitmdump, assert_clean_log, h2_client
from wspeers.fault_server import Faults, FaultServer
from wspeers.h2ws import DualAlpnServer
from wspeers import h2ws

pytestmark = pytest.mark.timeout(120)

AUTHORITY = "localhost"
COMMAND_ANSWERS = ROOT / "tests" / "command_answers.py"
MIB = 1 << 20

# Loaded into the mitmdump under test: GET /__proxy_state__ answers what the
# proxy holds (live flows, the HTTP layers' streams and connections) and its pid.
PROBE = '''
import gc, json, os
from mitmproxy import http
from mitmproxy.proxy.layers.http import HttpLayer

class ProxyState:
    def request(self, flow):
        if flow.request.path != "/__proxy_state__":
            return
        gc.collect()
        objects = gc.get_objects()
        layers = [o for o in objects if isinstance(o, HttpLayer)]
        codecs = [o for o in objects if type(o).__name__ in ("WsHttp2Server", "WsHttp2Client")]  # the bridge's
        state = {
            "codec_websockets": sum(len(codec.websockets) for codec in codecs),
            "pid": os.getpid(),
            "flows": sum(isinstance(o, http.HTTPFlow) for o in objects) - 1,  # not this request's
            "streams": sum(len(layer.streams) for layer in layers) - 1,
            "connections": sum(len(layer.connections) for layer in layers),
        }
        flow.response = http.Response.make(200, json.dumps(state))

addons = [ProxyState()]
'''

# Upstreams a WebSocket from an HTTP/2 client can meet, by what they speak.
UPSTREAMS = ["http/1.1", "h2 without RFC 8441", "h2"]


@pytest.fixture
def probe(tmp_path) -> Path:
    path = tmp_path / "proxy_state.py"
    path.write_text(PROBE)
    return path


@contextlib.asynccontextmanager
async def upstream(kind: str, cert, **h2_options):
    """A running upstream of `kind`; yields its URL for reverse mode."""
    h1 = FaultServer(Faults())
    if kind == "http/1.1":
        await h1.start()
        try:
            yield f"http://127.0.0.1:{h1.port}"
        finally:
            await h1.stop()
    else:
        server = DualAlpnServer(cert, h1) if kind == "h2 without RFC 8441" else h2ws.H2WebSocketServer(*cert, **h2_options)
        async with server:
            yield f"https://127.0.0.1:{server.port}"


def proxy(url: str, probe: Path, *options: str) -> Mitmdump:
    return Mitmdump(
        "--mode", f"reverse:{url}", "--ssl-insecure", "-s", str(probe), "-s", str(COMMAND_ANSWERS), *options
    )


async def proxy_state(client: h2ws.H2WebSocketClient) -> dict:
    status, body = await client.get("/__proxy_state__", AUTHORITY)
    assert status == 200
    state = json.loads(body)
    status, waiting = await client.get("/__wsencode__/wsencode.waiting", AUTHORITY)
    assert status == 200
    # Its answer is one line per waiting handshake, or one line saying none is.
    state["waiting"] = [line for line in json.loads(waiting) if not line.startswith("no ")]
    state["rss"] = resident_bytes(state["pid"])
    return state


async def released_state(client: h2ws.H2WebSocketClient, timeout: float = 10) -> dict:
    """The proxy's state once it holds nothing of finished WebSockets, or as
    it is at `timeout`. A client's close completes when the proxy has ended
    the client's stream; the upstream's END_STREAM for the same WebSocket can
    still be on its way (the codec keeps the stream until it comes), and
    nothing the client sees says when it has come, so the state is asked
    again until it settles."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        state = await proxy_state(client)
        held = state["flows"] or state["streams"] or state["codec_websockets"] or state["waiting"]
        if not held or asyncio.get_running_loop().time() > deadline:
            return state
        await asyncio.sleep(0.05)


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def echo_round(client: h2ws.H2WebSocketClient, count: int, path: str) -> None:
    """Open `count` WebSockets at once, echo one message on each, close them.
    A round takes about a second; the generous timeouts are for a loaded
    machine (a hang still fails)."""
    sockets = [await client.open_websocket(f"{path}{i}", AUTHORITY) for i in range(count)]
    assert [await ws.wait_status(30) for ws in sockets] == [200] * count
    for i, ws in enumerate(sockets):
        await ws.send_text(f"m{i}")
    assert [await ws.receive(30) for ws in sockets] == [f"m{i}" for i in range(count)]
    await asyncio.gather(*(ws.close(timeout=30) for ws in sockets))


@pytest.mark.parametrize("kind", UPSTREAMS)
def test_sixty_websockets_at_once_with_requests_between(cert, probe, kind):
    """mitmproxy alone opens five: each takes one of the five connections
    its throttle allows per server and never gives it back."""
    count = 60

    async def scenario():
        async with upstream(kind, cert) as url, proxy(url, probe) as md:
            client = await h2_client(md)
            sockets, gets = [], []
            for i in range(count):
                sockets.append(await client.open_websocket(f"/ws{i}", AUTHORITY))
                if i % 10 == 9:  # ordinary requests on the same connection, between them
                    gets.append(asyncio.ensure_future(client.get(f"/plain{i}", AUTHORITY, timeout=20)))
            statuses = await asyncio.gather(*(ws.wait_status(20) for ws in sockets), return_exceptions=True)
            for i, ws in enumerate(sockets):
                await ws.send_text(f"to {i}")
            echoes = await asyncio.gather(*(ws.receive(20) for ws in sockets), return_exceptions=True)
            gets.append(asyncio.ensure_future(client.get("/after", AUTHORITY, timeout=20)))
            answers = await asyncio.gather(*gets)
            await asyncio.gather(*(ws.close(timeout=20) for ws in sockets))
            state = await released_state(client)
            await client.close()
        return statuses, echoes, answers, state, md

    statuses, echoes, answers, state, md = asyncio.run(scenario())
    assert statuses == [200] * count
    assert echoes == [f"to {i}" for i in range(count)]
    assert answers == [(200, b"ok\n" if kind == "http/1.1" else b"ok")] * (count // 10 + 1)
    assert state["flows"] == state["streams"] == state["codec_websockets"] == 0 and state["waiting"] == []
    assert_clean_log(md)


@pytest.mark.parametrize("kind", ["h2", "http/1.1"])
def test_websockets_the_client_ends_first_are_released(cert, probe, kind):
    """A client that ends its side first (END_STREAM, no Close frame): the
    WebSocket layer then closes the proxy's side, after which no event comes
    for that stream; the codec kept each such WebSocket until the connection
    closed (found by tests/test_h2codecs.py)."""
    count = 20

    async def scenario():
        async with upstream(kind, cert) as url, proxy(url, probe) as md:
            client = await h2_client(md)
            sockets = [await client.open_websocket(f"/first{i}", AUTHORITY) for i in range(count)]
            assert [await ws.wait_status(20) for ws in sockets] == [200] * count
            for ws in sockets:
                ws.half_close()
            ended = [await ws.wait_ended(20) for ws in sockets]
            state = await released_state(client)
            await client.close()
        return ended, state, md

    ended, state, md = asyncio.run(scenario())
    assert ended == ["end_stream"] * count
    assert state["codec_websockets"] == state["flows"] == state["streams"] == 0
    assert_clean_log(md)


def test_handshakes_the_client_resets_while_waiting_are_released(cert, probe):
    """A client that gives up on a withheld status (RST_STREAM): mitmproxy
    resets the upstream CONNECT for it, after which no event comes for that
    stream, and the upstream codec kept every such handshake until the
    connection closed (found by tests/test_h2codecs.py)."""
    count = 20

    async def scenario():
        async with upstream("h2", cert, withhold_status_when_encoding=True) as url, \
                proxy(url, probe, "--set", "ws_encode_stall=0.2") as md:
            client = await h2_client(md)
            sockets = [await client.open_websocket(f"/given-up{i}", AUTHORITY, headers=[("accept-encoding", "gzip")])
                       for i in range(count)]
            await md.wait_for_count("WebSocket handshake stall on", count, timeout=20)  # all of them upstream
            for ws in sockets:
                await ws.reset()
            state = await released_state(client)
            await client.close()
        return state, md

    state, md = asyncio.run(scenario())
    assert state["codec_websockets"] == state["flows"] == state["streams"] == 0 and state["waiting"] == []
    assert_clean_log(md)


@pytest.mark.parametrize("kind", ["h2", "http/1.1"])
def test_finished_websockets_are_released(cert, probe, kind):
    """3,000 WebSockets one after another on one connection left 3,000 live
    flows, and 75 MiB more resident memory, in mitmproxy alone.

    The counts are kept small for the time they take (each WebSocket costs
    mitmproxy a dozen hooks, some 5-20 ms on a shared 2-core machine), 10,000
    would take minutes: 600 (400 with an HTTP/1.1 connection each) after
    200 to warm up tell 14-25 KiB per WebSocket from none.
    """
    warmup, count, batch = 200, 600 if kind == "h2" else 400, 50

    async def scenario():
        async with upstream(kind, cert) as url, proxy(url, probe) as md:
            client = await h2_client(md)
            for r in range(warmup // batch):
                await echo_round(client, batch, f"/w{r}-")
            before = await proxy_state(client)
            for r in range(count // batch):
                await echo_round(client, batch, f"/r{r}-")
                # Python frees a finished flow's reference cycles at its next
                # full collection, whose time depends on allocation counts;
                # the probe collects, so that resident memory shows what the
                # proxy holds rather than garbage waiting for the collector.
                after = await released_state(client)
            await client.close()
        return before, after, md

    before, after, md = asyncio.run(scenario())
    # Nothing of a finished WebSocket is kept: no flow, no stream, and of
    # the HTTP/1.1 upstream connections only those closing right now.
    assert after["flows"] == after["streams"] == after["codec_websockets"] == 0 and after["waiting"] == []
    assert after["connections"] <= before["connections"] + batch
    # mitmproxy alone grew by 14-25 KiB per WebSocket. The bound leaves room
    # for what h2 itself keeps of closed streams (about 100 bytes each, up to
    # 2**16 per connection) and the allocator's fragmentation.
    assert after["rss"] - before["rss"] < count * 4 * 1024, (before, after, count)
    assert_clean_log(md)


def test_a_client_that_does_not_read_is_reset_alone(cert, probe):
    """mitmproxy grants the upstream an unlimited window and reads on, so the
    bytes a stalled client does not take pile up in the proxy (200 MiB pushed
    made it 385 MiB bigger); the bridge resets that stream once
    MAX_BUFFERED_BYTES wait, and nothing else is touched."""
    from wsencode.bridge.common import MAX_BUFFERED_BYTES

    pushed = 200 * MIB

    async def scenario():
        async with upstream("h2", cert) as url, proxy(url, probe) as md:
            client = await h2_client(md)
            healthy = [await client.open_websocket(f"/healthy{i}", AUTHORITY) for i in range(3)]
            assert [await ws.wait_status(10) for ws in healthy] == [200] * 3
            before = await proxy_state(client)
            stalled = await client.open_websocket(f"/stalled?push={pushed}", AUTHORITY)
            stalled.reading = False
            ended = await stalled.wait_ended(60)
            line = await md.wait_for("reset HTTP/2 stream .*does not read")
            peak = resident_bytes(before["pid"])
            # The other streams, and another connection, carry on.
            for i, ws in enumerate(healthy):
                await ws.send_text(f"still {i}")
            echoes = [await ws.receive(10) for ws in healthy]
            get = await client.get("/plain", AUTHORITY)
            other = await h2_client(md)
            await echo_round(other, 3, "/other")
            await other.close()
            await asyncio.gather(*(ws.close(timeout=10) for ws in healthy))
            after = await released_state(client)
            await client.close()
        return ended, line, before, peak, after, echoes, get, md

    ended, line, before, peak, after, echoes, get, md = asyncio.run(scenario())
    assert ended == f"reset:{int(h2.errors.ErrorCodes.CANCEL)}"
    assert f"more than {MAX_BUFFERED_BYTES} bytes" in line
    assert echoes == [f"still {i}" for i in range(3)] and get == (200, b"ok")
    # What can be held for the stalled stream: its send buffer, as much
    # again in its flow's messages, and a read or two from the upstream in
    # flight; mitmproxy alone grew by nearly twice what was pushed.
    assert peak - before["rss"] < 4 * MAX_BUFFERED_BYTES, (before, peak)
    assert after["flows"] == after["streams"] == 0 and after["waiting"] == []
    assert_clean_log(md)


def test_an_upstream_that_does_not_read_is_reset_alone(cert, probe):
    """The same toward an HTTP/2 upstream: mitmproxy acknowledges the
    client's DATA as it arrives and buffers what the upstream does not take."""
    from wsencode.bridge.common import MAX_BUFFERED_BYTES

    async def scenario():
        async with upstream("h2", cert) as url, proxy(url, probe) as md:
            client = await h2_client(md)
            deaf = await client.open_websocket("/deaf?deaf", AUTHORITY)
            other = await client.open_websocket("/other", AUTHORITY)
            assert [await deaf.wait_status(10), await other.wait_status(10)] == [200, 200]
            await deaf.send_bytes(bytes(MAX_BUFFERED_BYTES + MIB), timeout=30)
            line = await md.wait_for("reset upstream HTTP/2 stream .*does not read")
            ended = await deaf.wait_ended(10)
            await other.send_text("still here")
            echo = await other.receive(10)
            await other.close()
            after = await released_state(client)
            await client.close()
        return line, ended, echo, after, md

    line, ended, echo, after, md = asyncio.run(scenario())
    assert f"the upstream does not read: more than {MAX_BUFFERED_BYTES} bytes" in line
    assert ended == "end_stream"  # the WebSocket layer closed the client's side: its peer went away
    assert echo == "still here"
    assert after["flows"] == after["streams"] == 0
    assert_clean_log(md)
