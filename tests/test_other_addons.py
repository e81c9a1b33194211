"""What other addons, a reload and live options do to a handshake's record,
through a real mitmdump: a record never claims what did not happen.

- a status counts as delivered only when the client got it: a response an
  addon kills is not;
- the record says who answered: another addon's 403 before the upstream had
  the request is not the upstream's, and a status an addon changed is said
  as such, with what the upstream really sent;
- a reload or a lowered `ws_encode_stall` keeps every waiting handshake
  followed, its stall reported when due;
- a live `ws_encode_h2=false` changes nothing for connections opened before.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import AUTHORITY, Mitmdump, addon_copy, assert_clean_log, h2_client, reload_script
from wspeers import h2ws
from wspeers.fault_server import Faults, FaultServer

pytestmark = pytest.mark.timeout(90)

OTHER_ADDON = """
from mitmproxy import ctx, http


class Other:
    # Loaded after ws-encode: does to handshakes what the test asks (ACTION),
    # and sets an option when a request to /set/NAME=VALUE comes.

    def request(self, flow):
        if flow.request.path.startswith("/set/"):
            name, value = flow.request.path[len("/set/"):].split("=", 1)
            ctx.options.update(**{name: value})
            flow.response = http.Response.make(200, b"set")
        elif ACTION == "answer 403" and flow.request.path == "/chat":
            flow.response = http.Response.make(403, b"not you")

    def response(self, flow):
        if flow.request.path != "/chat":
            return
        if ACTION == "kill":
            flow.kill()
        elif ACTION == "fail":
            flow.response.status_code = 403


addons = [Other()]
"""


def other_addon(tmp_path, action: str):
    script = tmp_path / "other.py"
    script.write_text(f"ACTION = {action!r}\n" + OTHER_ADDON)
    return script


async def h1_handshake(port: int) -> bytes:
    """An HTTP/1.1 upgrade to /chat: what the client got before the connection ended or 2 s passed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /chat HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(4096), 2)
    except asyncio.TimeoutError:
        return b""
    finally:
        writer.close()


async def h2_handshake(port: int) -> int | str:
    """An extended CONNECT to /chat: its status, or how its stream ended."""
    client = h2ws.H2WebSocketClient("127.0.0.1", port, server_hostname="localhost")
    await client.connect()
    ws = await client.open_websocket("/chat", AUTHORITY)
    try:
        return await ws.wait_status(5)
    except h2ws.WebSocketClosed as e:
        return f"ended: {e}"
    finally:
        await client.close()


@pytest.mark.parametrize("transport", ["h1", "h2"])
@pytest.mark.parametrize("action", ["kill", "answer 403", "fail"])
def test_the_record_says_who_answered_and_never_claims_a_status_the_client_did_not_get(tmp_path, report, transport, action):
    script = other_addon(tmp_path, action)

    async def scenario():
        upstream = FaultServer(Faults())
        await upstream.start()
        try:
            async with Mitmdump("--mode", f"reverse:http://127.0.0.1:{upstream.port}", "-s", str(script),
                                report=report) as md:
                got = await (h1_handshake(md.port) if transport == "h1" else h2_handshake(md.port))
                record = await md.wait_for_record(event="handshake")
        finally:
            await upstream.stop()
        return got, record, upstream.received, md

    got, record, received, md = asyncio.run(scenario())
    upstream_answer = 101  # (the fault server speaks HTTP/1.1: an extended CONNECT reaches it as an upgrade)
    if action == "kill":
        # The client got no status: a reset stream, or a closed connection.
        assert got == b"" or (isinstance(got, str) and got.startswith("ended"))
        assert (record["outcome"], record["status"], record["upstream_status"]) == ("no-status", None, upstream_answer)
        assert "killed in the proxy" in record["diagnosis"] and f"upstream had answered {upstream_answer}" in record["diagnosis"]
    elif action == "answer 403":
        assert got == 403 or got.startswith(b"HTTP/1.1 403")
        assert received == []  # the upstream never saw it
        assert (record["outcome"], record["status"], record["upstream_status"]) == ("rejected", 403, None)
        assert "before the upstream had the request" in record["diagnosis"] and "upstream never saw" in record["diagnosis"]
    else:
        assert got == 403 or got.startswith(b"HTTP/1.1 403")
        assert (record["outcome"], record["status"], record["upstream_status"]) == ("rejected", 403, upstream_answer)
        assert f"the upstream answered {upstream_answer}" in record["diagnosis"] and "changed the status" in record["diagnosis"]
    assert "refused the upgrade" not in record["diagnosis"]
    assert_clean_log(md)


def test_a_reload_keeps_every_waiting_handshake_followed_and_its_stall_reported(tmp_path, report):
    """20 handshakes wait (the upstream withholds its status) when the
    script is reloaded: the new copy reports each one's stall when it is
    due, once, blaming the encoder the offer makes likely."""
    script = addon_copy(tmp_path)
    count = 20

    async def scenario():
        upstream = FaultServer(Faults(withhold_when_encoded=True))
        await upstream.start()
        clients = []
        try:
            async with Mitmdump("--mode", f"reverse:http://127.0.0.1:{upstream.port}", "--set", "ws_encode_stall=3",
                                addon=script, report=report) as md:
                client = await h2_client(md)
                clients.append(client)
                for _ in range(count):
                    await client.open_websocket("/chat", AUTHORITY, headers=[("accept-encoding", "gzip")])
                await upstream.wait_received(count)
                await reload_script(md, script)
                await md.wait_for_count("WebSocket handshake stall", count, timeout=15)
                return md.records()
        finally:
            for client in clients:
                await client.close()
            await upstream.stop()

    records = asyncio.run(scenario())
    stalls = [r for r in records if r["event"] == "stall"]
    assert len(stalls) == count and len({r["flow_id"] for r in stalls}) == count
    assert all(r["stuck_in"] == "forwarded" and r["received_s"] >= 3 for r in stalls)
    assert all("encoding layer upstream is probably holding" in r["diagnosis"] for r in stalls)
