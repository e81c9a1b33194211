"""The addon's bytes per tracked handshake, with tracemalloc, in a process of its own.

    python -m benchlib.memory --tracked 1000 --cycled 10000     # prints one JSON object

The addon (addon/ws_encode.py, as mitmdump loads it) runs in mitmproxy's test
context (`mitmproxy.test.taddons`), with the report on and policy observe.
`--tracked` handshake flows (made first, outside the measurement) go through
the request hooks; what tracemalloc still counts afterwards is what the addon
keeps per handshake while it waits for the status. Each then gets its 101;
afterwards, and after `--cycled` more whole handshakes, the addon's structures
must be back to what they held before the first (`sizes_before`) and nothing
it allocated still alive.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import tracemalloc
from pathlib import Path

import importlib
import os

from mitmdump_proc import ADDON

# The addon under test (scripts/bench --addon); loaded as mitmdump would import it.
_addon_path = Path(os.environ.get("BENCH_ADDON", str(ADDON))).resolve()
sys.path.insert(0, str(_addon_path.parent))
ws_encode = importlib.import_module(_addon_path.stem)
from mitmproxy import http  # noqa: E402
from mitmproxy.hooks import UpdateHook  # noqa: E402
from mitmproxy.proxy.layers.http import _hooks as hooks  # noqa: E402
from mitmproxy.test import taddons, tflow, tutils  # noqa: E402

from benchlib.probe import structure_sizes  # noqa: E402

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
ARRIVING = (hooks.HttpRequestHeadersHook, hooks.HttpRequestHook)
ANSWERED = (hooks.HttpResponseHeadersHook, hooks.HttpResponseHook)


def handshake_flow(i: int, h2: bool) -> http.HTTPFlow:
    """An HTTP/1.1 upgrade, or an HTTP/2 extended CONNECT as the bridge's client codec makes it."""
    if h2:
        request = tutils.treq(
            method=b"CONNECT", path=f"/mem/{i}?token=t".encode(), http_version=b"HTTP/2.0", authority=b"localhost",
            headers=http.Headers([(b":protocol", b"websocket"), (b"sec-websocket-version", b"13"),
                                  (b"accept-encoding", b"gzip, deflate, br, zstd")]),
            content=b"",
        )
    else:
        request = tutils.treq(
            method=b"GET", path=f"/mem/{i}?token=t".encode(), http_version=b"HTTP/1.1",
            headers=http.Headers(host="localhost", upgrade="websocket", connection="Upgrade",
                                 sec_websocket_key=KEY, sec_websocket_version="13",
                                 accept_encoding="gzip, deflate, br, zstd"),
            content=b"",
        )
    f = tflow.tflow(req=request, live=True)
    if h2:
        f.client_conn.alpn = b"h2"
    return f


def answer(flow: http.HTTPFlow) -> None:
    if flow.request.method == "CONNECT":
        flow.response = tutils.tresp(status_code=200, reason=b"", content=b"", headers=http.Headers())
        return
    flow.response = tutils.tresp(
        status_code=101, reason=b"Switching Protocols", content=b"",
        headers=http.Headers(upgrade="websocket", connection="Upgrade", sec_websocket_accept=ACCEPT),
    )


async def run(tctx, addon, hook_types, flows) -> None:
    """Each hook for each flow, and after each the update hook, as mitmproxy
    runs them (addonmanager.handle_lifecycle)."""
    for flow in flows:
        for hook in hook_types:
            await tctx.master.addons.invoke_addon(addon, hook(flow))
            await tctx.master.addons.invoke_addon(addon, UpdateHook([flow]))


def modules() -> dict:
    return {n: m for n, m in sys.modules.items() if n == "wsencode" or n.startswith("wsencode.")}


async def measure(tracked: int, cycled: int, h2: bool, report: Path) -> dict:
    addon = type(ws_encode.addons[0])()
    with taddons.context(addon) as tctx:
        # (no stall due while it measures: a busy machine would otherwise turn slow batches into remembered stalls)
        tctx.configure(addon, ws_encode_report=str(report), ws_encode_policy="observe", ws_encode_stall="3600")
        warm = handshake_flow(-1, h2)  # first-use costs stay out of the figure
        await run(tctx, addon, ARRIVING, [warm])
        answer(warm)
        await run(tctx, addon, ANSWERED, [warm])
        del warm
        await asyncio.sleep(0)
        # Its own first-use caches, too; and what its structures hold with no
        # handshake followed (the options' state, such as what it carries).
        sizes_before = structure_sizes(addon, modules())
        flows = [handshake_flow(i, h2) for i in range(tracked)]
        gc.collect()
        tracemalloc.start(1)
        await run(tctx, addon, ARRIVING, flows)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
        held_by_line = [str(stat) for stat in tracemalloc.take_snapshot().statistics("lineno")[:8]]
        sizes_held = structure_sizes(addon, modules())
        for flow in flows:
            answer(flow)
        await run(tctx, addon, ANSWERED, flows)
        del flows
        await asyncio.sleep(0)  # the event loop drops cancelled timers as it runs
        gc.collect()
        after_tracked = tracemalloc.get_traced_memory()[0]
        sizes_after_tracked = structure_sizes(addon, modules())
        for start in range(0, cycled, 500):
            batch = [handshake_flow(i, h2) for i in range(start, min(cycled, start + 500))]
            await run(tctx, addon, ARRIVING, batch)
            for flow in batch:
                answer(flow)
            await run(tctx, addon, ANSWERED, batch)
            del batch
            await asyncio.sleep(0)
        gc.collect()
        after_cycled = tracemalloc.get_traced_memory()[0]
        sizes_after_cycled = structure_sizes(addon, modules())
        top = tracemalloc.take_snapshot().statistics("lineno")[:5]
        tracemalloc.stop()
        addon.done()
    return {
        "transport": "h2" if h2 else "h1",
        "tracked": tracked,
        "sizes_before": sizes_before,
        "bytes_held": held,
        "bytes_per_tracked_handshake": held / tracked,
        "sizes_while_tracked": sizes_held,
        "largest_while_tracked": held_by_line,
        "bytes_left_after_tracked": after_tracked,
        "sizes_after_tracked": sizes_after_tracked,
        "cycled": cycled,
        "bytes_left_after_cycled": after_cycled,
        "sizes_after_cycled": sizes_after_cycled,
        "largest_left": [str(s) for s in top],
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tracked", type=int, default=1000)
    parser.add_argument("--cycled", type=int, default=10000)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for h2 in (False, True):
            results.append(await measure(args.tracked, args.cycled, h2, Path(tmp) / f"mem-{h2}.jsonl"))
    print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
