"""The addon's own CPU per HTTP/1.1 handshake, in a process of its own.

    python -m benchlib.hooktime --handshakes 1000     # prints one JSON object

The addon (as mitmdump loads it; report on, policy observe) runs in
mitmproxy's test context (`mitmproxy.test.taddons`), and every hook of one
handshake + one echo + close reaches it through mitmproxy's own
`invoke_addon`, the update hook after each flow hook, as a mitmdump runs
them: requestheaders, request, server_connect, server_connected,
responseheaders, response, websocket_start, two websocket_message,
websocket_end, client_disconnected. The flows and their answers are made
before the clock starts. The figure is the process's CPU time per
handshake, the best of three batches: what the addon's hooks cost,
without the rest of mitmdump (its sockets, layers, the other addons) whose
noise on a shared machine is larger than the addon. Beside it, the same for
an addon with the same hooks that do nothing: mitmproxy's dispatch, and the
making of the hooks and flows here, which any addon with those hooks costs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
from pathlib import Path

from benchlib.memory import ANSWERED, ARRIVING, answer, handshake_flow, ws_encode
from mitmproxy import hooks, websocket
from mitmproxy.hooks import UpdateHook
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.layers import websocket as websocket_layer
from mitmproxy.test import taddons


def prepared(n: int) -> list:
    """Handshake flows, each with the 101 it will get, and the data its
    server hooks carry."""
    flows = []
    for i in range(n):
        f = handshake_flow(i, h2=False)
        answer(f)
        response, f.response = f.response, None
        flows.append((f, response, server_hooks.ServerConnectionHookData(f.server_conn, f.client_conn)))
    return flows


async def one_handshake(invoke, f, response, server) -> None:
    async def flow_hook(hook) -> None:
        await invoke(hook)
        await invoke(UpdateHook([f]))

    for hook in ARRIVING:
        await flow_hook(hook(f))
    await invoke(server_hooks.ServerConnectHook(server))
    await invoke(server_hooks.ServerConnectedHook(server))
    f.response = response
    f.websocket = websocket.WebSocketData()  # (mitmproxy sets it before the response hook)
    for hook in ANSWERED:
        await flow_hook(hook(f))
    await flow_hook(websocket_layer.WebsocketStartHook(f))
    for from_client in (True, False):
        f.websocket.messages.append(websocket.WebSocketMessage(1, from_client, b"echo"))
        await flow_hook(websocket_layer.WebsocketMessageHook(f))
    f.live = False
    await flow_hook(websocket_layer.WebsocketEndHook(f))
    await invoke(server_hooks.ClientDisconnectedHook(f.client_conn))


def _nothing(self, *args) -> None:
    return None


def hooks_only(addon) -> object:
    """An addon with the hooks `addon` has, each doing nothing."""
    return type("HooksOnly", (), {name: _nothing for name in hooks.all_hooks if callable(getattr(addon, name, None))})()


async def cpu_each(addon, handshakes: int, **options) -> list[float]:
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **options)

        async def invoke(hook) -> None:
            await tctx.master.addons.invoke_addon(addon, hook)

        for f, response, server in prepared(50):  # first-use costs stay out of the figure
            await one_handshake(invoke, f, response, server)
        batches = []
        for _ in range(3):
            flows = prepared(handshakes)
            gc.collect()
            started = time.process_time()
            for f, response, server in flows:
                await one_handshake(invoke, f, response, server)
            batches.append((time.process_time() - started) / handshakes)
            del flows
        assert not getattr(addon, "handshakes", None), "every handshake ends"
        addon.done()
    return batches


async def measure(handshakes: int, report: Path) -> dict:
    addon = type(ws_encode.addons[0])()
    own = await cpu_each(addon, handshakes, ws_encode_report=str(report), ws_encode_policy="observe")
    dispatch = await cpu_each(hooks_only(addon), handshakes)
    return {"handshakes": handshakes, "cpu_s_each": min(own), "hooks_only_cpu_s_each": min(dispatch),
            "batches_cpu_s_each": own, "hooks_only_batches_cpu_s_each": dispatch}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--handshakes", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(await measure(args.handshakes, Path(tmp) / "hooks.jsonl")))


if __name__ == "__main__":
    asyncio.run(main())
