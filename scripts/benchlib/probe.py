"""A mitmdump script for the benchmark: how full are the addon's structures?

    mitmdump -s scripts/benchlib/probe.py --set bench_probe_port=PORT ...

Answers one command a line, with one JSON line, on 127.0.0.1:PORT:
`sizes` (after a garbage collection) gives the length of every container the
ws_encode addon keeps (its attributes, one level into its helper objects, and
the module-level ones of the `wsencode` package); `unload PATH` and `load PATH`
take the script at PATH out of mitmproxy's `scripts` option and put it back
(so one process measures itself with and without the addon), and answer
whether that script is loaded now. It hooks no flow event, so it costs
nothing per flow.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
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


def script_loaded(path: str) -> bool:
    from mitmproxy import ctx

    loader = ctx.master.addons.get("scriptloader")
    return any(script.fullpath == path and script.ns is not None for script in loader.addons)


class Probe:
    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None

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
        for _ in range(500):
            if script_loaded(path) is load:
                break
            await asyncio.sleep(0.01)
        return {"loaded": script_loaded(path)}

    def done(self) -> None:
        if self.server:
            self.server.close()


addons = [Probe()]
