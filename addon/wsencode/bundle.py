"""A bug-report bundle: the records, the flows and a summary of some handshakes (WebSocket
handshakes and event-stream openings), redacted.

    write_bundle("bug-123", flows, records, options={"ws_encode_policy": "observe"})

writes into that folder:
- `report.jsonl`: the addon's records for those flows, as the report has them;
- `flows.mitm`: redacted copies of the flows, readable by mitmproxy 11 and 12 (`mitmweb -r`);
- `summary.md`: per handshake a timeline (an event stream's: its head, then its first event), its
  diagnosis and policy; the A/B result when there is one; the environment and the addon's
  options; what was redacted.

Nothing secret reaches any of the three: cookie, set-cookie, authorization and
proxy-authorization values, query, path-parameter and fragment values and
userinfo are replaced by REDACTED in the flows (URL-valued headers included),
as `report.redact_url` does for the report, and so is each of those values
wherever else a flow holds it (a 401 page that prints the request, an echoed
message). The bundle is written into a hidden sibling folder and renamed into
place at the end, so an interrupted run never leaves a half bundle under the
name asked for; a folder given as a link to one is written where it points.

`ExitBundle` holds the handshakes of the bundle written when mitmproxy exits
(`ws_encode_bundle`), bounded in count and in bytes (KEPT_BYTES, MESSAGE_BYTES).

Standard library and mitmproxy only: it runs inside the addon.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import logging
import os
import platform
import secrets
import shutil
import stat
import urllib.parse
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import http, io
from mitmproxy.flow import Flow

from .core.records import EVENT_STREAM
from .report import REDACTED, kind_of, printable, redact_path, redact_url

logger = logging.getLogger("ws_encode")

REPORT = "report.jsonl"
FLOWS = "flows.mitm"
SUMMARY = "summary.md"
FILES = (REPORT, FLOWS, SUMMARY)

# Headers whose every value is a secret: the name stays, the value goes.
SECRET_HEADERS = ("cookie", "set-cookie", "authorization", "proxy-authorization")
# Headers that carry a URL: its query, path parameters, fragment and userinfo go.
URL_HEADERS = ("referer", "origin", "location", "content-location")

Record = Mapping[str, Any]
# How a tool that made a handshake itself (scripts/probe) noted it on the flow:
# {"speaker": "client" or "server", "message": what the client sent}.
PROBE_KEY = "ws_encode_probe"
# What the exit bundle left out of a WebSocket's messages: {"messages": n, "bytes": n}.
LEFT_OUT_KEY = "ws_encode_bundle_left_out"


class BundleError(Exception):
    """The bundle cannot be written there (the message says why, for a person)."""


class FolderNotEmpty(BundleError):
    """The folder holds something already: forcing the bundle would replace it."""


@dataclass
class Redactions:
    """What redaction replaced, counted, for the summary."""

    headers: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # header name -> values
    urls: int = 0  # request targets and URL-valued headers that lost a query value, parameter or userinfo
    userinfo: int = 0
    elsewhere: int = 0  # bodies, messages, other headers, comments where a redacted value was found again

    def lines(self) -> list[str]:
        names = ", ".join(f"`{name}` ({n})" for name, n in sorted(self.headers.items())) or "none present"
        return [
            "Replaced by `REDACTED` in every file of this bundle (report.jsonl, flows.mitm, summary.md):",
            f"- the values of the {', '.join(f'`{h}`' for h in SECRET_HEADERS)} headers, names kept: {names};",
            "- every query value, path-parameter value (`;jsessionid=`) and fragment, names kept, in request "
            f"URLs and the {', '.join(f'`{h}`' for h in URL_HEADERS)} headers: {self.urls} URLs changed;",
            f"- userinfo (`user:password@`) in URLs, authorities and `host`: {self.userinfo} removed;",
            f"- each of those values (of {MIN_SCRUBBED} characters or more) wherever else it occurs in a flow — "
            "bodies, WebSocket messages, other headers, comments, an error — as sent or percent-decoded: "
            f"{self.elsewhere} places changed.",
            "",
            "Kept as they were, but for those values: every other header, WebSocket messages, bodies, comments "
            "and timings. Read them before you attach the bundle if your application puts other secrets there.",
        ]


# A redacted value shorter than this is not searched for elsewhere in a flow:
# "1" or "true" occur in any body by chance, and are no credential.
MIN_SCRUBBED = 6


def _redact_url_like(value: str, counts: Redactions) -> str:
    """A header value or request target that may hold a URL (or be a bare path)."""
    if value.startswith("/"):
        redacted = redact_path(value)
    else:
        redacted = redact_url(value)
    if redacted != printable(value):
        counts.urls += 1
        if "@" in urllib.parse.urlsplit(printable(value)).netloc:
            counts.userinfo += 1
    return redacted


def _without_userinfo(authority: str, counts: Redactions) -> str:
    if "@" not in authority:
        return authority
    counts.userinfo += 1
    return authority.rsplit("@", 1)[1]


def _redact_headers(headers: http.Headers, counts: Redactions) -> None:
    for name in SECRET_HEADERS:
        values = headers.get_all(name)
        if values:
            headers.set_all(name, [REDACTED] * len(values))
            counts.headers[name] += len(values)
    for name in URL_HEADERS:
        values = headers.get_all(name)
        if values:
            headers.set_all(name, [_redact_url_like(v, counts) for v in values])
    if "host" in headers:
        headers["host"] = _without_userinfo(headers["host"], counts)


# -- the redacted values, wherever else they occur --------------------------------------------


def _item_values(text: str, separator: str) -> list[str]:
    """The values of `name=value` items (a query, cookies, path parameters); a bare item is a value."""
    return [item.split("=", 1)[-1].strip() for item in text.split(separator)]


def _userinfo_values(netloc: str) -> list[str]:
    userinfo = netloc.rpartition("@")[0]
    return [userinfo, userinfo.partition(":")[2]] if userinfo else []


def _url_values(value: str) -> list[str]:
    """What redact_url takes out of a URL or request target: query and
    path-parameter values, the fragment, userinfo and its password."""
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:  # (a host urlsplit refuses: its query and userinfo still go in the header itself)
        return []
    found = _item_values(parts.query, "&") + [parts.fragment] + _userinfo_values(parts.netloc)
    for segment in parts.path.split("/"):
        found += _item_values(segment.partition(";")[2], ";") if ";" in segment else []
    return found


def _credential_values(value: str) -> list[str]:
    """An authorization value's credentials: `Bearer TOKEN`, and `Basic`'s user:password decoded."""
    scheme, _, credentials = value.strip().partition(" ")
    found = [credentials.strip()]
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return found
        found += [decoded, decoded.partition(":")[2]]
    return found


def _header_secrets(headers: http.Headers) -> list[str]:
    found = []
    for name in SECRET_HEADERS:
        for value in headers.get_all(name):
            found.append(value)
            if name == "cookie":
                found += _item_values(value, ";")
            elif name == "set-cookie":  # its value; the attributes after it (`Secure`, `Path=/`) are none
                found += _item_values(value.partition(";")[0], ";")
            else:
                found += _credential_values(value)
    for name in URL_HEADERS:
        for value in headers.get_all(name):
            found += _url_values(value)
    for value in headers.get_all("host"):
        found += _userinfo_values(value)
    return found


def secrets_of(flow: http.HTTPFlow) -> list[str]:
    """Every value redact_flow replaces in this flow, as sent and
    percent-decoded, longest first (so a value that holds another goes
    whole), without those shorter than MIN_SCRUBBED."""
    request = flow.request
    fields = [request.headers, request.trailers]
    if flow.response is not None:
        fields += [flow.response.headers, flow.response.trailers]
    found = _url_values(request.path) + _userinfo_values(request.authority)
    for headers in fields:
        found += _header_secrets(headers) if headers else []
    found += [urllib.parse.unquote(v) for v in found]
    return sorted({v for v in found if len(v) >= MIN_SCRUBBED and v != REDACTED}, key=len, reverse=True)


def _scrub_text(text: str, values: Sequence[str]) -> str:
    for value in values:
        text = text.replace(value, REDACTED)
    return text


def _scrub_bytes(data: bytes, values: Sequence[bytes]) -> bytes:
    for value in values:
        data = data.replace(value, REDACTED.encode())
    return data


def _scrub_body(message: http.Message, values: Sequence[bytes]) -> bool:
    """Scrub a request's or response's body, as the application sees it
    (decoded, then encoded again), or its raw bytes if it does not decode."""
    try:
        body = message.get_content(strict=True)
    except ValueError:
        body = None
    if body is None:
        return bool(message.raw_content) and _replace(message, "raw_content", lambda raw: _scrub_bytes(raw, values))
    scrubbed = _scrub_bytes(body, values)
    if scrubbed != body:
        message.content = scrubbed
    return scrubbed != body


def _scrub_headers(headers: http.Headers, values: Sequence[str]) -> int:
    changed = 0
    for name in {k.lower() for k in headers.keys()}:
        old = headers.get_all(name)
        new = [_scrub_text(v, values) for v in old]
        if new != old:
            headers.set_all(name, new)
            changed += 1
    return changed


def _scrub_data(value: Any, values: Sequence[str]) -> Any:
    """Plain data (a flow's metadata) with the values scrubbed from every string in it."""
    if isinstance(value, str):
        return _scrub_text(value, values)
    if isinstance(value, dict):
        return {k: _scrub_data(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub_data(v, values) for v in value]
    if isinstance(value, tuple):
        return tuple(_scrub_data(v, values) for v in value)
    return value


def _replace(owner: Any, attribute: str, scrub: Callable[[Any], Any]) -> bool:
    """Set `owner.attribute` to its scrubbed value; whether that changed it."""
    old = getattr(owner, attribute)
    new = scrub(old)
    setattr(owner, attribute, new)
    return new != old


def _scrub_flow(flow: http.HTTPFlow, values: Sequence[str]) -> int:
    """Scrub `values` from every other place of a (copied) flow; how many places changed."""
    encoded = [v.encode("utf-8", "surrogateescape") for v in values]

    def text(value: str) -> str:
        return _scrub_text(value, values)

    places: list[tuple[Any, str, Callable[[Any], Any]]] = [
        (flow.request, "path", text), (flow, "comment", text), (flow, "metadata", lambda m: _scrub_data(m, values)),
    ]
    if flow.error is not None:
        places.append((flow.error, "msg", text))
    if flow.websocket is not None:
        places += [(m, "content", lambda c: _scrub_bytes(c, encoded)) for m in flow.websocket.messages]
    changed = sum(_replace(owner, attribute, scrub) for owner, attribute, scrub in places)
    for message in (flow.request, flow.response):
        if message is None:
            continue
        changed += _scrub_headers(message.headers, values) + _scrub_body(message, encoded)
        if message.trailers:
            changed += _scrub_headers(message.trailers, values)
    return changed


def redact_flow(flow: http.HTTPFlow, counts: Redactions | None = None) -> http.HTTPFlow:
    """A redacted copy of `flow`, with its id (the flow itself is left as it was)."""
    counts = counts if counts is not None else Redactions()
    values = secrets_of(flow)
    copy = flow.copy()
    copy.id = flow.id  # the records name it
    request = copy.request
    if request.path:
        request.path = _redact_url_like(request.path, counts)
    if "@" in request.authority:
        request.authority = _without_userinfo(request.authority, counts)
    if "@" in request.host:
        request.host = _without_userinfo(request.host, counts)
    _redact_headers(request.headers, counts)
    if request.trailers:
        _redact_headers(request.trailers, counts)
    if copy.response is not None:
        _redact_headers(copy.response.headers, counts)
        if copy.response.trailers:
            _redact_headers(copy.response.trailers, counts)
    counts.elsewhere += _scrub_flow(copy, values)
    return copy


def records_for(flows: Sequence[http.HTTPFlow], records: Iterable[Record] | None) -> list[dict[str, Any]]:
    """The records of these flows, in the order given: from `records` (all of
    a report, say) where they have any, else the latest one the addon kept on
    the flow (`flow.metadata["ws_encode"]`). URLs are redacted again: a
    record that came from elsewhere is made safe too."""
    ids = {f.id for f in flows}
    chosen: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records or ():
        if record.get("flow_id") in ids:
            chosen[record["flow_id"]].append(dict(record))
    for f in flows:
        kept = f.metadata.get("ws_encode")
        if not chosen[f.id] and isinstance(kept, Mapping) and "event" in kept:
            chosen[f.id].append({"event": kept["event"], "ts": kept.get("ts"), "flow_id": f.id,
                                 **{k: v for k, v in kept.items() if k not in ("event", "ts")}})
    out = [r for f in flows for r in chosen[f.id]]
    for r in out:
        if isinstance(r.get("url"), str):
            r["url"] = redact_url(r["url"])
    return out


def runtime_environment() -> dict[str, str]:
    """Versions of what this runs in: the summary's environment by default."""
    from mitmproxy.version import VERSION

    return {"mitmproxy": VERSION, "Python": platform.python_version(), "OS": platform.platform()}


# -- summary.md ------------------------------------------------------------------------------


def _wall(ts: str | None) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(ts) if ts else None
    except ValueError:
        return None


def _clock(when: datetime.datetime | None) -> str:
    return when.astimezone(datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3] + " UTC" if when else "?"


def is_event_stream(record: Record) -> bool:
    """An event stream's record; one without `kind` was written before there were any."""
    return record.get("kind") == EVENT_STREAM


def timeline(records: Sequence[Record]) -> list[tuple[float, str]]:
    """(seconds from receipt, what happened) for one handshake's records."""
    end = next((r for r in records if r["event"] == "handshake"), None)
    stall = next((r for r in records if r["event"] == "stall"), None)
    last = end or stall or (records[-1] if records else None)
    if last is None:
        return []
    received_at = _wall(last.get("ts"))
    if received_at is not None:
        received_at -= datetime.timedelta(seconds=last.get("received_s") or 0)

    def at(offset: float) -> str:
        return _clock(received_at + datetime.timedelta(seconds=offset) if received_at else None)

    events = [(0.0, f"received by the proxy ({at(0)})")]
    if last.get("waited_s") is not None:
        forwarded = max(0.0, last["received_s"] - last["waited_s"])
        events.append((forwarded, f"forwarded upstream ({at(forwarded)})"))
    if stall is not None:
        events.append((stall["received_s"], f"stall reported, stuck in `{stall['stuck_in']}` ({at(stall['received_s'])})"))
    elif end is not None and end.get("stalled"):
        events.append((end["received_s"], "a stall was reported (its record is not among those bundled)"))
    status = "head" if is_event_stream(last) else "status"
    if end is None:
        events.append((last["received_s"], f"still waiting for its {status} when the bundle was written"))
    elif end.get("status") is not None:
        upstream = end.get("upstream_status")
        extra = f", upstream {upstream}" if upstream not in (None, end["status"]) else ""
        encoded = f", content-encoding: {end['content_encoding']}" if end.get("content_encoding") else ""
        events.append((end["received_s"], f"{status} {end['status']}{extra}{encoded} ({at(end['received_s'])})"))
        events += _first_event(end, at)
    else:
        events.append((end["received_s"], f"ended without a {status}, stuck in `{end['stuck_in']}` "
                                          f"({at(end['received_s'])})"))
    return sorted(events, key=lambda e: e[0])


def _first_event(end: Record, at: Callable[[float], str]) -> list[tuple[float, str]]:
    """An opened event stream's first event on its timeline: none if it is not one, or none came."""
    first = end.get("first_event_s")
    if end.get("outcome") != "opened" or not isinstance(first, (int, float)):
        return []
    when = end["received_s"] + first
    return [(when, f"first event, {first:.3f} s after the head ({at(when)})")]


def outcome_of(records: Sequence[Record]) -> str:
    end = next((r for r in records if r["event"] == "handshake"), None)
    stalled = any(r["event"] == "stall" for r in records) or bool(end and end.get("stalled"))
    return (end["outcome"] if end else "waiting") + (" ⌛" if stalled else "")


def event_stream_note(records: Sequence[Record]) -> str:
    """An event stream's section title's note: 'stalled head, first event 0.40 s after the head'."""
    end = next((r for r in records if r["event"] == "handshake"), None)
    stalled = any(r["event"] == "stall" for r in records) or bool(end and end.get("stalled"))
    said = ["stalled head"] if stalled else []
    if end is not None and end.get("outcome") == "opened":
        first = end.get("first_event_s")
        said.append(f"first event {first:.2f} s after the head" if isinstance(first, (int, float)) else "no event")
    return ", ".join(said) or "event stream"


def ab_lines(records: Sequence[Record]) -> list[str]:
    """The A/B result where the same handshake (transport and URL) went both
    with accept-encoding upstream and without: how each side fared."""
    ends = [r for r in records if r["event"] == "handshake"]
    groups: dict[tuple[str, str, bool], dict[bool, list[Record]]] = defaultdict(lambda: {True: [], False: []})
    for r in ends:
        groups[r["transport"], r["url"], is_event_stream(r)][r.get("accept_encoding_upstream") is not None].append(r)
    lines = []
    for (transport, url, _), sides in groups.items():
        if not sides[True] or not sides[False]:
            continue
        lines.append(f"- {transport} {url}: with accept-encoding upstream {_fared(sides[True])}; "
                     f"without {_fared(sides[False])}")
    return lines


def _fared(records: Sequence[Record]) -> str:
    """'1 of 2 upgraded without a stall (slowest status 0.012 s)'; of event streams, 'opened' and
    their heads, and when their first events came."""
    events = is_event_stream(records[0])
    success, status = ("opened", "head") if events else ("upgraded", "status")
    healthy = [r for r in records if r["outcome"] == success and not r["stalled"]]
    text = f"{len(healthy)} of {len(records)} {success} without a stall"
    if healthy:
        text += f" (slowest {status} {max(r['received_s'] for r in healthy):.3f} s"
        firsts = [r["first_event_s"] for r in healthy if isinstance(r.get("first_event_s"), (int, float))]
        if events:
            text += f", first event {max(firsts):.3f} s after it" if len(firsts) == len(healthy) else \
                f", {len(healthy) - len(firsts)} without an event"
        text += ")"
    return text


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`1 flow`, `2 flows`, `0 flows`."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def kinds_counted(websockets: int, event_streams: int) -> str:
    """'2 WebSocket handshakes', '3 event streams', '1 WebSocket handshake and 1 event stream'."""
    kinds = [counted(n, noun) for n, noun in ((websockets, "WebSocket handshake"), (event_streams, "event stream"))
             if n]
    return " and ".join(kinds) or counted(0, "WebSocket handshake")


def first_speaker(flow: http.HTTPFlow) -> str | None:
    """Who spoke first on this handshake's WebSocket: `client` or `server`,
    as the tool that made it noted, else as its messages show; None if neither says."""
    noted = flow.metadata.get(PROBE_KEY)
    if isinstance(noted, Mapping) and noted.get("speaker") in ("client", "server"):
        return noted["speaker"]
    if flow.websocket is not None and flow.websocket.messages:
        return "client" if flow.websocket.messages[0].from_client else "server"
    return None


def _left_out_line(flow: http.HTTPFlow) -> list[str]:
    left_out = flow.metadata.get(LEFT_OUT_KEY)
    if not isinstance(left_out, Mapping):
        return []
    kept = len(flow.websocket.messages) if flow.websocket else 0
    return [f"- WebSocket messages: the first {kept} kept; {counted(left_out['messages'], 'later one')} "
            f"({left_out['bytes']:,} bytes) left out, to keep the bundle small"]


def summary_markdown(
    flows: Sequence[http.HTTPFlow],
    records: Sequence[Record],
    environment: Mapping[str, str],
    options: Mapping[str, Any],
    counts: Redactions,
    ab: Sequence[str] = (),
    title: str = "ws-encode bug report",
    notes: Sequence[str] = (),
) -> str:
    by_flow: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_flow[r["flow_id"]].append(r)
    followed = [f for f in flows if by_flow.get(f.id)]
    streams = sum(is_event_stream(by_flow[f.id][-1]) for f in followed)
    lines = [f"# {title}", "", f"{kinds_counted(len(followed) - streams, streams)} "
             f"({REPORT} has their records, {FLOWS} the flows: `mitmweb -r {FLOWS}`)."]
    others = len(flows) - len(followed)
    if others:
        are = "is not a handshake" if others == 1 else "are not handshakes"
        lines.append(f"{counted(others, 'other flow')} in {FLOWS} {are} ws-encode followed.")
    lines += [""] + [printable(n) for n in notes] + ([""] if notes else [])
    for i, f in enumerate(followed, 1):
        mine = by_flow[f.id]
        last = mine[-1]
        speaker = first_speaker(f)
        note = event_stream_note(mine) if is_event_stream(last) else \
            f"{speaker}-first" if speaker else "no message either way"
        lines += [
            f"## {i}. {last['transport']} {last['url']}: {outcome_of(mine)} ({note})", "",
            f"- flow `{f.id}`; policy `{last['policy']}`; accept-encoding from the client: "
            f"{_code(last.get('accept_encoding_client'))}, upstream: {_code(last.get('accept_encoding_upstream'))}; "
            f"upstream transport: {last.get('upstream_transport') or 'none'}",
            "- timeline, seconds from receipt:",
        ]
        lines += [f"  - {offset:7.3f} s  {what}" for offset, what in timeline(mine)]
        lines += _left_out_line(f) + [f"- diagnosis: {last['diagnosis']}", ""]
    ab = list(ab) or ab_lines(records)
    if ab:
        lines += ["## A/B", ""] + [printable(line) for line in ab] + [""]
    lines += ["## Environment", ""] + [f"- {k}: {printable(str(v))}" for k, v in environment.items()]
    if options:
        lines += ["", "Options:", ""] + [f"- `{k}` = `{printable(str(v))}`" for k, v in options.items()]
    lines += ["", "## Redacted", ""] + counts.lines()
    return "\n".join(lines) + "\n"


def _code(value: str | None) -> str:
    return "none" if value is None else f"`{value}`"


# -- writing -----------------------------------------------------------------------------------


def check_folder(folder: str | os.PathLike[str], force: bool = False) -> Path:
    """The folder a bundle asked for at `folder` is written to: where a
    link there points (a folder can be renamed onto a folder, not onto a
    link to one). Raises BundleError if a bundle may not be written there:
    something that is not a folder, a folder that is not empty while `force`
    is off, or a place where no folder can be made; callers refuse before
    they start the work whose bundle it would be."""
    shown = printable(str(folder))
    try:
        real = Path(folder).expanduser().resolve()
        mode = _mode_of(real)
        full = mode is not None and stat.S_ISDIR(mode) and any(real.iterdir())
    except (OSError, RuntimeError) as e:  # (RuntimeError: a loop of links, before Python 3.13)
        raise BundleError(f"{shown} cannot be used: {getattr(e, 'strerror', None) or e}") from None
    if mode is not None and not stat.S_ISDIR(mode):
        raise BundleError(f"{shown} exists and is {kind_of(mode)}, not a folder")
    if full and not force:
        raise FolderNotEmpty(f"{shown} is not empty: choose another folder, or force the bundle to replace "
                             "what is there")
    _check_writable(real)
    return real


def _mode_of(path: Path) -> int | None:
    """The path's st_mode, or None if nothing is there (stat never blocks, not even on a FIFO)."""
    try:
        return path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # (the latter: a file stands where a folder on the way would)
        return None


def _check_writable(folder: Path) -> None:
    """Raise BundleError unless a folder can be made beside `folder`, or in
    its nearest existing ancestor (write_bundle makes the folders between):
    tried, since permissions alone do not tell (root, a read-only mount, /proc)."""
    existing = next(p for p in folder.parents if p.exists())
    try:
        _sibling(existing / folder.name, "check").rmdir()
    except OSError as e:
        raise BundleError(f"no folder can be made in {printable(str(existing))}: {e.strerror}") from None


def write_bundle(
    folder: str | os.PathLike[str],
    flows: Sequence[Flow],
    records: Iterable[Record] | None = None,
    *,
    environment: Mapping[str, str] | None = None,
    options: Mapping[str, Any] | None = None,
    ab: Sequence[str] = (),
    notes: Sequence[str] = (),
    title: str = "ws-encode bug report",
    force: bool = False,
) -> Path:
    """Write the bundle of `flows` (HTTP flows; others are left out) into `folder` and return its path.

    `records`: report records (dicts as the addon writes them, with
    `flow_id`); those of other flows are left out, and a flow without any
    gets the latest one kept in its metadata. `environment` (default: the
    mitmproxy, Python and OS versions) and `options` (name -> value) go in
    the summary, with `ab` (lines of an A/B result; by default derived from
    the records where one handshake went with and without accept-encoding)
    and `notes` (lines under the title). Refuses a non-empty `folder` unless
    `force` (then replaces it); raises BundleError saying why.
    """
    asked = Path(folder).expanduser().absolute()
    folder = check_folder(asked, force)
    folder.parent.mkdir(parents=True, exist_ok=True)
    flows = [f for f in flows if isinstance(f, http.HTTPFlow)]  # TCP, UDP, DNS flows hold no handshake
    counts = Redactions()
    redacted = [redact_flow(f, counts) for f in flows]
    chosen = records_for(flows, records)
    summary = summary_markdown(redacted, chosen, environment or runtime_environment(), options or {},
                               counts, ab, title, notes)
    partial = _sibling(folder, "partial")
    try:
        with open(partial / REPORT, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(r) + "\n" for r in chosen)
        with open(partial / FLOWS, "wb") as out:
            writer = io.FlowWriter(out)
            for f in redacted:
                writer.add(f)
        # Written last: a folder with a summary is a whole bundle.
        (partial / SUMMARY).write_text(summary, encoding="utf-8")
        for name in FILES:
            with open(partial / name, "rb") as f:
                os.fsync(f.fileno())
        _move_into_place(partial, folder, force)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return asked


def _move_into_place(partial: Path, folder: Path, force: bool) -> None:
    check_folder(folder, force)  # again: something may have been put there meanwhile
    if not folder.exists() or not any(folder.iterdir()):
        os.replace(partial, folder)  # a rename onto an empty folder replaces it at once
        return
    old = _sibling(folder, "old")
    os.replace(folder, old / "bundle")
    os.replace(partial, folder)
    shutil.rmtree(old, ignore_errors=True)


def _sibling(folder: Path, what: str) -> Path:
    """A new hidden folder beside `folder` (made with the user's umask, as the bundle's own would be)."""
    while True:
        sibling = folder.parent / f".{folder.name}.{what}-{secrets.token_hex(4)}"
        try:
            sibling.mkdir()
            return sibling
        except FileExistsError:
            continue


# -- what the bundle written at exit keeps ---------------------------------------------------

# The bundle written at exit (ws_encode_bundle) keeps at most this many bytes
# of the handshakes it will hold (their headers, bodies and WebSocket
# messages): a bug report stays small enough to attach, and a proxy that
# carries large messages does not keep them alive for it.
KEPT_BYTES = 16 * 1024 * 1024
# Of each WebSocket, its messages from the first up to this many bytes: who
# spoke first and what they said is what a report (and scripts/replay) reads.
MESSAGE_BYTES = 64 * 1024


def flow_bytes(f: http.HTTPFlow) -> int:
    """What a flow holds, near enough: its headers, bodies and WebSocket messages, in bytes."""
    size = sum(len(m.content) for m in f.websocket.messages) if f.websocket else 0
    for message in (f.request, f.response):
        if message is not None:
            size += sum(len(k) + len(v) for k, v in message.headers.fields) + len(message.raw_content or b"")
    return size


def with_first_messages(f: http.HTTPFlow, limit: int) -> http.HTTPFlow:
    """`f`, or if its WebSocket's messages come to more than `limit` bytes, a
    copy (with its id) keeping them from the first while they fit; how many
    were left out, and their bytes, is in its metadata (LEFT_OUT_KEY)."""
    messages = f.websocket.messages if f.websocket else []
    kept = size = 0
    for m in messages:
        if size + len(m.content) > limit:
            break
        size += len(m.content)
        kept += 1
    if kept == len(messages):
        return f
    state = f.get_state()  # (its messages' contents are shared with the flow's, not copied)
    del state["websocket"]["messages"][kept:]
    copy = http.HTTPFlow.from_state(state)
    left_out = messages[kept:]
    copy.metadata[LEFT_OUT_KEY] = {"messages": len(left_out), "bytes": sum(len(m.content) for m in left_out)}
    return copy


class ExitBundle:
    """The handshakes the bundle written at exit will hold: the last `count`,
    and no more than `kept_bytes` of them.

    While a flow is live mitmproxy holds it, every message of its WebSocket
    included; once it ends only this would. So an ended WebSocket is kept
    with its messages from the first up to `message_bytes` (the rest is left
    out first), and every ended flow's bytes (flow_bytes) count towards
    `kept_bytes`, past which the oldest ended handshakes are left out whole.
    The addon calls `keep` for each handshake it follows; mitmproxy calls the
    hooks, this being one of the addon's sub-addons (`addons`).
    """

    def __init__(self, count: int, kept_bytes: int = KEPT_BYTES, message_bytes: int = MESSAGE_BYTES) -> None:
        self.count = count
        self.kept_bytes = kept_bytes
        self.message_bytes = message_bytes
        self._flows: OrderedDict[str, http.HTTPFlow] = OrderedDict()  # oldest first
        self._sizes: dict[str, int] = {}  # of the flows that ended
        self.size = 0  # their sum
        self._said = False  # that handshakes are being left out

    def __len__(self) -> int:
        return len(self._flows)

    def keep(self, f: http.HTTPFlow) -> None:
        self._flows[f.id] = f
        while len(self._flows) > self.count:
            self._leave_out(next(iter(self._flows)))

    def clear(self) -> None:
        self._flows.clear()
        self._sizes.clear()
        self.size = 0

    def flows(self) -> list[http.HTTPFlow]:
        """The flows to bundle, oldest first; those still live are cut as if they ended now."""
        for flow_id, f in list(self._flows.items()):
            if flow_id not in self._sizes:
                self._ended(f)
        return list(self._flows.values())

    # -- hooks: where a kept flow ends -------------------------------------------

    def websocket_end(self, f: http.HTTPFlow) -> None:
        if f.id in self._flows and f.id not in self._sizes:
            self._ended(f)

    def response(self, f: http.HTTPFlow) -> None:
        if f.websocket is None:  # (a WebSocket's flow ends with it)
            self.websocket_end(f)

    def error(self, f: http.HTTPFlow) -> None:
        if f.websocket is None:
            self.websocket_end(f)

    def _ended(self, f: http.HTTPFlow) -> None:
        kept = with_first_messages(f, self.message_bytes)
        self._flows[f.id] = kept
        self._sizes[f.id] = flow_bytes(kept)
        self.size += self._sizes[f.id]
        while self.size > self.kept_bytes:
            self._leave_out(next(i for i in self._flows if i in self._sizes))

    def _leave_out(self, flow_id: str) -> None:
        del self._flows[flow_id]
        self.size -= self._sizes.pop(flow_id, 0)
        if not self._said:
            self._said = True
            logger.info("ws_encode_bundle: the bundle written at exit keeps the last %d handshakes and %d MiB of "
                        "them; older ones are being left out", self.count, self.kept_bytes // 2**20)
