"""Make a bundle's handshakes again against a server: is the recorded stall still there?

    scripts/replay BUNDLE_DIR --target wss://example.com [--timeout 5] [--insecure]

Each handshake of the bundle goes again, the same way (transport, headers
minus the redacted ones, accept-encoding offer, who speaks first), through
mitmdump with the addon in front of the target, once under
`ws_encode_policy=observe` and once under `strip`; per handshake it prints what
was recorded and what happens now. The recorded path is kept, without the
query and path-parameter items whose values were redacted, unless the target
URL names a path of its own. Exit status: 0 when no recorded stall recurs
(under observe), 1 when one does, 2 when the bundle cannot be read or the
target cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import http

from wsencode import bundle
from wsencode.report import REDACTED, redact_path

from .attempt import Handshake, TRANSPORT_NAMES
from .probe import add_common, stall_threshold
from .proxy import Attempt, ProbeProxy, Runner, start_all
from .reporting import PROBE_KEY, read_flows
from .target import Target, parse_or_say, reach_and_say
from .verdict import OTHER, seconds, status_line

POLICIES = ("observe", "strip")


@dataclass
class Recorded:
    """One handshake of the bundle: its flow, its records, how to make it again."""

    flow: http.HTTPFlow
    end: dict  # the handshake record
    stalled: bool  # the upstream withheld its status
    shake: Handshake



def without_redacted(path: str) -> str:
    """The recorded request target without the items whose values were redacted."""
    parts = urllib.parse.urlsplit(path)
    segments = [";".join(p for p in segment.split(";") if not p.endswith(f"={REDACTED}") and p != REDACTED)
                for segment in parts.path.split("/")]
    query = "&".join(i for i in parts.query.split("&") if i and not i.endswith(f"={REDACTED}") and i != REDACTED)
    return "/".join(segments) + (f"?{query}" if query else "")


def speaker_of(flow: http.HTTPFlow, end: dict) -> str:
    """Who spoke first: as the probe noted it, else as the messages show, else the client (a
    browser waits for the status, then speaks)."""
    noted = flow.metadata.get(PROBE_KEY, {}).get("speaker")
    if noted in ("client", "server"):
        return noted
    if flow.websocket is not None and flow.websocket.messages:
        return "client" if flow.websocket.messages[0].from_client else "server"
    return "client"


def message_of(flow: http.HTTPFlow) -> str:
    noted = flow.metadata.get(PROBE_KEY, {}).get("message")
    if isinstance(noted, str):
        return noted
    if flow.websocket is not None:
        sent = next((m for m in flow.websocket.messages if m.from_client and m.is_text), None)
        if sent is not None:
            return sent.text
    return "hello"


def recorded(folder: Path, target: Target) -> list[Recorded]:
    """The bundle's handshakes, in the order they were made; ValueError if it has none."""
    flows = read_flows(folder / bundle.FLOWS)
    report = folder / bundle.REPORT
    lines = report.read_text(encoding="utf-8").splitlines() if report.exists() else []
    records = bundle.records_for(flows, [json.loads(line) for line in lines if line.strip()])
    own_path = target.path not in ("", "/")
    out = []
    for f in flows:
        mine = [r for r in records if r["flow_id"] == f.id]
        end = next((r for r in reversed(mine) if r["event"] == "handshake"), None)
        if end is None:
            continue
        # Redacted headers stay behind, whole (a referer that lost its query included).
        headers = tuple((k, v) for k, v in f.request.headers.items(multi=True) if REDACTED not in v)
        protocols = tuple(p.strip() for v in f.request.headers.get_all("sec-websocket-protocol")
                          for p in v.split(",") if p.strip())
        transport = end["transport"] if end["transport"] in TRANSPORT_NAMES else "h2"
        shake = Handshake(transport, end["accept_encoding_client"], speaker_of(f, end),
                          target.path if own_path else without_redacted(f.request.path) or "/",
                          target.authority, headers, protocols, message_of(f))
        stalls = [r for r in mine if r["event"] == "stall"]
        # Withheld by the upstream, as the stall record says; a bundle made of
        # the flows' metadata alone has only the end's flag.
        stalled = any(r["stuck_in"] == "forwarded" for r in stalls) if stalls else bool(end.get("stalled"))
        out.append(Recorded(f, end, stalled, shake))
    if not out:
        raise ValueError(f"{folder} holds no WebSocket handshake with a record ({bundle.FLOWS}, {bundle.REPORT})")
    return out


def outcome(a: Attempt) -> str:
    return (a.record["outcome"] + (" ⌛" if a.stalled else "")) if a.record else "(no record)"


def record_line(end: dict) -> str:
    """A handshake record's status and when the proxy had it, from receipt."""
    if end.get("status") is None:
        return f"no status, ended after {seconds(end['received_s'])}"
    return f"{end['status']} after {seconds(end['received_s'])}"


async def replay(folder: Path, target: Target, args: argparse.Namespace, out=sys.stdout) -> int:
    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    try:
        handshakes = recorded(folder, target)
    except (OSError, ValueError) as e:
        say(f"replay: cannot read the bundle: {e}")
        return OTHER
    stall_after = stall_threshold(args.timeout)
    say(f"ws-encode replay of {len(handshakes)} handshakes from {folder} against {target.url}, under "
        f"{' and '.join(POLICIES)} (ws_encode_stall={stall_after:g} s; attempts give up after {args.timeout:g} s)")
    found = await reach_and_say(target, args.insecure, args.timeout, say, f"replay: cannot reach {target.url}")
    if found is None:
        return OTHER
    if not found.rfc8441 and any(h.shake.transport == "h2" for h in handshakes):
        say("  (HTTP/2 handshakes reach it through the proxy as HTTP/1.1 upgrades: it has no RFC 8441)")
    with tempfile.TemporaryDirectory(prefix="wsencode-replay-") as tmp:
        proxies = {p: ProbeProxy(target.upstream, Path(tmp) / f"report-{p}.jsonl", "--set", f"ws_encode_policy={p}",
                                 "--set", f"ws_encode_stall={stall_after}", loopback_only=args.loopback_only,
                                 insecure=args.insecure) for p in POLICIES}
        failed = await start_all(list(proxies.values()))
        if failed:
            say(f"replay: nothing replayed: its own mitmdump did not start: {failed}")
            return OTHER
        try:
            runners = {p: Runner(proxy, args.timeout) for p, proxy in proxies.items()}
            tasks = {(i, p): asyncio.create_task(runners[p].run(h.shake))
                     for i, h in enumerate(handshakes) for p in POLICIES}
            await asyncio.gather(*tasks.values())
        finally:
            await asyncio.gather(*(p.stop() for p in proxies.values()))
    recur = new = 0
    for i, h in enumerate(handshakes):
        shake = h.shake
        say()
        say(f"{i + 1}. {shake.label}  {redact_path(shake.path)}  [recorded flow {h.flow.id[:8]}]")
        recorded_outcome = h.end["outcome"] + (" ⌛" if h.stalled else "")
        say(f"   {'recorded':<9}{record_line(h.end):<36}{recorded_outcome}")
        for p in POLICIES:
            a = tasks[i, p].result()
            note = ""
            if p == "observe" and a.withheld(stall_after):
                note = "the recorded stall recurs" if h.stalled else "a stall that was not recorded"
                recur, new = recur + h.stalled, new + (not h.stalled)
            elif p == "observe" and h.stalled:
                note = "the recorded stall is gone"
            now = record_line(a.record) if a.record else status_line(a, args.timeout)
            say(f"   {p:<9}{now:<36}{outcome(a):<14}{note}".rstrip())
    stalls = sum(h.stalled for h in handshakes)
    say()
    if recur:
        say(f"replay: {recur} of {stalls} recorded stalls recur against {target.url}")
        return 1
    text = f"no recorded stall recurs against {target.url}" + (f" ({stalls} were recorded)" if stalls else "")
    if new:
        text += f"; but {new} handshakes that did not stall then stall now"
    say(f"replay: {text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="a bundle folder (scripts/probe --bundle, wsencode.bundle)")
    parser.add_argument("--target", required=True, help="the server to replay against: ws:// or wss:// URL")
    add_common(parser)
    args = parser.parse_args(argv)
    target = parse_or_say(args.target, "replay")
    if target is None:
        return OTHER
    return asyncio.run(replay(args.bundle, target, args))


if __name__ == "__main__":
    sys.exit(main())
