"""Make a bundle's handshakes again against a server: is the recorded stall still there?

    scripts/replay BUNDLE_DIR --target wss://example.com [--timeout 5] [--insecure] [--h3]

Each handshake of the bundle goes again, the same way (transport, headers
minus the redacted ones, accept-encoding offer, who speaks first; an event
stream as an event-stream request, read as the probe reads one), through
mitmdump with the addon in front of the target, once under
`ws_encode_policy=observe` and once under `strip`; per handshake it prints what
was recorded and what happens now. An HTTP/3 handshake goes to the proxy over
HTTP/3 again, and on to the target's HTTP/3 where that carries WebSockets
(offered in Alt-Svc, or found with --h3), else over TCP. The recorded path is
kept, without the query and path-parameter items whose values were redacted,
unless the target URL names a path of its own (ws://, wss://, http:// or
https://: only the scheme's TLS or not counts). An event stream's stall is
its head withheld. Exit status: 0 when no recorded stall recurs
(under observe), 1 when one does, 2 when the bundle cannot be read or the
target cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import http

from wsencode import bundle
from wsencode.bundle import counted, kinds_counted
from wsencode.core.records import EVENT_STREAM, WEBSOCKET
from wsencode.report import REDACTED, open_regular, printable, redact_path

from .attempt import Handshake, TRANSPORT_NAMES
from .probe import add_common, proxy_modes, stall_threshold
from .proxy import Attempt, ProbeProxy, Runner, start_all
from .reporting import DamagedFile, read_flows
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


def speaker_of(flow: http.HTTPFlow) -> str:
    """Who spoke first (bundle.first_speaker), else the client: a browser waits for the status, then speaks."""
    return bundle.first_speaker(flow) or "client"


def message_of(flow: http.HTTPFlow) -> str:
    noted = flow.metadata.get(bundle.PROBE_KEY)
    if isinstance(noted, Mapping) and isinstance(noted.get("message"), str):
        return noted["message"]
    if flow.websocket is not None:
        sent = next((m for m in flow.websocket.messages if m.from_client and m.is_text), None)
        if sent is not None:
            return sent.text
    return "hello"


# What replay reads of each record, by the JSON types it must have (SPEC's fields).
FIELDS = {
    "event": ("string",), "flow_id": ("string",), "transport": ("string",), "stuck_in": ("string",),
    "received_s": ("number",), "accept_encoding_client": ("string", "null"), "status": ("number", "null"),
}
HANDSHAKE_FIELDS = {"outcome": ("string",), "stalled": ("boolean",)}
EVENTS = ("stall", "handshake")


def json_type(value: Any) -> str:
    """The JSON type of a value json.loads made: object, array, string, number, boolean or null."""
    if isinstance(value, bool):
        return "boolean"  # (a bool is an int to Python)
    kinds = ((dict, "object"), (list, "array"), (str, "string"), ((int, float), "number"), (type(None), "null"))
    return next(name for kind, name in kinds if isinstance(value, kind))


def _a(kind: str) -> str:
    return kind if kind == "null" else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def record_problem(record: Any) -> str | None:
    """What keeps a report record from being replayed (one phrase), or None."""
    if not isinstance(record, dict):
        return f"{_a(json_type(record))}, not a record (an object)"
    if record.get("event") not in EVENTS:
        return f"`event` is {json.dumps(record.get('event'))[:40]}, not one of {', '.join(EVENTS)}"
    for name, kinds in {**FIELDS, **(HANDSHAKE_FIELDS if record["event"] == "handshake" else {})}.items():
        if name not in record:
            return f"a {record['event']} record without `{name}`"
        if json_type(record[name]) not in kinds:
            return f"`{name}` is {_a(json_type(record[name]))}, not {' or '.join(map(_a, kinds))}"
    return None


def read_records(path: Path) -> list[dict]:
    """A report's records, each fit to be replayed; none if there is no such file."""
    if not path.exists():
        return []
    records = []
    try:
        with open_regular(path, os.O_RDONLY, "r", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise DamagedFile(f"{printable(str(path))}: line {n} is not JSON") from None
                problem = record_problem(record)
                if problem:
                    raise DamagedFile(f"{printable(str(path))}: line {n}: {problem}")
                records.append(record)
    except OSError as e:
        raise DamagedFile(f"{printable(str(path))}: cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise DamagedFile(f"{printable(str(path))}: not UTF-8 text") from None
    return records


def bundle_records(folder: Path, flows: list[http.HTTPFlow]) -> list[dict]:
    """The records of these flows, from the report or as kept on each flow; DamagedFile naming a bad one."""
    records = bundle.records_for(flows, read_records(folder / bundle.REPORT))
    for r in records:  # (a report's passed already: these are the flows' own)
        problem = record_problem(r)
        if problem:
            raise DamagedFile(f"{printable(str(folder / bundle.FLOWS))}: the record kept on flow "
                              f"{r['flow_id'][:8]}: {problem}")
    return records


def recorded(folder: Path, target: Target) -> list[Recorded]:
    """The bundle's handshakes, in the order they were made; DamagedFile if it has none, or cannot be read."""
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise DamagedFile(f"{printable(str(folder))} {what}")
    flows = read_flows(folder / bundle.FLOWS)
    records = bundle_records(folder, flows)
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
        path = target.path if own_path else without_redacted(f.request.path) or "/"
        if bundle.is_event_stream(end):
            shake = Handshake(transport, end["accept_encoding_client"], None, path, target.authority, headers,
                              kind=EVENT_STREAM)
        else:
            shake = Handshake(transport, end["accept_encoding_client"], speaker_of(f), path, target.authority,
                              headers, protocols, message_of(f))
        stalls = [r for r in mine if r["event"] == "stall"]
        # Withheld by the upstream, as the stall record says; a bundle made of
        # the flows' metadata alone has only the end's flag.
        stalled = any(r["stuck_in"] == "forwarded" for r in stalls) if stalls else end["stalled"]
        out.append(Recorded(f, end, stalled, shake))
    if not out:
        raise DamagedFile(f"{printable(str(folder))} holds no WebSocket handshake or event stream with a record "
                          f"({bundle.FLOWS}, {bundle.REPORT})")
    return out


def outcome(a: Attempt) -> str:
    return (a.record["outcome"] + (" ⌛" if a.stalled else "")) if a.record else "(no record)"


def record_line(end: dict) -> str:
    """A handshake record's status and when the proxy had it, from receipt; an event stream's first event."""
    if end.get("status") is None:
        return f"no {'head' if bundle.is_event_stream(end) else 'status'}, ended after {seconds(end['received_s'])}"
    line = f"{end['status']} after {seconds(end['received_s'])}"
    first = end.get("first_event_s")
    if bundle.is_event_stream(end) and end.get("outcome") == "opened":
        line += f", first event +{seconds(first)}" if isinstance(first, (int, float)) else ", no event"
    return line


async def replay(folder: Path, target: Target, args: argparse.Namespace, out=sys.stdout) -> int:
    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    try:
        handshakes = recorded(folder, target)
    except DamagedFile as e:
        say(f"replay: cannot read the bundle: {e}")
        return OTHER
    stall_after = stall_threshold(args.timeout)
    streams = sum(h.shake.kind == EVENT_STREAM for h in handshakes)
    say(f"ws-encode replay of {kinds_counted(len(handshakes) - streams, streams)} from {printable(str(folder))} "
        f"against {target.url}, under "
        f"{' and '.join(POLICIES)} (ws_encode_stall={stall_after:g} s; attempts give up after {args.timeout:g} s)")
    h3_kinds = {h.shake.kind for h in handshakes if h.shake.transport == "h3"}
    if h3_kinds and not target.tls:
        say(f"replay: cannot replay HTTP/3 handshakes against {target.url}: HTTP/3 needs TLS "
            f"({'wss' if target.websocket else 'https'}://)")
        return OTHER
    kind = EVENT_STREAM if streams == len(handshakes) else WEBSOCKET  # what the target's description is about
    found = await reach_and_say(target, args.insecure, args.timeout, say, f"replay: cannot reach {target.url}",
                                args.h3, kind)
    if found is None:
        return OTHER
    for h2_kind in sorted({h.shake.kind for h in handshakes if h.shake.transport == "h2"}):
        if not found.carries(h2_kind)["h2"]:
            say("  (HTTP/2 handshakes reach it through the proxy as HTTP/1.1 upgrades: it has no RFC 8441)"
                if h2_kind == WEBSOCKET else "  (HTTP/2 event streams reach it through the proxy over HTTP/1.1: "
                                             "it does not speak HTTP/2)")
    if h3_kinds and not all(found.carries(k)["h3"] for k in h3_kinds):
        say(f"  (HTTP/3 handshakes reach it through the proxy over TCP, as HTTP/2 or HTTP/1.1: "
            f"{found.h3.describe(kind)})")
    modes, options = proxy_modes(target, found, bool(h3_kinds), h3_kinds)
    with tempfile.TemporaryDirectory(prefix="wsencode-replay-") as tmp:
        proxies = {p: ProbeProxy(modes, Path(tmp) / f"report-{p}.jsonl", *options, "--set", f"ws_encode_policy={p}",
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
        recorded_outcome = printable(h.end["outcome"]) + (" ⌛" if h.stalled else "")
        say(f"   {'recorded':<9}{record_line(h.end):<34}  {recorded_outcome}")
        for p in POLICIES:
            a = tasks[i, p].result()
            note = ""
            if p == "observe" and a.withheld(stall_after):
                note = "the recorded stall recurs" if h.stalled else "a stall that was not recorded"
                recur, new = recur + h.stalled, new + (not h.stalled)
            elif p == "observe" and h.stalled:
                note = "the recorded stall is gone"
            now = record_line(a.record) if a.record else status_line(a, args.timeout)
            say(f"   {p:<9}{now:<34}  {outcome(a):<12}  {note}".rstrip())
    stalls = sum(h.stalled for h in handshakes)
    say()
    if recur:
        say(f"replay: {recur} of {counted(stalls, 'recorded stall')} {'recurs' if recur == 1 else 'recur'} "
            f"against {target.url}")
        return 1
    text = f"no recorded stall recurs against {target.url}"
    if stalls:
        text += f" ({stalls} {'was' if stalls == 1 else 'were'} recorded)"
    if new:
        text += (f"; but {counted(new, 'handshake')} that did not stall then "
                 f"{'stalls' if new == 1 else 'stall'} now")
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
