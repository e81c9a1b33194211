"""Start a mitmdump reverse proxy on 127.0.0.1 for the scripts here, and learn its port."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

ADDON = Path(__file__).resolve().parent.parent / "addon" / "ws_encode.py"
LOOPBACK_ONLY = Path(__file__).resolve().parent / "loopback_only.py"
MITMDUMP = Path(sys.executable).with_name("mitmdump")
LISTENING = re.compile(rb"listening at [^\s]*:(\d+)")


async def start_reverse_proxy(upstream: str, *options: str) -> tuple[asyncio.subprocess.Process, int]:
    """mitmdump in front of `upstream` with `options` (e.g. "-s", ADDON), on
    an ephemeral port; its log stays readable on `proc.stdout`."""
    proc = await asyncio.create_subprocess_exec(
        str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", "0", "--mode", f"reverse:{upstream}",
        "--ssl-insecure", "--set", "flow_detail=0", "-s", str(LOOPBACK_ONLY), *options,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    async for line in proc.stdout:
        if m := LISTENING.search(line):
            return proc, int(m.group(1))
    raise SystemExit("mitmdump did not start")
