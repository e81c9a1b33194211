"""ws-encode: find out why WebSocket handshakes hang, and prove it.

    mitmdump -s addon/ws_encode.py --mode reverse:http://127.0.0.1:8080 \
        --set ws_encode_policy=observe --set ws_encode_report=handshakes.jsonl

Sees every WebSocket handshake (HTTP/1.1 upgrades and HTTP/2 extended
CONNECTs), applies an encoding policy to it, reports a stall the moment an
upstream withholds the status while the client waits, and writes one report
record per handshake. The contract is ../shared/SPEC.md; the protocol logic
lives in the `wsencode` package beside this file, this class only adapts
mitmproxy's hooks to it.
"""


import asyncio
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# mitmproxy re-imports this script when the file changes. Drop the package's
# cached modules first, so that a reload also picks up changes to them.
for _name in [n for n in sys.modules if n == "wsencode" or n.startswith("wsencode.")]:
    del sys.modules[_name]

from mitmproxy import command, connection, ctx, exceptions, flowfilter, hooks, http, websocket  # noqa: E402
from mitmproxy.proxy import server_hooks  # noqa: E402

from wsencode import diagnosis, h2bridge  # noqa: E402
from wsencode.handshake import Transport, accept_for, classify  # noqa: E402
from wsencode.lifecycle import EndCause, HandshakeEnded, Phase, Progress  # noqa: E402
from wsencode.policy import EncodingPolicy  # noqa: E402
from wsencode.report import ReportWriter, redact_url, utc_now_iso  # noqa: E402
from wsencode.stallwatch import StallWatch  # noqa: E402

logger = logging.getLogger("ws_encode")

STALL_MARK = ":hourglass:"
BAD_ACCEPT_STATUS = 502
REMEMBERED_STALLS = 1000


def parse_stall_seconds(value: str) -> float:
    """The ws_encode_stall option as seconds; ValueError names what is wrong."""
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number of seconds") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{value!r} must be a finite number of seconds > 0")
    return seconds


def end_cause(error_message: str, upstream_connected: bool) -> EndCause:
    """Who ended a handshake that got no status, from mitmproxy's error text."""
    text = error_message.lower()
    if "killed" in text:
        return EndCause.KILLED
    if "client" in text:
        return EndCause.CLIENT_GONE
    if not upstream_connected:
        return EndCause.UPSTREAM_UNREACHABLE
    return EndCause.UPSTREAM_CLOSED


def accept_matches(flow: http.HTTPFlow) -> bool:
    """False only for a 101 whose accept hash does not answer the request's key."""
    if flow.response is None or flow.response.status_code != 101:
        return True
    key = flow.request.headers.get("sec-websocket-key", "")
    return flow.response.headers.get("sec-websocket-accept", "").strip() == accept_for(key)


def upstream_transport(server: connection.Server) -> str | None:
    if server.timestamp_tcp_setup is None:
        return None
    if server.alpn == b"h2":
        return Transport.H2.value
    if server.alpn and server.alpn.startswith(b"h3"):
        return Transport.H3.value
    return Transport.H1.value


@dataclass
class Tracked:
    """A handshake the addon follows: the live flow and what was sent."""

    flow: http.HTTPFlow
    progress: Progress
    policy: EncodingPolicy
    url: str
    accept_encoding_client: str | None
    accept_encoding_upstream: str | None

    @property
    def client_status(self) -> int | None:
        """The status the client received: an HTTP/2 or HTTP/3 client gets 200
        for any successful upgrade, whatever the upstream answered."""
        status = self.progress.status
        if status is None or self.progress.handshake.transport is Transport.H1:
            return status
        return 200 if self.progress.phase is Phase.UPGRADED else status


class WsEncode:
    def __init__(self) -> None:
        self.policy = EncodingPolicy.OBSERVE
        self.codings = "zstd, br, gzip"
        self.stall_after = 2.0
        self.filter: flowfilter.TFilter | None = None
        self.report: ReportWriter | None = None
        self.tracked: dict[str, Tracked] = {}
        self.failing: set[str] = set()  # flows whose handshake the proxy fails in `response`
        self.stalls: OrderedDict[str, str] = OrderedDict()
        self.watch: StallWatch | None = None
        self.bridge = h2bridge.Bridge()
        self._configured = False
        # Monotonic seconds; the bridge notes its times with the same clock.
        self.clock = time.monotonic

    # -- options ---------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option(
            "ws_encode_policy",
            str,
            EncodingPolicy.OBSERVE.value,
            "What to do with encoding on WebSocket handshakes: observe (forward as is), "
            "strip (remove accept-encoding from the request and content-encoding from a "
            "successful response), inject (set accept-encoding to ws_encode_codings).",
            choices=[p.value for p in EncodingPolicy],
        )
        loader.add_option(
            "ws_encode_codings",
            str,
            self.codings,
            "The accept-encoding value that ws_encode_policy=inject sets on handshakes.",
        )
        loader.add_option(
            "ws_encode_stall",
            str,
            "2",
            "Seconds (> 0, e.g. 1.5) the status of a forwarded WebSocket handshake may be "
            "withheld before a stall is reported.",
        )
        loader.add_option(
            "ws_encode_report",
            str,
            "",
            "Append one JSON object per line for every handshake event to this file "
            "(empty: no report).",
        )
        loader.add_option(
            "ws_encode_filter",
            str,
            "",
            "Only handle WebSocket handshakes matching this mitmproxy filter expression "
            "(empty: all).",
        )
        loader.add_option(
            "ws_encode_h2",
            bool,
            True,
            "Let HTTP/2 clients open WebSockets through the proxy (RFC 8441 extended "
            "CONNECT). Takes effect for new connections.",
        )

    def configure(self, updated: set[str]) -> None:
        try:
            self._configure(updated)
        except exceptions.OptionsError as e:
            if self._configured:
                raise  # set live: mitmproxy keeps the previous value and shows this
            # At start-up mitmproxy would print a traceback for a script's
            # error; one line says it better, and an error logged during
            # start-up makes mitmproxy refuse to start.
            logger.error("%s", e)
        finally:
            self._configured = True

    def _configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "ws_encode_policy" in updated:
            try:
                self.policy = EncodingPolicy(opts.ws_encode_policy)
            except ValueError:
                raise exceptions.OptionsError(
                    f"ws_encode_policy: unknown policy {opts.ws_encode_policy!r}; "
                    "use observe, strip or inject"
                ) from None
        if "ws_encode_codings" in updated:
            if not opts.ws_encode_codings.strip() or "\n" in opts.ws_encode_codings:
                raise exceptions.OptionsError(
                    "ws_encode_codings: must be a non-empty accept-encoding value on one line"
                )
            self.codings = opts.ws_encode_codings.strip()
        if "ws_encode_stall" in updated:
            try:
                self.stall_after = parse_stall_seconds(opts.ws_encode_stall)
            except ValueError as e:
                raise exceptions.OptionsError(f"ws_encode_stall: {e}") from None
        if "ws_encode_filter" in updated:
            if opts.ws_encode_filter:
                try:
                    self.filter = flowfilter.parse(opts.ws_encode_filter)
                except ValueError as e:
                    raise exceptions.OptionsError(f"ws_encode_filter: {e}") from None
            else:
                self.filter = None
        if "ws_encode_report" in updated:
            self._open_report(opts.ws_encode_report)
        if "ws_encode_h2" in updated:
            self.bridge.install(h2=opts.ws_encode_h2)

    def _open_report(self, path: str) -> None:
        new = None
        if path:
            try:
                new = ReportWriter(Path(path).expanduser())
            except OSError as e:
                raise exceptions.OptionsError(
                    f"ws_encode_report: cannot append to {path!r}: {e.strerror}"
                ) from None
        if self.report:
            self.report.close()
        self.report = new

    def done(self) -> None:
        now = self.clock()
        for tracked in list(self.tracked.values()):
            self._finish_without_status(tracked, EndCause.PROXY_STOPPED, now)
        if self.report:
            self.report.close()
            self.report = None
        self.bridge.uninstall()

    # -- hooks -----------------------------------------------------------

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        handshake = classify(flow.request)
        if handshake is None:
            return
        if self.filter and not self.filter(flow):
            return
        headers = flow.request.headers
        accept_encoding_client = headers.get("accept-encoding")
        self.policy.apply_to_request(headers, self.codings)
        tracked = Tracked(
            flow=flow,
            progress=Progress(handshake, forwarded_at=self.clock()),
            policy=self.policy,
            url=redact_url(flow.request.pretty_url),
            accept_encoding_client=accept_encoding_client,
            accept_encoding_upstream=headers.get("accept-encoding"),
        )
        self.tracked[flow.id] = tracked
        if handshake.malformed:
            logger.warning(
                "Malformed WebSocket handshake to %s: %s",
                tracked.url,
                "; ".join(handshake.problems),
            )
        self._stall_watch().arm(flow.id, self.stall_after, lambda: self._on_stall(flow.id))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        tracked = self.tracked.get(flow.id)
        if tracked is None or flow.response is None:
            return
        facts = self._take_facts(tracked)
        progress = tracked.progress
        progress.upstream_status = facts.upstream_status or flow.response.status_code
        if progress.handshake.transport is not Transport.H1 and not accept_matches(flow):
            # The proxy made this key (the client's extended CONNECT has none),
            # so the proxy checks the answer, and fails the handshake in the
            # response hook (a response set here would lose its body).
            progress.bad_accept = True
            self.failing.add(flow.id)
        phase = progress.status_arrived(
            BAD_ACCEPT_STATUS if progress.bad_accept else flow.response.status_code,
            self.clock(),
            content_encoding=flow.response.headers.get("content-encoding"),
            with_data=facts.status_with_data,
        )
        if phase is Phase.UPGRADED:
            self.policy.apply_to_success(flow.response.headers)
        self._finish(tracked)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.id in self.failing:
            self.failing.discard(flow.id)
            flow.response = http.Response.make(
                BAD_ACCEPT_STATUS,
                "ws_encode: the upstream answered the WebSocket handshake with a wrong Sec-WebSocket-Accept\n",
            )
            flow.websocket = None

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        # Messages an HTTP/2 client sent before the status went straight
        # upstream; they belong at the start of the conversation.
        early = self.bridge.facts(flow.request).early_messages
        if early and flow.websocket is not None:
            flow.websocket.messages[:0] = [
                websocket.WebSocketMessage(opcode, True, content, timestamp)
                for opcode, content, timestamp in early
            ]

    def error(self, flow: http.HTTPFlow) -> None:
        self.failing.discard(flow.id)
        tracked = self.tracked.get(flow.id)
        if tracked is None or flow.error is None:
            return
        cause = end_cause(flow.error.msg, flow.server_conn.timestamp_tcp_setup is not None)
        self._finish_without_status(tracked, cause, self.clock())

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if self.bridge.installed:
            h2bridge.offer_http1_only(data.server, data.client)

    def client_disconnected(self, client: connection.Client) -> None:
        # Backstop: mitmproxy normally reports a client leaving mid-handshake
        # through the error hook; this catches any flow it did not.
        now = self.clock()
        for tracked in list(self.tracked.values()):
            if tracked.flow.client_conn is client:
                self._finish_without_status(tracked, EndCause.CLIENT_GONE, now)

    # -- stall and outcome -----------------------------------------------

    def _stall_watch(self) -> StallWatch:
        if self.watch is None:
            self.watch = StallWatch(asyncio.get_running_loop().call_later)
        return self.watch

    def _take_facts(self, tracked: Tracked) -> h2bridge.StreamFacts:
        """What the bridge saw of this handshake: when it really went
        upstream (the stall clock's start) and the client's early bytes."""
        facts = self.bridge.facts(tracked.flow.request)
        if facts.forwarded_at is not None:
            tracked.progress.forwarded_at = facts.forwarded_at
        tracked.progress.client_bytes_before_status = facts.client_bytes_before_status
        return facts

    def _on_stall(self, flow_id: str) -> None:
        tracked = self.tracked.get(flow_id)
        flow = tracked.flow if tracked else None
        if tracked is None or not flow.live or flow.response or flow.error:
            return
        progress = tracked.progress
        facts = self._take_facts(tracked)
        now = self.clock()
        if facts is not h2bridge.NO_FACTS and facts.forwarded_at is None:
            # The bridge follows this handshake and it is not on the upstream
            # connection yet (still connecting, or held for an HTTP/2
            # server's SETTINGS): the clock has not started. Without the
            # bridge it started at the request hook.
            self._stall_watch().arm(flow_id, self.stall_after, lambda: self._on_stall(flow_id))
            return
        remaining = progress.forwarded_at + self.stall_after - now
        if remaining > 0:
            self._stall_watch().arm(flow_id, remaining, lambda: self._on_stall(flow_id))
            return
        progress.stall()
        waited = progress.waited(now)
        text = diagnosis.stall(progress, waited, tracked.accept_encoding_upstream)
        if not flow.marked:
            flow.marked = STALL_MARK
        flow.comment = f"{flow.comment}\n{text}" if flow.comment else text
        self.stalls[flow_id] = f"{flow_id} {tracked.url}: {text}"
        while len(self.stalls) > REMEMBERED_STALLS:
            self.stalls.popitem(last=False)
        self._write("stall", tracked, waited, text)
        logger.warning("WebSocket handshake stall on %s: %s", tracked.url, text)
        ctx.master.addons.trigger(hooks.UpdateHook([flow]))

    def _finish_without_status(self, tracked: Tracked, cause: EndCause, now: float) -> None:
        self._take_facts(tracked)
        try:
            tracked.progress.end(cause, now)
        except HandshakeEnded:
            return
        self._finish(tracked)

    def _finish(self, tracked: Tracked) -> None:
        flow_id = tracked.flow.id
        self.tracked.pop(flow_id, None)
        if self.watch:
            self.watch.disarm(flow_id)
        progress = tracked.progress
        now = self.clock()
        text = diagnosis.outcome(progress, now, tracked.accept_encoding_upstream)
        if flow_id in self.stalls:
            self.stalls[flow_id] = f"{flow_id} {tracked.url}: {text}"
        self._write(
            "handshake",
            tracked,
            progress.waited(now),
            text,
            outcome=progress.phase.value,
            stalled=progress.stalled,
            content_encoding=progress.content_encoding,
        )
        quiet = progress.phase is Phase.UPGRADED and not progress.stalled
        log = logger.info if quiet else logger.warning
        log("WebSocket handshake %s on %s: %s", progress.phase.value, tracked.url, text)

    def _write(self, event: str, tracked: Tracked, waited: float, text: str, **extra: Any) -> None:
        flow = tracked.flow
        record = {
            "event": event,
            "ts": utc_now_iso(),
            "flow_id": flow.id,
            "transport": tracked.progress.handshake.transport.value,
            "upstream_transport": upstream_transport(flow.server_conn),
            "url": tracked.url,
            "policy": tracked.policy.value,
            "accept_encoding_client": tracked.accept_encoding_client,
            "accept_encoding_upstream": tracked.accept_encoding_upstream,
            "waited_s": round(waited, 3),
            "status": tracked.client_status,
            "upstream_status": tracked.progress.upstream_status,
            "client_bytes_before_status": tracked.progress.client_bytes_before_status,
            "diagnosis": text,
            **extra,
        }
        flow.metadata["ws_encode"] = {k: v for k, v in record.items() if k != "flow_id"}
        if self.report:
            try:
                self.report.write(record)
            except OSError as e:
                logger.error("ws_encode_report: cannot write to %s: %s", self.report.path, e.strerror)

    # -- commands --------------------------------------------------------

    # Both commands answer at least one line: mitmproxy's console data
    # viewer cannot show an empty list.

    @command.command("wsencode.stalls")
    def stalled_handshakes(self) -> Sequence[str]:
        """The handshakes that stalled (the last 1000), each with its diagnosis."""
        return list(self.stalls.values()) or ["no WebSocket handshake has stalled"]

    @command.command("wsencode.waiting")
    def waiting_handshakes(self) -> Sequence[str]:
        """The handshakes still waiting for a status, with how long they have waited."""
        now = self.clock()
        waiting = [
            f"{t.flow.id} {t.url}: {t.progress.phase.value}, {t.progress.waited(now):.1f} s"
            for t in self.tracked.values()
        ]
        return waiting or ["no WebSocket handshake is waiting for its status"]


addons = [WsEncode()]
