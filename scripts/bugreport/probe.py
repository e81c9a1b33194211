"""Does this server withhold the WebSocket status (or an event stream's head or first event) while
accept-encoding is offered?

    scripts/probe wss://example.com/socket [--header 'Cookie: ...'] [--subprotocol graphql-ws]
                  [--origin https://example.com] [--message TEXT] [--insecure] [--timeout 5] [--h3] [--bundle DIR]
    scripts/probe https://example.com/events [--event-stream] [--header ...] [--insecure] [--timeout 5] ...

Starts mitmdump with the ws-encode addon on 127.0.0.1 in front of the target
and opens WebSockets through it as Chromium does, with accept-encoding offered
(`gzip, deflate, br, zstd`) and without it, over HTTP/1.1, over HTTP/2 where
the server speaks it with RFC 8441, and over HTTP/3 where it speaks that with
RFC 9220 (offered in Alt-Svc, or asked for with --h3); each once with the
client speaking first (it sends --message once the status is in) and once
waiting for the server to speak. Prints which transports it tries (and why
not the others), each attempt as it finishes, the addon's records, and a
verdict. Exit status: 0 no stall; 1 the offer breaks the handshake (a
withheld status, or an encoded upgrade); 2 another failure (unreachable,
refused, TLS), explained. Header values, query and path-parameter values and
userinfo are never printed.

An http:// or https:// URL is an event stream (Server-Sent Events): it is
requested as EventSource does (`accept: text/event-stream`), with and without
accept-encoding, over HTTP/1.1, HTTP/2 where the server speaks it and HTTP/3
where it is offered (or --h3), each read until it ends, 20 events have come or
--timeout seconds have passed; each attempt prints when its head and its
first event came. The verdict says whether the offer delays the head (an
encoder that waits for the body), or holds the first event until some bytes
or the stream's end (one that does not flush each event). Exit status as
above: 1 when it does; 2 also when the answer without the offer is not
text/event-stream, unless --event-stream asks to probe it as one anyway
(--event-stream also probes a ws:// or wss:// URL's http:// or https:// twin).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from wsencode.core.records import EVENT_STREAM, WEBSOCKET
from wsencode.report import printable

from .attempt import BROWSER_CODINGS, SPEAKERS, TRANSPORT_NAMES, Handshake
from .proxy import Attempt, ProbeProxy, Runner, start_all
from .target import Reach, Target, parse_or_say, reach_and_say
from .verdict import OTHER, Verdict, judge, judge_event_streams, names, status_line

LOOPBACK_ENV = "WSENCODE_LOOPBACK_ONLY"  # "1": the probe's proxy reaches loopback only (tests, the lab)


def stall_threshold(timeout: float) -> float:
    """ws_encode_stall for a run: the addon's default, or half the client's patience if that is shorter."""
    return min(2.0, timeout / 2)


def positive_seconds(text: str) -> float:
    """A number of seconds > 0, for argparse."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds > 0, e.g. 5")
    return seconds


def parse_header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip() or name != name.strip() or " " in name:
        raise argparse.ArgumentTypeError("a header is 'Name: value'")
    return name, value.strip()


def add_common(parser: argparse.ArgumentParser) -> None:
    """Options probe and replay share."""
    parser.add_argument("--insecure", action="store_true",
                        help="do not check the target's TLS certificate (a self-signed test server)")
    parser.add_argument("--timeout", type=positive_seconds, default=5.0,
                        help="seconds each attempt waits for its status, then for a message (default 5)")
    parser.add_argument("--loopback-only", action="store_true", default=os.environ.get(LOOPBACK_ENV) == "1",
                        help=f"the proxy connects to loopback addresses only (tests and the lab; also {LOOPBACK_ENV}=1)")
    parser.add_argument("--h3", action="store_true",
                        help="look for HTTP/3 on the URL's port (UDP) even where no Alt-Svc: h3 offers it")


def proxy_modes(target: Target, found: Reach, h3: bool, kinds: set[str] = frozenset({WEBSOCKET})
                ) -> tuple[dict[str, str], list[str]]:
    """A proxy's reverse modes (ProbeProxy's upstreams) and the options they need: the target over
    TCP and, with `h3`, an HTTP/3 listener in front of the target's HTTP/3 where that carries
    every one of `kinds` (WebSockets need RFC 9220), else in front of its TCP side
    (ws_encode_h3_upstream=tcp: HTTP/2 or HTTP/1.1)."""
    if not h3:
        return {"target": target.upstream}, []
    if all(found.carries(kind)["h3"] for kind in kinds):
        return {"target": target.upstream, "h3": target.upstream_h3(found.h3.port)}, []
    return {"target": target.upstream, "h3": target.upstream_h3(target.port)}, ["--set", "ws_encode_h3_upstream=tcp"]


def handshakes(target: Target, transports: list[str], args: argparse.Namespace, kind: str) -> list[Handshake]:
    """The attempts: a WebSocket's per transport, offer and speaker; an event stream's per transport and offer."""
    headers = list(args.header)
    if args.origin:
        headers.append(("origin", args.origin))
    if target.authorization and not any(k.lower() == "authorization" for k, _ in headers):
        headers.append(("authorization", target.authorization))
    if kind == EVENT_STREAM:
        return [Handshake(t, offer, None, target.path, target.authority, tuple(headers), kind=EVENT_STREAM)
                for t in transports for offer in (BROWSER_CODINGS, None)]
    return [Handshake(t, offer, speaker, target.path, target.authority, tuple(headers), tuple(args.subprotocol),
                      args.message)
            for t in transports for offer in (BROWSER_CODINGS, None) for speaker in SPEAKERS]


def kind_of(target: Target, args: argparse.Namespace) -> str:
    """An event stream for an http(s):// URL or --event-stream, else a WebSocket."""
    return EVENT_STREAM if args.event_stream or not target.websocket else WEBSOCKET


def attempt_line(a: Attempt, timeout: float) -> str:
    record = a.record
    outcome = (record["outcome"] + (" ⌛" if a.stalled else "")) if record else "(no record)"
    reply = ""
    if a.seen.upgraded and a.shake.kind == WEBSOCKET:
        reply = f", {'reply' if a.shake.speaker == 'client' else 'greeting'} " + (
            f"after {a.seen.reply_s:.2f} s" if a.seen.reply_s is not None else "none")
    head = f"  {a.shake.label:<45}{status_line(a, timeout) + reply:<38}  {outcome:<12}  "
    return head + (record["diagnosis"] if record else "")


async def probe(target: Target, args: argparse.Namespace, out=sys.stdout) -> int:
    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    stall_after = stall_threshold(args.timeout)
    kind = kind_of(target, args)
    what = "" if kind == WEBSOCKET else "the event stream "
    say(f"ws-encode probe of {what}{target.url} (ws_encode_stall={stall_after:g} s; attempts give up after "
        f"{args.timeout:g} s)")
    if args.header or target.authorization:
        sent = {k.lower() for k, _ in args.header} | ({"authorization"} if target.authorization else set())
        say(f"  sending headers {', '.join(sorted(sent))} (values not shown)")
    found = await reach_and_say(target, args.insecure, args.timeout, say, f"verdict: cannot probe {target.url}",
                                args.h3, kind)
    if found is None:
        return OTHER
    transports, not_tried = found.transports(kind), found.not_tried(target, kind)
    say(f"  trying {names([TRANSPORT_NAMES[t] for t in transports])}, each with and without accept-encoding"
        + "".join(f"; {reason}" for reason in not_tried))
    say()
    with tempfile.TemporaryDirectory(prefix="wsencode-probe-") as tmp:
        work = Path(tmp)
        modes, options = proxy_modes(target, found, "h3" in transports, {kind})
        proxy = ProbeProxy(modes, work / "report.jsonl", *options, "--set", f"ws_encode_stall={stall_after}",
                           flows=work / "flows.mitm" if args.bundle else None,
                           loopback_only=args.loopback_only, insecure=args.insecure)
        attempts: list[Attempt] = []
        failed = await start_all([proxy])
        if failed:
            say(f"verdict: nothing probed: the probe's own mitmdump did not start: {failed}")
            return OTHER
        try:
            runner = Runner(proxy, args.timeout)
            # Started in order, so that attempts taking turns go client-first, then server-first.
            tasks = [asyncio.create_task(runner.run(s)) for s in handshakes(target, transports, args, kind)]
            for next_done in asyncio.as_completed(tasks):
                attempts.append(await next_done)
                say(attempt_line(attempts[-1], args.timeout))
        finally:
            await proxy.stop()
        if kind == EVENT_STREAM:
            verdict = judge_event_streams(attempts, args.timeout, stall_after, not_tried, args.event_stream)
        else:
            verdict = judge(attempts, args.timeout, stall_after, not_tried)
        records = proxy.records()
        say()
        say("records (the addon's own, as in its report):")
        for r in records:
            say("  " + json.dumps(r, ensure_ascii=False))
        say()
        if args.bundle:
            from wsencode.bundle import BundleError

            from . import reporting  # mitmproxy's flow files: only for a bundle

            try:
                where = reporting.probe_bundle(args.bundle, work / "flows.mitm", records, attempts, target, verdict,
                                               args, stall_after, not_tried)
            except (BundleError, reporting.DamagedFile, OSError) as e:
                say(f"bundle not written: {printable(str(e))}")
                verdict = Verdict(verdict.code or OTHER, verdict.text)
            else:
                say(f"bundle written to {where}")
    say(f"verdict: {verdict.text}")
    return verdict.code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the WebSocket URL: ws://host[:port]/path or wss://...; or an event stream's: "
                                    "http://... or https://...")
    parser.add_argument("--event-stream", action="store_true",
                        help="probe the URL as an event stream even if its answer is not text/event-stream "
                             "(a ws:// or wss:// URL: its http:// or https:// twin)")
    parser.add_argument("--header", action="append", type=parse_header, default=[], metavar="'NAME: VALUE'",
                        help="a header to send on every handshake (repeat for more), e.g. a cookie")
    parser.add_argument("--subprotocol", action="append", default=[], help="a WebSocket sub-protocol to offer")
    parser.add_argument("--origin", help="the Origin header, as a browser sends it")
    parser.add_argument("--message", default="hello", help="what the client sends first (default: hello)")
    parser.add_argument("--bundle", type=Path, metavar="DIR",
                        help="write report.jsonl, flows.mitm and summary.md there, redacted")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --bundle folder")
    add_common(parser)
    args = parser.parse_args(argv)
    target = parse_or_say(args.url, "probe")
    if target is None:
        return OTHER
    if args.bundle:
        from wsencode.bundle import BundleError, FolderNotEmpty, check_folder

        try:
            check_folder(args.bundle, args.force)
        except BundleError as e:
            hint = " (--force)" if isinstance(e, FolderNotEmpty) else ""
            print(f"probe: --bundle: {e}{hint}", file=sys.stderr)
            return OTHER
    return asyncio.run(probe(target, args))


if __name__ == "__main__":
    sys.exit(main())
