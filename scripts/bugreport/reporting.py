"""The probe's bundle: its mitmdump's report and flow file, redacted by the addon's own bundle module.

Each WebSocket's flow also keeps how the probe made it (`flow.metadata["ws_encode_probe"]`:
who speaks first, the message), so that `scripts/replay` can make it again; an event stream's
record says what it is (`kind`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from mitmproxy import exceptions, http, io

from wsencode.bundle import PROBE_KEY, runtime_environment, write_bundle
from wsencode.core.records import WEBSOCKET
from wsencode.report import open_regular, printable

from .attempt import BROWSER_CODINGS, EVENTS_READ, TRANSPORT_NAMES
from .proxy import Attempt
from .target import Target
from .verdict import Verdict, status_line, tried


class DamagedFile(ValueError):
    """A file cannot be read as what it should be; the message names it and says what is wrong, on one line."""


def read_flows(path: Path) -> list[http.HTTPFlow]:
    """The HTTP flows of a flow file, in the order they were made; none if there is no such file."""
    if not path.exists():
        return []
    try:
        with open_regular(path, os.O_RDONLY, "rb") as f:
            flows = [f for f in io.FlowReader(f).stream() if isinstance(f, http.HTTPFlow)]
    except OSError as e:
        raise DamagedFile(f"{printable(str(path))}: cannot be read: {e.strerror}") from None
    # mitmproxy's reader raises FlowReadException for what it checks; from
    # tnetstring data that is not a flow's state (mitmproxy 11 does not check
    # it is a dict) the others escape from migrating and loading it.
    except (exceptions.FlowReadException, ValueError, KeyError, TypeError, AttributeError):
        raise DamagedFile(f"{printable(str(path))}: not a flow file mitmproxy can read, or cut short") from None
    return sorted(flows, key=lambda f: f.request.timestamp_start or 0)


def attempts_table(attempts: Sequence[Attempt], timeout: float) -> list[str]:
    """The attempts as a Markdown table; a WebSocket's with who spoke first."""
    websockets = all(a.shake.kind == WEBSOCKET for a in attempts)
    speaks = "speaks first | " if websockets else ""
    lines = [f"| transport | accept-encoding | {speaks}the client saw | record |", "|" + " --- |" * (4 + websockets)]
    for a in attempts:
        outcome = (a.record["outcome"] + (" ⌛" if a.stalled else "")) if a.record else "(none)"
        offer = "offered" if a.shake.offer else "none"
        speaker = f" {a.shake.speaker} |" if websockets else ""
        lines.append(f"| {TRANSPORT_NAMES[a.shake.transport]} | {offer} |{speaker} "
                     f"{status_line(a, timeout)} | {outcome} |")
    return lines


def probe_notes(attempts: Sequence[Attempt], target: Target, not_tried: Sequence[str]) -> list[str]:
    """What the probe did, for the summary."""
    websockets = all(a.shake.kind == WEBSOCKET for a in attempts)
    how = ("each transport once with the client speaking first and once waiting for the server" if websockets
           else f"each an event-stream request (`accept: text/event-stream`) read until it ended, {EVENTS_READ} "
                "events came or the time was up")
    notes = [f"`scripts/probe` of {target.url}: {len(attempts)} attempts over {tried(attempts)}, with and without "
             f"`accept-encoding`, {how}." + "".join(f" {reason}." for reason in not_tried)]
    if target.authorization:
        notes.append("The URL's userinfo went as an `authorization: Basic` header (redacted below).")
    return notes


def probe_bundle(folder: Path, flows_file: Path, records: list[dict], attempts: Sequence[Attempt], target: Target,
                 verdict: Verdict, args: argparse.Namespace, stall_after: float, not_tried: Sequence[str]) -> Path:
    flows = read_flows(flows_file)
    by_id = {f.id: f for f in flows}
    for a in attempts:
        if a.record and a.record["flow_id"] in by_id and a.shake.kind == WEBSOCKET:
            by_id[a.record["flow_id"]].metadata[PROBE_KEY] = {"speaker": a.shake.speaker, "message": a.shake.message}
    environment = {**runtime_environment(), "tool": "scripts/probe", "target": target.url}
    options = {
        "ws_encode_policy": "observe", "ws_encode_stall": f"{stall_after:g}",
        "probe --timeout": f"{args.timeout:g}", "offered": BROWSER_CODINGS,
        "certificate checked": "no (--insecure)" if args.insecure else "yes",
    }
    ab = [f"verdict: {verdict.text}", ""] + attempts_table(attempts, args.timeout)
    return write_bundle(folder, flows, records, environment=environment, options=options, ab=ab,
                        notes=probe_notes(attempts, target, not_tried), title=f"ws-encode probe of {target.url}",
                        force=args.force)
