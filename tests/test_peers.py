"""Tests for the RFC 8441 test peers themselves, without any proxy in between.

The client from scripts/wspeers/h2ws.py is run against the Python server from the same
module and against tests/peers/node_h2_ws_server.js (an independent
implementation on Node's http2), so the peers can be trusted when the
ws-encode tests put mitmproxy between them.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

from wspeers import h2ws
import pytest

ROOT = Path(__file__).resolve().parent.parent
# The RFC 8441 peers as a person runs them: `.venv-mitmproxy12/bin/python -m wspeers.h2ws ...`.
H2WS = [sys.executable, "-m", "wspeers.h2ws"]
NODE_SERVER = ROOT / "tests" / "peers" / "node_h2_ws_server.js"
AUTHORITY = "localhost"
STARTUP_TIMEOUT = 10.0




# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """First stdout line of `proc`, or fail after `timeout` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"{proc.args!r} printed nothing within {timeout} s")
    return proc.stdout.readline().strip()


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture(scope="module")
def node_server_port(cert):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; the Node http2 reference server cannot run")
    certfile, keyfile = cert
    proc = subprocess.Popen(
        [node, str(NODE_SERVER), "0", certfile, keyfile],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(proc, STARTUP_TIMEOUT)
        assert line.startswith("listening "), line
        yield int(line.split()[1])
    finally:
        _stop(proc)


@contextlib.asynccontextmanager
async def python_server(cert, **options):
    certfile, keyfile = cert
    async with h2ws.H2WebSocketServer(certfile, keyfile, **options) as server:
        yield server
    assert server.protocol_errors == []


@pytest.fixture(params=["python", "node"])
def echo_server(request, cert):
    """Factory for an async context manager yielding the port of an echo server."""
    if request.param == "node":
        port = request.getfixturevalue("node_server_port")

        @contextlib.asynccontextmanager
        async def running():
            yield port

    else:

        @contextlib.asynccontextmanager
        async def running():
            async with python_server(cert) as server:
                yield server.port

    return running


async def open_client(port: int):
    return await h2ws.H2WebSocketClient("127.0.0.1", port).connect()


# --------------------------------------------------------------------------
# Against both servers
# --------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_server_advertises_connect_protocol(echo_server):
    async def scenario():
        async with echo_server() as port, await open_client(port) as client:
            assert client.server_enables_connect_protocol is True

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_echo_round_trip(echo_server):
    async def scenario():
        async with echo_server() as port, await open_client(port) as client:
            ws = await client.open_websocket("/chat", AUTHORITY)
            assert await ws.wait_status(5) == 200
            await ws.send_text("hello")
            assert await ws.receive(5) == "hello"
            await ws.send_bytes(b"\x00\x01\xff")
            assert await ws.receive(5) == b"\x00\x01\xff"
            await ws.send_fragmented(["frag", "mented ", "text"])
            assert await ws.receive(5) == "fragmented text"
            assert await ws.ping(b"are you there", 5) == b"are you there"
            await ws.close(timeout=5)
            assert ws.close_code == 1000
            assert ws.ended_with == "end_stream"

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_one_megabyte_messages(echo_server):
    binary = os.urandom(1024 * 1024)
    text = "ü" * (512 * 1024)  # 1 MiB once UTF-8 encoded

    async def scenario():
        async with echo_server() as port, await open_client(port) as client:
            ws = await client.open_websocket("/", AUTHORITY)
            assert await ws.wait_status(5) == 200
            await ws.send_bytes(binary, timeout=10)
            assert await ws.receive(10) == binary
            await ws.send_text(text, timeout=10)
            assert await ws.receive(10) == text
            await ws.close(timeout=5)

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_three_websockets_and_a_get_on_one_connection(echo_server):
    async def scenario():
        async with echo_server() as port, await open_client(port) as client:
            sockets = [await client.open_websocket(f"/ws/{i}", AUTHORITY) for i in range(3)]
            statuses = await asyncio.gather(*(ws.wait_status(5) for ws in sockets))
            assert statuses == [200, 200, 200]
            for i, ws in enumerate(sockets):
                await ws.send_text(f"message {i}")
            assert await client.get("/", AUTHORITY) == (200, b"ok")
            # Answers must stay on their own streams.
            for i, ws in reversed(list(enumerate(sockets))):
                assert await ws.receive(5) == f"message {i}"
            await asyncio.gather(*(ws.close(timeout=5) for ws in sockets))
            assert [ws.ended_with for ws in sockets] == ["end_stream"] * 3

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_client_reset_leaves_the_connection_usable(echo_server):
    async def scenario():
        async with echo_server() as port, await open_client(port) as client:
            ws = await client.open_websocket("/", AUTHORITY)
            assert await ws.wait_status(5) == 200
            await ws.reset()
            assert ws.ended_with == "local_reset:8"
            with pytest.raises(h2ws.StreamResetError):
                await ws.send_text("too late")
            assert await client.get("/", AUTHORITY) == (200, b"ok")

    asyncio.run(scenario())


# --------------------------------------------------------------------------
# Python server options
# --------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_withholding_server_stalls_only_when_accept_encoding_is_sent(cert):
    async def scenario():
        async with python_server(cert, withhold_status_when_encoding=True) as server:
            async with await open_client(server.port) as client:
                stalled = await client.open_websocket("/", AUTHORITY, headers=[("accept-encoding", "gzip")])
                with pytest.raises(asyncio.TimeoutError):
                    await stalled.wait_status(0.5)
                assert stalled.status is None

                plain = await client.open_websocket("/", AUTHORITY)
                assert await plain.wait_status(5) == 200
                await plain.send_text("still fine")
                assert await plain.receive(5) == "still fine"
                await stalled.reset()

            first, second = server.requests
            assert ("accept-encoding", "gzip") in first["headers"]
            assert first["pseudo"][":protocol"] == "websocket"
            assert all(name != "accept-encoding" for name, _ in second["headers"])

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_data_before_status_releases_the_withheld_status(cert):
    async def scenario():
        async with python_server(cert, withhold_status_when_encoding=True) as server:
            async with await open_client(server.port) as client:
                ws = await client.open_websocket(
                    "/", AUTHORITY, headers=[("accept-encoding", "gzip")], data_before_status=b"early"
                )
                assert await ws.wait_status(5) == 200
                assert await ws.receive(5) == "early"
                assert ws.events[:2] == ["status:200", "message"]
                # The held status went out right in front of the first DATA frame.
                on_stream = [e for e in client.events if getattr(e, "stream_id", None) == ws.stream_id]
                assert [type(e).__name__ for e in on_stream[:2]] == ["ResponseReceived", "DataReceived"]
                await ws.close(timeout=5)
                assert ws.ended_with == "end_stream"

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_reset_after_connect(cert):
    async def scenario():
        async with python_server(cert, reset_after_connect=True) as server:
            async with await open_client(server.port) as client:
                ws = await client.open_websocket("/", AUTHORITY)
                with pytest.raises(h2ws.StreamResetError) as caught:
                    await ws.wait_status(5)
                assert caught.value.code == 8  # CANCEL
                assert ws.ended_with == "reset:8"

                # DATA racing the reset lands on a stream the server forgot.
                racing = await client.open_websocket("/", AUTHORITY, data_before_status=b"racing")
                with pytest.raises(h2ws.StreamResetError):
                    await racing.wait_status(5)
                assert await client.get("/", AUTHORITY) == (200, b"ok")

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_rejection_status_carries_body_and_headers(cert):
    async def scenario():
        options = {"status": 403, "response_headers": [("x-reason", "forbidden")]}
        async with python_server(cert, **options) as server:
            async with await open_client(server.port) as client:
                ws = await client.open_websocket("/", AUTHORITY)
                assert await ws.wait_status(5) == 403
                assert ("x-reason", "forbidden") in ws.response_headers
                assert await ws.wait_ended(5) == "end_stream"
                assert bytes(ws.response_body) == b"rejected\n"
                with pytest.raises(h2ws.WebSocketClosed):
                    await ws.receive(5)  # a rejection body is not WebSocket frames

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_extra_response_headers_on_success(cert):
    async def scenario():
        async with python_server(cert, response_headers=[("content-encoding", "gzip")]) as server:
            async with await open_client(server.port) as client:
                ws = await client.open_websocket("/", AUTHORITY)
                assert await ws.wait_status(5) == 200
                assert ("content-encoding", "gzip") in ws.response_headers
                await ws.send_text("framing is not affected")
                assert await ws.receive(5) == "framing is not affected"

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_without_connect_protocol_setting(cert):
    async def scenario():
        async with python_server(cert, enable_connect_protocol=False) as server:
            async with await open_client(server.port) as client:
                assert client.server_enables_connect_protocol is False
                # Sent anyway: the server treats it as malformed (RFC 8441 section 3).
                ws = await client.open_websocket("/", AUTHORITY)
                with pytest.raises(h2ws.StreamResetError) as caught:
                    await ws.wait_status(5)
                assert caught.value.code == 1  # PROTOCOL_ERROR
                assert await client.get("/", AUTHORITY) == (200, b"ok")

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_unknown_protocol_is_refused(cert):
    async def scenario():
        async with python_server(cert) as server:
            async with await open_client(server.port) as client:
                ws = await client.open_websocket("/", AUTHORITY, protocol="not-websocket")
                assert await ws.wait_status(5) == 501
                assert await ws.wait_ended(5) == "end_stream"
            assert server.requests[0]["pseudo"][":protocol"] == "not-websocket"

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_server_stop_ends_open_websockets(cert):
    async def scenario():
        async with python_server(cert) as server:
            client = await open_client(server.port)
            ws = await client.open_websocket("/", AUTHORITY)
            assert await ws.wait_status(5) == 200
            await server.stop()
            with pytest.raises(h2ws.WebSocketClosed):
                await ws.receive(5)
            assert ws.ended_with == "connection_lost"
            await client.close()

    asyncio.run(scenario())


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _cli(*args: str, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*H2WS, *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize("command", ["server", "client"])
def test_cli_help(command):
    result = _cli(command, "--help")
    assert result.returncode == 0
    assert "usage:" in result.stdout


@pytest.mark.timeout(30)
def test_cli_client_reports_the_stall(cert):
    certfile, keyfile = cert
    server = subprocess.Popen(
        [*H2WS, "server", "--port", "0", "--withhold", "--cert", certfile, "--key", keyfile],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(server, STARTUP_TIMEOUT)
        assert line.startswith("listening on 127.0.0.1:"), line
        url = f"https://127.0.0.1:{line.rsplit(':', 1)[1]}/"

        stalled = _cli("client", "--url", url, "--accept-encoding", "gzip", "--timeout", "0.5")
        assert stalled.returncode == 1, stalled
        assert "no :status" in stalled.stdout

        fine = _cli("client", "--url", url, "--timeout", "5")
        assert fine.returncode == 0, fine
        assert "echo: hello" in fine.stdout
    finally:
        _stop(server)
