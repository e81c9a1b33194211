"""The probe's mitmdump with the addon in front of the target, and attempts run through it.

The lab's `Proxy` (wslab/proxy.py) does the work: the process, its log line by
line, the report's records. This one differs in what it may reach: a user's
live server is not on loopback and its certificate is checked, so the
loopback guard and `--ssl-insecure` are each a choice (on in tests and lab
runs, off for real users); and what it takes from one: a response head has a
bound (head_limit.py).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from mitmdump_proc import LOOPBACK_ONLY
from wsencode.core.records import WEBSOCKET
from wslab.proxy import Proxy

from . import attempt
from .attempt import Handshake, Seen

RECORD_WAIT = 10  # seconds the addon has to write a handshake's record once the client is done
HEAD_LIMIT = Path(__file__).resolve().parent / "head_limit.py"  # a server's endless head cannot fill the proxy


class ProbeProxy(Proxy):
    """mitmdump in reverse mode in front of `upstreams`: "target" (https:// or
    http://) and, where HTTP/3 is tried, "h3" (http3://), on free ports of 127.0.0.1."""

    def __init__(self, upstreams: dict[str, str], report: Path, *options: str, flows: Path | None = None,
                 loopback_only: bool = False, insecure: bool = False) -> None:
        super().__init__(upstreams, report, *options, flows=flows)
        self._guards = ["-s", str(LOOPBACK_ONLY)] if loopback_only else []
        self._guards += ["--ssl-insecure"] if insecure else []

    def guards(self) -> list[str]:
        return self._guards + ["-s", str(HEAD_LIMIT)]

    def port_for(self, transport: str) -> int:
        """Where a client of this transport connects: HTTP/3 on its UDP port, the others on TCP."""
        return self.ports["h3" if transport == "h3" else "target"]


async def start_all(proxies: list[ProbeProxy]) -> str | None:
    """Start every proxy; if one does not start, stop them all and say why."""
    results = await asyncio.gather(*(p.start() for p in proxies), return_exceptions=True)
    failed = [r for r in results if isinstance(r, Exception)]
    if not failed:
        return None
    await asyncio.gather(*(p.stop() for p in proxies))
    return str(failed[0])


@dataclass
class Attempt:
    shake: Handshake
    seen: Seen
    record: dict | None  # the addon's handshake record (an event stream's: its `opened` one, or how it ended)
    stall: dict | None  # its stall record, if one was written

    @property
    def stalled(self) -> bool:
        """The addon reported a stall, wherever the handshake was stuck."""
        return self.stall is not None or bool(self.record and self.record["stalled"])

    def withheld(self, stall_after: float) -> bool:
        """The upstream had the handshake and kept its status `stall_after`
        seconds or more, or for good: the addon's clock from forwarding says
        so, not the client's, and a slow connection to the upstream does not."""
        if self.record is None:
            return self.seen.status is None and not self.seen.error
        if self.record["status"] is None:
            return self.record["stuck_in"] == "forwarded"
        waited = self.record["waited_s"]
        return waited is not None and waited >= stall_after

    @property
    def content_encoding(self) -> str | None:
        return (self.record or {}).get("content_encoding") or self.seen.content_encoding


class Runner:
    """Runs attempts through one proxy, each matched to the addon's records.

    A record names no header, so attempts that the records cannot tell apart
    (same kind, same transport, same accept-encoding from the client) take
    turns; the others run at once."""

    def __init__(self, proxy: ProbeProxy, timeout: float) -> None:
        self.proxy = proxy
        self.timeout = timeout
        self._turns: defaultdict[tuple[str, str, str | None], asyncio.Lock] = defaultdict(asyncio.Lock)

    def _records(self, shake: Handshake, event: str) -> list[dict]:
        return [r for r in self.proxy.records() if r["event"] == event and r["transport"] == shake.transport
                and r["accept_encoding_client"] == shake.offer and r.get("kind", WEBSOCKET) == shake.kind]

    async def run(self, shake: Handshake) -> Attempt:
        async with self._turns[shake.kind, shake.transport, shake.offer]:
            before = len(self._records(shake, "handshake"))
            seen = await attempt.run(self.proxy.port_for(shake.transport), shake, self.timeout)
            await self.proxy._until(lambda: len(self._records(shake, "handshake")) > before, RECORD_WAIT)
            ends = self._records(shake, "handshake")
            record = ends[before] if len(ends) > before else None
        stall = None
        if record is not None:
            stall = next((r for r in self.proxy.records() if r["event"] == "stall"
                          and r["flow_id"] == record["flow_id"]), None)
        return Attempt(shake, seen, record, stall)
