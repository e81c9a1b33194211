"""Reproduce an encoder-induced WebSocket handshake stall locally, diagnose it, and show the fix.

    python scripts/reproduce.py [--transport h2|h1|both] [--stall 1] [--report reproduce.jsonl]

For each transport (HTTP/2 first: RFC 8441 is where the real bug lives):
1. starts a WebSocket server that withholds its status while the handshake
   offers `accept-encoding` (what a buffering gzip/zstd/br layer does),
2. runs mitmdump with the addon in front of it under `observe`: a client that
   waits for the status before speaking (as browsers do) hangs, and the addon
   reports the stall live, with a diagnosis,
3. runs it again under `strip`: the same client opens and echoes,
4. prints the report records, which are the clean record to attach to a bug
   report (query values and credentials are never in them).

Every process it starts listens on 127.0.0.1 only and is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import h2ws
from fault_server import Faults, FaultServer
from mitmdump_proc import ADDON, start_reverse_proxy



BROWSER_CODINGS = "gzip, deflate, br, zstd"  # what Chromium offers on a WebSocket handshake


async def start_mitmdump(upstream: str, policy: str, stall: float, report: Path):
    return await start_reverse_proxy(
        upstream, "-s", str(ADDON), "--set", f"ws_encode_policy={policy}",
        "--set", f"ws_encode_stall={stall}", "--set", f"ws_encode_report={report}",
    )


async def echo_pump(proc, prefix: str) -> None:
    """Show the addon's own log lines (stall warnings, outcomes) as they happen."""
    async for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        if "WebSocket handshake" in line:
            print(f"{prefix}{line}")


async def h1_client(port: int, path: str, timeout: float) -> str:
    """An HTTP/1.1 WebSocket client that must see the 101 before it speaks."""
    from wsproto import WSConnection
    from wsproto.connection import ConnectionType
    from wsproto.events import AcceptConnection, Message, Request, TextMessage

    ws = WSConnection(ConnectionType.CLIENT)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(ws.send(Request(host=f"127.0.0.1:{port}", target=path,
                                 extra_headers=[(b"accept-encoding", BROWSER_CODINGS.encode())])))
    try:
        async def until(kind):
            while True:
                for event in ws.events():
                    if isinstance(event, kind):
                        return event
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("closed")
                ws.receive_data(data)

        await asyncio.wait_for(until(AcceptConnection), timeout)
        writer.write(ws.send(TextMessage("hello")))
        reply: Message = await asyncio.wait_for(until(Message), timeout)
        return f"opened (101) and echoed {reply.data!r}"
    except asyncio.TimeoutError:
        return f"no status after {timeout:.0f} s: the client is still waiting, gives up"
    finally:
        writer.close()


async def h2_client(port: int, path: str, timeout: float) -> str:
    """An RFC 8441 client that must see the 200 before it speaks."""
    async with await h2ws.H2WebSocketClient("127.0.0.1", port, server_hostname="localhost").connect() as client:
        ws = await client.open_websocket(path, "localhost", headers=[("accept-encoding", BROWSER_CODINGS)])
        try:
            status = await ws.wait_status(timeout)
        except asyncio.TimeoutError:
            await ws.reset()
            return f"no status after {timeout:.0f} s: the client is still waiting, gives up"
        await ws.send_text("hello")
        return f"opened ({status}) and echoed {await ws.receive(timeout)!r}"


async def run_once(upstream: str, client, policy: str, stall: float, report: Path, wait: float) -> str:
    proc, port = await start_mitmdump(upstream, policy, stall, report)
    pump = asyncio.create_task(echo_pump(proc, "    mitmdump | "))
    try:
        return await client(port, "/chat?token=secret-value", wait)
    finally:
        proc.terminate()
        await proc.wait()
        await pump


async def reproduce(transport: str, stall: float, report: Path, certdir: str) -> None:
    if transport == "h2":
        server = h2ws.H2WebSocketServer(*h2ws.make_self_signed_cert(certdir), withhold_status_when_encoding=True)
        await server.start()
        upstream, client = f"https://127.0.0.1:{server.port}", h2_client
        what = "an HTTP/2 WebSocket server (RFC 8441) that holds its 200"
    else:
        server = FaultServer(Faults(withhold_when_encoded=True))
        await server.start()
        upstream, client = f"http://127.0.0.1:{server.port}", h1_client
        what = "an HTTP/1.1 WebSocket server that holds its 101"
    print(f"== {transport}: upstream {upstream}, {what} while accept-encoding is offered\n")
    for policy in ("observe", "strip"):
        print(f"ws_encode_policy={policy}: client offers accept-encoding: {BROWSER_CODINGS} and waits for the status")
        result = await run_once(upstream, client, policy, stall, report, wait=stall * 3)
        print(f"  client: {result}\n")
    await server.stop()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transport", choices=["h2", "h1", "both"], default="both")
    parser.add_argument("--stall", type=float, default=1.0, help="ws_encode_stall, seconds (default 1)")
    parser.add_argument("--report", type=Path, default=Path("reproduce.jsonl"), help="report file (default reproduce.jsonl)")
    args = parser.parse_args()
    args.report.unlink(missing_ok=True)
    transports = ["h2", "h1"] if args.transport == "both" else [args.transport]

    with tempfile.TemporaryDirectory() as certdir:
        for transport in transports:
            await reproduce(transport, args.stall, args.report, certdir)

    records = [json.loads(line) for line in args.report.read_text().splitlines()]
    print(f"report ({args.report}):")
    for record in records:
        print("  " + json.dumps(record))
    print()
    ok = True
    for transport in transports:
        mine = [r for r in records if r["transport"] == transport]
        stalled = any(r["event"] == "stall" and r["policy"] == "observe" for r in mine)
        fixed = any(r.get("outcome") == "upgraded" and r["policy"] == "strip" and not r["stalled"] for r in mine)
        print(f"{transport}: observe: stall diagnosed live: {'yes' if stalled else 'NO'}; "
              f"strip: handshake completes: {'yes' if fixed else 'NO'}")
        ok = ok and stalled and fixed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
