"""Run the lab on its own: the application (WebSockets, an event stream, a page)
behind one encoder behaviour.

    scripts/lab [--behaviour hold-until-body ...] [--port 8443] [--min-size 1024] [--quiet] [--no-h3 | --no-alt-svc]

hypercorn serves it over TLS (a fresh self-signed certificate for localhost
and 127.0.0.1) on 127.0.0.1, HTTP/1.1 and HTTP/2 with RFC 8441 on. The same
application, behind the same encoder, is served over HTTP/3 too (QUIC on UDP,
the same port number where it is free; WebSockets by RFC 9220), which every
TCP response names in `Alt-Svc: h3=":PORT"`. Point a browser or your own
client at the URLs it prints, directly or through mitmdump with the addon; it
prints one line per request it receives.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

from wspeers import h2ws, h3ws

from .encoders import HELP, MIN_SIZE, Behaviour
from .server import LabServer, quiet_hypercorn_stream_errors

CHOICES = [b.value for b in Behaviour] + ["none"]


def behaviour_help() -> str:
    lines = [f"  {b.value}: {HELP[b].format(min_size='--min-size')}" for b in Behaviour]
    return "behaviours:\n" + "\n".join(lines) + "\n  none: the application alone, no encoder in front"


def h3_urls(server: LabServer, certfile: str) -> list[str]:
    """How to reach the HTTP/3 side: the peers' client, or Chromium with QUIC forced on."""
    base = f"https://127.0.0.1:{server.h3.port}"
    return [
        f"over HTTP/3 (QUIC on UDP 127.0.0.1:{server.h3.port}, WebSockets by RFC 9220):",
        f"  {sys.executable} -m wspeers.h3ws client --url {base}/echo --accept-encoding gzip",
        f"  chromium --enable-quic --origin-to-force-quic-on=127.0.0.1:{server.h3.port} "
        f"--enable-features=EnableWebsocketsOverHttp3 "
        f"--ignore-certificate-errors-spki-list={h3ws.spki_sha256(certfile)} {base}/",
    ]


def urls(server: LabServer, certfile: str) -> str:
    base, ws = server.url, server.url.replace("https://", "wss://")
    rows = [
        (f"{base}/", f"a page (compressed) that opens {ws}/greet and /events and shows what they say"),
        (f"{base}/stream", "a streamed response (?n=5&every=0.2)"),
        (f"{base}/events", "an event stream: the head at once, events from ?after=SECONDS, every ?every=, ?n= of them"),
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
        *(h3_urls(server, certfile) if server.h3 else []),
    ])


LISTENING = "lab: {behaviour} listening on {url}"
EVENTS_EPILOG = """Event streams: /events answers 200 text/event-stream (cache-control: no-store) and flushes its head at
once, then writes a small event (id:, event: tick, data:, about 50 bytes) after ?after= seconds (default 0) and
one every ?every= seconds (default 1), ?n= of them (default: until the client goes). Only a request that offers
accept-encoding meets the encoder: hold-until-body and hold-1xx hold the head until the first event (then flush
each event), hold-until-min-size holds the head and the events until --min-size bytes of them, buffer-events lets
the head out with the first event and keeps the events in its compressor, fixed and encode-upgrade send the head
at once and flush each event. Watch one with curl (-N: curl buffers nothing itself):
  curl -kN --compressed 'https://127.0.0.1:8443/events?after=1&every=0.5&n=5'
or from Python, timed as EventSource sees it: wslab.clients.read_event_stream."""
H3_EPILOG = """HTTP/3: every behaviour is served over QUIC too, on UDP 127.0.0.1 at the TCP port's number (another
where that one is taken), WebSockets by extended CONNECT (RFC 9220); every TCP response says where in
Alt-Svc: h3=":PORT", and the lab prints the UDP port. Reach it with the peers' client (the Python of the lab's
environment: .venv-mitmproxy12/bin/python in a checkout set up by scripts/lab, any with ws-encode installed),
  python -m wspeers.h3ws client --url https://127.0.0.1:8443/echo --accept-encoding gzip
or with Chromium, which needs QUIC forced on for the origin, its RFC 9220 feature, and the lab's key trusted
by hash (it prints the whole command):
  chromium --enable-quic --origin-to-force-quic-on=127.0.0.1:8443 --enable-features=EnableWebsocketsOverHttp3
           --ignore-certificate-errors-spki-list=<base64 SHA-256 of the certificate's SPKI> https://127.0.0.1:8443/
--no-h3 leaves HTTP/3 (and Alt-Svc) out; --no-alt-svc serves HTTP/3 without naming it, so only a client
told where finds it (scripts/probe --h3)."""


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
                             log=None if args.quiet else log, h3=not args.no_h3, alt_svc=not args.no_alt_svc)
                   for i, b in enumerate(behaviours)]
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        for server in servers:
            await server.start()
        try:
            for server in servers:
                h3 = f"; HTTP/3 on UDP port {server.h3.port}, RFC 9220 on" if server.h3 else ""
                h3 += ", not named in Alt-Svc" if server.h3 and args.no_alt_svc else ""
                print(f"{LISTENING.format(behaviour=server.behaviour, url=server.url)} "
                      f"(HTTP/1.1 and HTTP/2 over TLS, RFC 8441 on{h3}): {about(server.behaviour, args.min_size)}")
            if len(servers) == 1:
                print(urls(servers[0], cert[0]))
            print("lab: ready; Ctrl-C stops", flush=True)
            await stop.wait()
        finally:
            for server in servers:
                await server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lab", description=__doc__,
                                     epilog=behaviour_help() + "\n\n" + EVENTS_EPILOG + "\n\n" + H3_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--behaviour", choices=CHOICES, action="append",
                        help="the encoder in front (default hold-until-body); repeat it to serve several, "
                             "each on its own port")
    parser.add_argument("--port", type=int, default=8443,
                        help="on 127.0.0.1 (default 8443, then 8444... for more behaviours; 0: any free port)")
    parser.add_argument("--quiet", action="store_true", help="no line per request")
    quic = parser.add_mutually_exclusive_group()
    quic.add_argument("--no-h3", action="store_true", help="no HTTP/3 (QUIC) side, no Alt-Svc")
    quic.add_argument("--no-alt-svc", action="store_true", help="HTTP/3 served, but no response names it in Alt-Svc")
    parser.add_argument("--min-size", type=int, default=MIN_SIZE,
                        help=f"bytes hold-until-min-size waits for (default {MIN_SIZE})")
    args = parser.parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
