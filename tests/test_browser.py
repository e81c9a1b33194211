"""The original report, end to end: headless Chromium opens a wss:// WebSocket
to an HTTP/2 server through the proxy.

Chromium takes RFC 8441 as soon as the proxy advertises it, over the HTTP/2
connection it already has to the origin, and sends `accept-encoding: gzip,
deflate, br, zstd` on the handshake. Against a server that withholds the 200
while `accept-encoding` is present the page hangs, the stall is reported while
it waits, and `strip` makes it open.
"""

from __future__ import annotations

import asyncio

from conftest import Mitmdump, assert_clean_log
from peers import chromium
from wspeers.fault_server import Faults, FaultServer
from wspeers.h2ws import DualAlpnServer
from wspeers import h2ws

pytestmark = chromium.MARKS

STALL = 1.0

PAGE = """<!doctype html><script>
const base = "https://127.0.0.1:{port}";
// A request first, so Chromium has an HTTP/2 connection to the origin: it only
// uses RFC 8441 on an existing one.
fetch(base + "/warmup", {{mode: "no-cors", credentials: "include"}}).then(() => {{
  const ws = new WebSocket("wss://127.0.0.1:{port}/ws?token=browser-secret");
  ws.onopen = () => ws.send("hi");
  ws.onmessage = (e) => fetch(base + "/result?echo=" + e.data, {{mode: "no-cors", credentials: "include"}});
  ws.onerror = () => fetch(base + "/result?error=1", {{mode: "no-cors", credentials: "include"}});
}});
</script>"""


def browse(cert, home, report, policy: str, withhold: bool, upstream=None, *options: str):
    async def scenario():
        async with upstream or h2ws.H2WebSocketServer(*cert, withhold_status_when_encoding=withhold) as upstream_:
            async with Mitmdump(
                "--ssl-insecure", "--set", f"ws_encode_policy={policy}", "--set", f"ws_encode_stall={STALL}",
                *options, report=report,
            ) as md:
                browser = await chromium.start(chromium.page(PAGE.format(port=upstream_.port)), home, md.port)
                try:
                    if withhold and policy == "observe":
                        stall = await md.wait_for_record(event="stall", timeout=60)
                        result = None
                    else:
                        stall = None
                        result = await md.wait_for(r"/result\?", timeout=60)
                    handshake = None if stall else await md.wait_for_record(event="handshake", policy=policy)
                finally:
                    await chromium.stop(browser)
            return stall, result, handshake, upstream_.requests, md

    return asyncio.run(scenario())


def test_chromium_takes_rfc8441_through_the_proxy(cert, home, report):
    stall, result, record, requests, md = browse(cert, home, report, "observe", withhold=False)
    assert "/result?echo=hi" in result
    assert record["transport"] == "h2" and record["upstream_transport"] == "h2"
    assert record["outcome"] == "upgraded" and record["status"] == 200
    assert "gzip" in record["accept_encoding_client"]
    assert any(r["pseudo"].get(":protocol") == "websocket" for r in requests)
    assert "browser-secret" not in report.read_text()
    assert_clean_log(md)


def test_chromium_stalls_on_a_withholding_server_and_strip_opens_it(cert, home, tmp_path_factory, report):
    stall, _, _, _, md = browse(cert, home, report, "observe", withhold=True)
    assert_clean_log(md)
    assert stall["transport"] == "h2" and stall["status"] is None
    assert stall["accept_encoding_client"] == "gzip, deflate, br, zstd"
    assert "encoding layer" in stall["diagnosis"]

    _, result, record, requests, _ = browse(cert, tmp_path_factory.mktemp("c"), report, "strip", withhold=True)
    assert "/result?echo=hi" in result
    assert record["outcome"] == "upgraded" and record["transport"] == "h2"
    assert record["accept_encoding_upstream"] is None
    connect = next(r for r in requests if r["pseudo"].get(":protocol") == "websocket")
    assert "accept-encoding" not in dict(connect["headers"])


def test_without_the_bridge_chromium_falls_back_to_http1(cert, home, report):
    """What a user of stock mitmproxy sees: the WebSocket moves to HTTP/1.1,
    where an encoder cannot hold its status back."""
    upstream = DualAlpnServer(cert, FaultServer(Faults()), enable_connect_protocol=True)
    _, result, record, _, md = browse(cert, home, report, "observe", False, upstream, "--set", "ws_encode_h2=false")
    assert "/result?echo=hi" in result
    assert record["transport"] == "h1" and record["outcome"] == "upgraded"
    assert_clean_log(md)
