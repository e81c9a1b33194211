"""Run the lab on its own: the application behind one encoder behaviour.

    scripts/lab [--behaviour hold-until-body ...] [--port 8443] [--min-size 1024] [--quiet]

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

from wspeers import h2ws

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


LISTENING = "lab: {behaviour} listening on {url}"


def about(behaviour: str, min_size: int) -> str:
    if behaviour == "none":
        return "the application alone, no encoder in front"
    return HELP[Behaviour(behaviour)].format(min_size=min_size)


async def serve(args: argparse.Namespace) -> None:
    quiet_hypercorn_stream_errors(asyncio.get_running_loop())

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    behaviours = args.behaviour or [Behaviour.HOLD_UNTIL_BODY.value]
    with tempfile.TemporaryDirectory(prefix="wslab-cert-") as certdir:
        cert = h2ws.make_self_signed_cert(certdir)
        servers = [LabServer(b, *cert, port=args.port + i if args.port else 0, min_size=args.min_size,
                             log=None if args.quiet else log) for i, b in enumerate(behaviours)]
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        for server in servers:
            await server.start()
        try:
            for server in servers:
                print(f"{LISTENING.format(behaviour=server.behaviour, url=server.url)} "
                      f"(HTTP/1.1 and HTTP/2 over TLS, RFC 8441 on): {about(server.behaviour, args.min_size)}")
            if len(servers) == 1:
                print(urls(servers[0]))
            print("lab: ready; Ctrl-C stops", flush=True)
            await stop.wait()
        finally:
            for server in servers:
                await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lab", description=__doc__, epilog=behaviour_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--behaviour", choices=CHOICES, action="append",
                        help="the encoder in front (default hold-until-body); repeat it to serve several, "
                             "each on its own port")
    parser.add_argument("--port", type=int, default=8443,
                        help="on 127.0.0.1 (default 8443, then 8444... for more behaviours; 0: any free port)")
    parser.add_argument("--quiet", action="store_true", help="no line per request")
    parser.add_argument("--min-size", type=int, default=MIN_SIZE,
                        help=f"bytes hold-until-min-size waits for (default {MIN_SIZE})")
    args = parser.parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
