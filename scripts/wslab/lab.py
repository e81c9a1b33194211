"""Run the lab on its own: the application behind one encoder behaviour.

    scripts/lab [--behaviour hold-until-body] [--port 8443] [--min-size 1024]

hypercorn serves it over TLS (a fresh self-signed certificate for localhost
and 127.0.0.1) on 127.0.0.1, HTTP/1.1 and HTTP/2 with RFC 8441 on. Point a
browser or your own client at the URLs it prints, directly or through
mitmdump with the addon; it prints one line per request it receives.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

import h2ws

from .encoders import HELP, MIN_SIZE, Behaviour
from .server import LabServer, quiet_hypercorn_stream_errors

CHOICES = [b.value for b in Behaviour] + ["none"]


def behaviour_help() -> str:
    lines = [f"  {b.value}: {HELP[b].format(min_size='--min-size')}" for b in Behaviour]
    return "behaviours:\n" + "\n".join(lines) + "\n  none: the application alone, no encoder in front"


def urls(server: LabServer) -> str:
    base, ws = server.url, server.url.replace("https://", "wss://")
    rows = [
        (f"{base}/", f"a page (compressed) that opens {ws}/greet and shows what it says"),
        (f"{base}/stream", "a streamed response (?n=5&every=0.2)"),
        (f"{ws}/echo", "WebSocket, the client speaks first"),
        (f"{ws}/greet", "WebSocket, the server speaks first (?after=SECONDS), then echoes"),
        (f"{ws}/private", "WebSocket refused with 403 and an HTML error page"),
    ]
    width = max(len(url) for url, _ in rows) + 2
    mitmdump = Path(sys.executable).with_name("mitmdump")
    return "\n".join([f"  {url.ljust(width)}{what}" for url, what in rows] + [
        "through the proxy (HTTP/2 WebSockets need TLS, so the proxy's listener gets it too):",
        f"  {mitmdump} -s addon/ws_encode.py -s scripts/loopback_only.py --ssl-insecure "
        f"--listen-host 127.0.0.1 -p 8080 --mode reverse:{base}",
        "  then open https://127.0.0.1:8080/ (the certificates are self-signed)",
    ])


async def serve(args: argparse.Namespace) -> None:
    quiet_hypercorn_stream_errors(asyncio.get_running_loop())

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    with tempfile.TemporaryDirectory(prefix="wslab-cert-") as certdir:
        server = LabServer(args.behaviour, *h2ws.make_self_signed_cert(certdir), port=args.port,
                           min_size=args.min_size, log=log)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        async with server:
            about = HELP.get(args.behaviour, "the application alone") if args.behaviour != "none" else \
                "the application alone, no encoder in front"
            print(f"lab: {args.behaviour}: {about.format(min_size=args.min_size)}")
            print(f"lab: listening on {server.url} (HTTP/1.1 and HTTP/2 over TLS, RFC 8441 on); Ctrl-C stops")
            print(urls(server), flush=True)
            await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lab", description=__doc__, epilog=behaviour_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--behaviour", choices=CHOICES, default=Behaviour.HOLD_UNTIL_BODY.value)
    parser.add_argument("--port", type=int, default=8443, help="on 127.0.0.1 (default 8443; 0: any free port)")
    parser.add_argument("--min-size", type=int, default=MIN_SIZE,
                        help=f"bytes hold-until-min-size waits for (default {MIN_SIZE})")
    args = parser.parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
