"""The addon in a mitmproxy other than the two lines the suite runs on.

mitmproxy 11.1 (Python >= 3.12 only) sits between the two lines; its HTTP/2
and HTTP/3 code differs from 11.0's only cosmetically, and the bridge, which
checks what mitmproxy does instead of trusting version numbers, must carry
HTTP/2 and HTTP/3 WebSockets there too. `scripts/test.sh` sets up `.venv-mitmproxy11.1`
(`scripts/venv.sh 11.1`); the test drives that mitmdump from this suite's
own peers. (The registry has no pre-release of mitmproxy 13 to try.)
"""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from conftest import ROOT, Mitmdump, assert_clean_log, h2_client, h2_echo_once
from wspeers.fault_server import Faults, FaultServer
from wspeers import h2ws, h3ws

VENVS = {"11.1": ROOT / ".venv-mitmproxy11.1"}
AUTHORITY = "localhost"


@pytest.fixture(params=sorted(VENVS), scope="module")
def mitmdump(request):
    venv = VENVS[request.param]
    if not (venv / "bin" / "mitmdump").exists():
        pytest.skip(f"{venv.name} is not set up (scripts/venv.sh {request.param}; no Python >= 3.12 here?)")
    version = subprocess.run([venv / "bin" / "python", "-c", "import mitmproxy.version as v; print(v.VERSION)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version.startswith(request.param + "."), version
    return venv / "bin" / "mitmdump"


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return h2ws.make_self_signed_cert(tmp_path_factory.mktemp("cert"))


def test_an_http2_stall_is_caught_and_reported(mitmdump, cert, report):
    async def scenario():
        async with h2ws.H2WebSocketServer(*cert, withhold_status_when_encoding=True) as upstream:
            async with Mitmdump("--mode", f"reverse:https://127.0.0.1:{upstream.port}", "--ssl-insecure",
                                "--set", "ws_encode_stall=0.3", report=report, mitmdump=mitmdump) as md:
                client = await h2_client(md)
                enables = client.server_enables_connect_protocol
                ws = await client.open_websocket("/chat", AUTHORITY, headers=[("accept-encoding", "gzip, br")])
                stall = await md.wait_for_record(event="stall")
                still_waiting = ws.status is None
                await ws.reset()
                end = await md.wait_for_record(event="handshake")
                await client.close()
        return enables, stall, still_waiting, end, md

    enables, stall, still_waiting, end, md = asyncio.run(scenario())
    assert enables and still_waiting
    assert stall["transport"] == stall["upstream_transport"] == "h2" and stall["stuck_in"] == "forwarded"
    assert "encoding layer" in stall["diagnosis"]
    assert end["outcome"] == "no-status" and "client gave up" in end["diagnosis"]
    assert not [line for line in md.lines if "ws_encode_h2:" in line]
    assert_clean_log(md)


def test_an_http2_websocket_reaches_an_http1_upstream(mitmdump, report):
    async def scenario():
        upstream = FaultServer(Faults())
        await upstream.start()
        try:
            async with Mitmdump("--mode", f"reverse:http://127.0.0.1:{upstream.port}", report=report,
                                mitmdump=mitmdump) as md:
                status, echo = await h2_echo_once(md, "hello")
                record = await md.wait_for_record(event="handshake")
        finally:
            await upstream.stop()
        return status, echo, record, md

    status, echo, record, md = asyncio.run(scenario())
    assert status == 200 and echo == "hello"
    assert record["transport"] == "h2" and record["upstream_transport"] == "h1" and record["upstream_status"] == 101
    assert_clean_log(md)


def test_an_http3_stall_is_caught_and_a_client_speaking_first_is_carried(mitmdump, cert, report):
    """mitmproxy 11.1's HTTP/3 error codes are 11.0's (integers), 12's an enum."""
    async def scenario():
        async with h3ws.H3WebSocketServer(*cert, withhold_status_when_encoding=True) as upstream:
            async with Mitmdump("--mode", f"reverse:http3://127.0.0.1:{upstream.port}", "--ssl-insecure",
                                "--set", "ws_encode_stall=0.3", report=report, mitmdump=mitmdump) as md:
                client = await h3ws.H3WebSocketClient("127.0.0.1", md.port, server_hostname=AUTHORITY).connect()
                held = await client.open_websocket("/chat", AUTHORITY, headers=[("accept-encoding", "gzip")])
                stall = await md.wait_for_record(event="stall")
                first = await client.open_websocket("/chat", AUTHORITY, headers=[("accept-encoding", "gzip")],
                                                    data_before_status=b"first")
                status, echo = await first.wait_status(5), await first.receive(5)
                await held.reset()
                await client.close()
        return stall, status, echo, md

    stall, status, echo, md = asyncio.run(scenario())
    assert stall["transport"] == stall["upstream_transport"] == "h3" and stall["stuck_in"] == "forwarded"
    assert (status, echo) == (200, "first")
    assert not [line for line in md.lines if "ws_encode_h" in line]
    assert_clean_log(md)
