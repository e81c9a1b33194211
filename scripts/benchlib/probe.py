"""A mitmdump script for the benchmark: how full are the addon's structures?

    mitmdump -s scripts/benchlib/probe.py --set bench_probe_port=PORT ...

Answers one command a line, with one JSON line, on 127.0.0.1:PORT:
`sizes` (after a garbage collection) gives the length of every container the
ws_encode addon keeps (its attributes, one level into its helper objects, and
the module-level ones of the `wsencode` package); `unload PATH` and `load PATH`
take the script at PATH out of mitmproxy's `scripts` option and put it back
(so one process measures itself with and without the addon), and answer
whether that script is loaded now; `pauses start` and `pauses stop` measure,
in between, how late the event loop itself runs a 10 ms timer and how long
the garbage collector stops the process (what delays every callback of
mitmproxy's, a stall timer's too). It hooks no flow event, so it costs
nothing per flow.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
import types
from collections.abc import Mapping, MutableSequence, MutableSet
from typing import Any

import weakref

CONTAINERS = (Mapping, MutableSet, MutableSequence, weakref.WeakKeyDictionary, weakref.WeakValueDictionary, weakref.WeakSet)


def _is_container(value: Any) -> bool:
    return isinstance(value, CONTAINERS) and not isinstance(value, (str, bytes, types.MappingProxyType))


def structure_sizes(addon: Any, modules: dict[str, types.ModuleType] | None = None) -> dict[str, int]:
    """{"attr": len, "attr.inner": len, "module:name": len} for the addon and the wsencode modules."""
    gc.collect()
    sizes: dict[str, int] = {}
    for name, value in vars(addon).items():
        if name == "addons":  # its child addons, for mitmproxy: not state
            continue
        if _is_container(value):
            sizes[name] = len(value)
        elif getattr(type(value), "__module__", "").startswith("wsencode") and hasattr(value, "__dict__"):
            for inner, inner_value in vars(value).items():
                if _is_container(inner_value):
                    sizes[f"{name}.{inner}"] = len(inner_value)
    if modules is None:
        modules = {n: m for n, m in sys.modules.items() if n == "wsencode" or n.startswith("wsencode.")}
    for module_name, module in sorted(modules.items()):
        for name, value in vars(module).items():
            if name.startswith("__") or name.isupper() or isinstance(value, (frozenset, tuple, type)):
                continue
            if _is_container(value):
                sizes[f"{module_name}:{name}"] = len(value)
    return sizes


def find_addon() -> Any:
    from mitmproxy import ctx

    for addon in ctx.master.addons.lookup.values():
        if type(addon).__module__.endswith("ws_encode") and hasattr(addon, "configure"):
            return addon
    return None


LOAD_WAIT = 45.0  # seconds a load or unload may take (the bench's query waits 60)


def script_loaded(path: str) -> bool:
    from mitmproxy import ctx

    loader = ctx.master.addons.get("scriptloader")
    return any(script.fullpath == path and script.ns is not None for script in loader.addons)


class Pauses:
    """The event loop's own lateness (a 10 ms sleep, again and again) and the
    garbage collector's pauses, while it runs."""

    TICK = 0.01

    def __init__(self) -> None:
        self.late_ms: list[float] = []
        self.gc_ms: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._gc_started = 0.0
        self._task = asyncio.ensure_future(self._tick())
        gc.callbacks.append(self._on_gc)

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.TICK)
            self.late_ms.append(1000 * (loop.time() - before - self.TICK))

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_ms[info["generation"]].append(1000 * (time.perf_counter() - self._gc_started))

    def stop(self) -> dict[str, Any]:
        self._task.cancel()
        gc.callbacks.remove(self._on_gc)
        return {"late_ms": self.late_ms,
                "gc": {f"gen{g}": {"count": len(ms), "max_ms": max(ms, default=0.0), "total_ms": sum(ms)}
                       for g, ms in self.gc_ms.items()}}


class Probe:
    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.pauses: Pauses | None = None

    def load(self, loader) -> None:
        loader.add_option("bench_probe_port", int, 0, "Answer the benchmark's questions on 127.0.0.1:PORT (0: off).")

    async def running(self) -> None:
        from mitmproxy import ctx

        port = ctx.options.bench_probe_port
        if port and self.server is None:
            self.server = await asyncio.start_server(self._answer, "127.0.0.1", port)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            command = (await reader.readline()).decode().strip()
            name, _, argument = command.partition(" ")
            if name == "sizes":
                addon = find_addon()
                answer = {"addon": addon is not None, "sizes": structure_sizes(addon) if addon else {}}
            elif name in ("load", "unload"):
                answer = await self._scripts(argument, name == "load")
            elif command == "pauses start":
                if self.pauses is not None:
                    self.pauses.stop()
                self.pauses = Pauses()
                answer = {"started": True}
            elif command == "pauses stop" and self.pauses is not None:
                answer, self.pauses = self.pauses.stop(), None
            else:
                answer = {"error": f"unknown command {command!r}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    @staticmethod
    async def _scripts(path: str, load: bool) -> dict[str, Any]:
        from mitmproxy import ctx

        scripts = [s for s in ctx.options.scripts if s != path]
        # mitmproxy's script loader loads and unloads as the option changes,
        # a load finishing on a later turn of the event loop.
        ctx.options.update(scripts=[*scripts, path] if load else scripts)
        # (on a loaded machine, importing the addon and its self-tests took more than 5 s once)
        deadline = asyncio.get_running_loop().time() + LOAD_WAIT
        while script_loaded(path) is not load and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        return {"loaded": script_loaded(path)}

    def done(self) -> None:
        if self.server:
            self.server.close()


addons = [Probe()]
