"""mitmdump with the addon in front of several lab servers at once (one reverse mode each)."""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path

from mitmdump_proc import ADDON, LISTENING, LOOPBACK_ONLY, MITMDUMP, STARTED, Process, free_ports


class Proxy(Process):
    """One mitmdump: `upstreams` maps a name to an upstream URL (https://, or
    http3:// for one over QUIC, served on a UDP port), each served on its own
    port (`ports[name]`); the log is kept line by line and the report in `report`."""

    def __init__(self, upstreams: dict[str, str], report: Path, *options: str, flows: Path | None = None) -> None:
        super().__init__()
        self.upstreams = upstreams
        self.report = report
        self.options = list(options) + (["-w", str(flows)] if flows else [])
        self.ports: dict[str, int] = {}

    _until = Process.until  # (the probe's name for it: bugreport/proxy.py)

    def guards(self) -> list[str]:
        """What bounds this mitmdump: the lab's proxies reach loopback only and take its self-signed certificates."""
        return ["--ssl-insecure", "-s", str(LOOPBACK_ONLY)]

    async def start(self, attempts: int = 3) -> Proxy:
        for attempt in range(attempts):
            # One mode takes the port the system gives; several need ports of
            # their own, since mitmproxy refuses two servers on 127.0.0.1:0.
            wanted = [0] if len(self.upstreams) == 1 else free_ports(len(self.upstreams))
            modes = [a for url, port in zip(self.upstreams.values(), wanted)
                     for a in ("--mode", f"reverse:{url}@127.0.0.1:{port}")]
            await self.spawn(
                MITMDUMP, "--listen-host", "127.0.0.1", *modes, "--set", "flow_detail=0", *self.guards(),
                "-s", ADDON, "--set", f"ws_encode_report={self.report}", *self.options,
            )
            if await self.until(lambda: len(self._listening()) == len(self.upstreams) and STARTED in self.log, 30):
                self.ports = dict(zip(self.upstreams, self._listening() if wanted == [0] else wanted))
                return self
            await self.stop()  # most likely a port taken meanwhile: try others
        raise RuntimeError("mitmdump did not start:\n" + "\n".join(self.lines))

    def _listening(self) -> list[int]:
        """The ports mitmdump said it listens at, in the order it said so."""
        return [int(m.group(1)) for line in self.lines if (m := LISTENING.search(line))]

    def records(self, path: str | None = None) -> list[dict]:
        """Report records, optionally only those for the handshake to `path`."""
        if not self.report.exists():
            return []
        # Whole lines only: mitmdump may be writing one (a read can fall inside a write).
        written = self.report.read_bytes()
        records = [json.loads(line) for line in written[:written.rfind(b"\n") + 1].splitlines() if line.strip()]
        if path is None:
            return records
        return [r for r in records if urllib.parse.urlsplit(r["url"]).path == path]

    async def handshake_record(self, path: str, timeout: float) -> dict | None:
        """The handshake record for `path`; the addon logs a line with each, so wait on lines."""

        def found() -> dict | None:
            return next((r for r in self.records(path) if r["event"] == "handshake"), None)

        await self.until(found, timeout)
        return found()

    def stall_lines(self, path: str) -> list[str]:
        rx = re.compile(re.escape(path) + r"(?=[?:\s])")
        return [line for line in self.lines if "stall on" in line and rx.search(line)]

    async def __aenter__(self) -> Proxy:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
