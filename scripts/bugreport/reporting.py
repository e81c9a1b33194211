"""The probe's bundle: its mitmdump's report and flow file, redacted by the addon's own bundle module.

Each flow also keeps how the probe made it (`flow.metadata["ws_encode_probe"]`:
who speaks first, the message), so that `scripts/replay` can make it again.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from mitmproxy import http, io

from wsencode.bundle import runtime_environment, write_bundle

from .attempt import BROWSER_CODINGS
from .proxy import Attempt
from .target import Target
from .verdict import Verdict, status_line

PROBE_KEY = "ws_encode_probe"


def read_flows(path: Path) -> list[http.HTTPFlow]:
    if not path.exists():
        return []
    with open(path, "rb") as f:
        flows = [f for f in io.FlowReader(f).stream() if isinstance(f, http.HTTPFlow)]
    return sorted(flows, key=lambda f: f.request.timestamp_start or 0)


def attempts_table(attempts: Sequence[Attempt], timeout: float) -> list[str]:
    lines = ["| transport | accept-encoding | speaks first | the client saw | record |", "|" + " --- |" * 5]
    for a in attempts:
        outcome = (a.record["outcome"] + (" ⌛" if a.stalled else "")) if a.record else "(none)"
        lines.append(f"| {a.shake.transport} | {'offered' if a.shake.offer else 'none'} | {a.shake.speaker} "
                     f"| {status_line(a, timeout)} | {outcome} |")
    return lines


def probe_bundle(folder: Path, flows_file: Path, records: list[dict], attempts: Sequence[Attempt], target: Target,
                 verdict: Verdict, args: argparse.Namespace, stall_after: float) -> Path:
    flows = read_flows(flows_file)
    by_id = {f.id: f for f in flows}
    for a in attempts:
        if a.record and a.record["flow_id"] in by_id:
            by_id[a.record["flow_id"]].metadata[PROBE_KEY] = {"speaker": a.shake.speaker, "message": a.shake.message}
    environment = {**runtime_environment(), "tool": "scripts/probe", "target": target.url}
    options = {
        "ws_encode_policy": "observe", "ws_encode_stall": f"{stall_after:g}",
        "probe --timeout": f"{args.timeout:g}", "offered": BROWSER_CODINGS,
        "certificate checked": "no (--insecure)" if args.insecure else "yes",
    }
    notes = [f"`scripts/probe` of {target.url}: {len(attempts)} attempts with and without `accept-encoding`, "
             "each transport once with the client speaking first and once waiting for the server."]
    if target.authorization:
        notes.append("The URL's userinfo went as an `authorization: Basic` header (redacted below).")
    ab = [f"verdict: {verdict.text}", ""] + attempts_table(attempts, args.timeout)
    return write_bundle(folder, flows, records, environment=environment, options=options, ab=ab, notes=notes,
                        title=f"ws-encode probe of {target.url}", force=args.force)
