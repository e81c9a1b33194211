"""A page that opens many WebSockets at once: headless Chromium, regular mode.

Chromium opens them all on its one HTTP/2 connection to the origin, as RFC
8441 streams once the proxy advertises extended CONNECT. The origin speaks
HTTP/2 without RFC 8441 (most do), so each WebSocket goes upstream over a
separate HTTP/1.1 connection. mitmproxy alone lets one client connection have
five connections to a server at a time, so the page got four WebSockets open
(the fifth connection is the HTTP/2 one) and the rest never got a status.
"""

from __future__ import annotations

import asyncio

from conftest import Mitmdump, assert_clean_log
from wspeers.fault_server import Faults, FaultServer
# The same marks (browser, timeout, skipped without Chromium) and fixtures.
from peers import chromium
from wspeers.h2ws import DualAlpnServer

pytestmark = chromium.MARKS

COUNT = 10

PAGE = """<!doctype html><script>
const base = "https://127.0.0.1:{port}";
// A request first, so Chromium has an HTTP/2 connection to the origin: it only
// uses RFC 8441 on an existing one (with credentials, like a WebSocket's).
fetch(base + "/warmup", {{mode: "no-cors", credentials: "include"}}).then(() => {{
  let echoed = 0;
  for (let i = 0; i < {count}; i++) {{
    const ws = new WebSocket(`wss://127.0.0.1:{port}/ws${{i}}`);
    ws.onopen = () => ws.send("hi " + i);
    ws.onmessage = (e) => {{
      if (e.data === "hi " + i && ++echoed === {count}) fetch(base + "/result?open=" + echoed, {{mode: "no-cors", credentials: "include"}});
    }};
    ws.onerror = () => fetch(base + "/result?error=" + i, {{mode: "no-cors", credentials: "include"}});
  }}
}});
</script>"""


def test_a_page_opens_ten_websockets_on_one_http2_connection(cert, home, report):
    async def scenario():
        h1 = FaultServer(Faults())
        async with DualAlpnServer(cert, h1) as origin:
            async with Mitmdump("--ssl-insecure", report=report) as md:
                browser = await chromium.start(chromium.page(PAGE.format(port=origin.port, count=COUNT)), home, md.port)
                try:
                    result = await md.wait_for(r"/result\?", timeout=60)
                    records = [await md.wait_for_record(event="handshake", url=f"https://127.0.0.1:{origin.port}/ws{i}") for i in range(COUNT)]
                finally:
                    await chromium.stop(browser)
        return result, records, h1.received, md

    result, records, h1_received, md = asyncio.run(scenario())
    assert f"/result?open={COUNT}" in result, md.log
    assert sum(r.method == "GET" and "upgrade" in r.headers for r in h1_received) == COUNT
    assert {(r["transport"], r["upstream_transport"], r["outcome"]) for r in records} == {("h2", "h1", "upgraded")}
    assert_clean_log(md)
