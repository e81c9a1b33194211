"""ws-encode: find out why WebSocket handshakes hang, and prove it.

    mitmdump -s addon/ws_encode.py --mode reverse:http://127.0.0.1:9000 -p 8081 \
        --set ws_encode_policy=observe --set ws_encode_report=handshakes.jsonl

Sees every WebSocket handshake (HTTP/1.1 upgrades and HTTP/2 extended
CONNECTs), applies an encoding policy to it, reports a stall the moment a
status is withheld while the client waits, saying where the handshake is
stuck, and writes one report record per handshake. The contract is
../shared/SPEC.md; the protocol logic lives in the `wsencode` package beside
this file (`tracker` is the core this class feeds), and this class only
adapts mitmproxy's hooks to it.
"""

import asyncio
import json
import logging
import sys
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

# mitmproxy re-imports this script when the file changes. Drop the package's
# cached modules first, so that a reload also picks up changes to them.
for _name in [n for n in sys.modules if n == "wsencode" or n.startswith("wsencode.")]:
    del sys.modules[_name]

import mitmproxy.types  # noqa: E402
from mitmproxy import command, connection, ctx, exceptions, flow, flowfilter, hooks, http, websocket  # noqa: E402
from mitmproxy import log as mitmproxy_log  # noqa: E402
from mitmproxy.proxy import server_hooks  # noqa: E402

from wsencode import bundle, wireform  # noqa: E402
from wsencode.bridge import Bridge  # noqa: E402
from wsencode.flowview import (  # noqa: E402
    accept_matches, client_transport, end_cause, header, stage_of, upstream_transport, url_of, value_of,
)
from wsencode.handshake import Transport, classify  # noqa: E402
from wsencode.lifecycle import EndCause, Stage  # noqa: E402
from wsencode.policy import EncodingPolicy  # noqa: E402
from wsencode.report import ReportWriter, printable, redact_url, utc_now_iso  # noqa: E402
from wsencode.stallwatch import Scheduler, StallWatch, Timer  # noqa: E402
from wsencode.streamfacts import NO_FACTS, StreamFacts, not_a_handshake  # noqa: E402
from wsencode.tracker import Record, TrackedHandshake, Tracker, wrap  # noqa: E402

logger = logging.getLogger("ws_encode")

STALL_MARK = ":hourglass:"
OPTIONS = ("ws_encode_policy", "ws_encode_codings", "ws_encode_stall", "ws_encode_report", "ws_encode_filter",
           "ws_encode_h2", "ws_encode_bundle")
# With ws_encode_bundle set, the last handshakes kept for the bundle written at exit.
BUNDLED_AT_EXIT = 1000
PROGRESS_EVERY = 5.0  # at most this many seconds between progress lines while a handshake waits too long
# The flows that stalled, for the console's and mitmweb's flow list.
STALLED_FILTER = '~comment "Stall: no status"'
# What `wsencode.waiting` says a handshake is doing, by where it is.
DOING = {
    Stage.CONNECTING: "connecting to the upstream",
    Stage.TLS: "in TLS with the upstream",
    Stage.SETTINGS: "waiting for the upstream's SETTINGS",
    Stage.QUEUED: "queued in the proxy",
    Stage.INTERCEPTED: "held by interception",
    Stage.FORWARDED: "waiting for the upstream's status",
}


def parse_stall_seconds(value: str) -> float:
    """The ws_encode_stall option as seconds; ValueError names what is wrong."""
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number of seconds") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{value!r} must be a finite number of seconds > 0")
    return seconds


def info_shown() -> bool:
    """Whether an INFO record reaches anyone who shows or keeps it.

    `logger.isEnabledFor(logging.INFO)` is always true in mitmproxy: it sets
    the root logger to DEBUG, and its bridge to the deprecated `add_log` hook
    (`log.LegacyLogEvents`, level NOTSET) takes every record and dispatches it
    to every addon once more. Who shows a record is the other handlers: the
    terminal at `termlog_verbosity`, mitmweb's and the console's event log,
    a test's log capture.
    """
    return any(
        h.level <= logging.INFO and not isinstance(h, mitmproxy_log.LegacyLogEvents)
        for h in logging.getLogger().handlers
    )


class WsEncode:
    def __init__(self) -> None:
        self.policy = EncodingPolicy.OBSERVE
        self.codings = "zstd, br, gzip"
        self.stall_after = 2.0
        self.filter: flowfilter.TFilter | None = None
        self.report: ReportWriter | None = None
        self.tracker = Tracker()
        self.flows: dict[str, http.HTTPFlow] = {}  # the live flow of each tracked handshake
        # The tracked handshakes of each client connection (by its id), for
        # its disconnect: without a scan of every tracked flow per disconnect.
        self.of_client: dict[str, list[str]] = {}
        self.watch: StallWatch | None = None
        self.updated: list[http.HTTPFlow] = []  # stalled flows whose update hook is due
        # Flows whose status arrived but is held from the client by interception.
        self.responses_held: dict[str, bool] = {}  # (whether its accept answered the key wrongly)
        # The progress line's timer; its scheduler is injected like the watch's.
        self.schedule_progress: Scheduler | None = None
        self.progress_timer: Timer | None = None
        self.bridge = Bridge()
        # Upstream connections being opened, with their client's id: where a
        # handshake waiting for a connection is (TCP or TLS).
        self.opening: weakref.WeakKeyDictionary[connection.Server, str] = weakref.WeakKeyDictionary()
        # The handshakes the exit bundle will hold (only kept while ws_encode_bundle is set).
        self.for_bundle: OrderedDict[str, http.HTTPFlow] = OrderedDict()
        self.bundle_at_exit: str | None = None
        self._configured = False
        # Monotonic seconds; the bridge notes its times on it too (StreamFacts.clock).
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
            "Seconds (> 0, e.g. 1.5) a WebSocket handshake may wait for its status, from "
            "when the proxy received it, before a stall is reported.",
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
            "(empty: all). ~websocket matches handshakes too.",
        )
        loader.add_option(
            "ws_encode_bundle",
            str,
            "",
            "Write a redacted bug-report bundle of the handshakes seen (the last "
            f"{BUNDLED_AT_EXIT}) into this empty folder when mitmproxy exits (empty: none). "
            "In the console or mitmweb, the wsencode.bundle command does it for chosen flows.",
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
                    f"ws_encode_policy: unknown policy {printable(opts.ws_encode_policy)!r}; "
                    "use observe, strip or inject"
                ) from None
        if "ws_encode_codings" in updated:
            codings = opts.ws_encode_codings
            # A CR or LF would end the header line and start another one upstream.
            if not codings.strip() or printable(codings) != codings:
                raise exceptions.OptionsError(
                    "ws_encode_codings: must be a non-empty accept-encoding value on one line, "
                    "without control characters"
                )
            self.codings = codings.strip()
        if "ws_encode_stall" in updated:
            try:
                self.stall_after = parse_stall_seconds(opts.ws_encode_stall)
            except ValueError as e:
                raise exceptions.OptionsError(f"ws_encode_stall: {printable(str(e))}") from None
        if "ws_encode_filter" in updated:
            if opts.ws_encode_filter:
                try:
                    self.filter = flowfilter.parse(opts.ws_encode_filter)
                except ValueError as e:
                    raise exceptions.OptionsError(f"ws_encode_filter: {printable(str(e))}") from None
            else:
                self.filter = None
        if "ws_encode_report" in updated:
            self._open_report(opts.ws_encode_report)
        if "ws_encode_bundle" in updated:
            if opts.ws_encode_bundle:
                try:
                    bundle.check_folder(opts.ws_encode_bundle)
                except bundle.BundleError as e:
                    raise exceptions.OptionsError(f"ws_encode_bundle: {printable(str(e))}") from None
            self.bundle_at_exit = opts.ws_encode_bundle or None
            if not self.bundle_at_exit:
                self.for_bundle.clear()
        if "ws_encode_h2" in updated:
            self.bridge.install(h2=opts.ws_encode_h2)

    def _open_report(self, path: str) -> None:
        new = None
        if path:
            try:
                new = ReportWriter(Path(path).expanduser())
            except OSError as e:
                raise exceptions.OptionsError(
                    f"ws_encode_report: cannot append to {printable(path)!r}: {e.strerror}"
                ) from None
        if self.report:
            self.report.close()
        self.report = new

    def done(self) -> None:
        now = self.clock()
        if self.progress_timer is not None:
            self.progress_timer.cancel()
            self.progress_timer = None
        if ctx.master.should_exit.is_set():
            for tracked in list(self.tracker):
                self._end(tracked.flow_id, EndCause.PROXY_STOPPED, now)
            for line in self._summary_lines():
                logger.info("ws_encode summary: %s", line)
            if self.bundle_at_exit and self.for_bundle:
                self._write_bundle(list(self.for_bundle.values()), self.bundle_at_exit)
        else:
            # The script is being reloaded (or removed): the handshakes go
            # on, and the next copy adopts each one when it ends.
            for tracked in list(self.tracker):
                self._forget(tracked.flow_id)
        if self.report:
            self.report.close()
            self.report = None
        self.bridge.uninstall()

    # -- hooks -----------------------------------------------------------

    def requestheaders(self, f: http.HTTPFlow) -> None:
        # The clock starts here, when the proxy has the handshake: the client
        # has been waiting since, wherever the handshake gets stuck next.
        if f.response or f.error or not f.live:
            return
        self._track(f, self.clock())

    def request(self, f: http.HTTPFlow) -> None:
        tracked = self.tracker.get(f.id)
        if tracked is None or f.response:
            return
        headers = f.request.headers
        self.policy.apply_to_request(headers, self.codings)
        tracked.policy = self.policy
        tracked.accept_encoding_upstream = header(headers, "accept-encoding")
        if self.bridge.facts(f.request) is NO_FACTS:
            # No codec follows this request (no bridge, or a stream older
            # than the addon): it goes upstream right after this hook.
            tracked.progress.forwarded_at = self.clock()

    def response(self, f: http.HTTPFlow) -> None:
        tracked = self.tracker.get(f.id) or self._adopt(f)
        if tracked is None or f.response is None:
            return
        facts = self.bridge.facts(f.request)
        # A status the upstream's codec translated says what the upstream sent.
        tracked.progress.upstream_status = facts.upstream_status or f.response.status_code
        # (an upgrade's accept, checked where the proxy did not check it: the
        # codec refuses a wrong one to a client that sent an extended CONNECT)
        bad_accept = facts.proxy_refused is not None or not accept_matches(f)
        # The response goes to the client once every addon has had it, unless
        # one of them intercepts it (mitmproxy's console and mitmweb
        # intercept after every script): the update hook mitmproxy runs
        # right after the response hooks says which (`f.intercepted`), and
        # so does the one it runs when a user resumes the flow.
        self.responses_held[f.id] = bad_accept

    def update(self, flows: Sequence[flow.Flow]) -> None:
        # mitmproxy calls this after every hook of every flow (each WebSocket
        # message too), so it costs nothing while no stall is due and no
        # response is held. A busy event loop runs the stall timer late; its
        # hooks, meanwhile, keep coming.
        if self.watch is not None:
            self.watch.fire_due()
        if not self.responses_held:
            return
        for f in flows:
            self._deliver_unless_intercepted(f)

    def _deliver_unless_intercepted(self, f: http.HTTPFlow) -> None:
        tracked = self.tracker.get(f.id)
        if tracked is not None and f.id in self.responses_held and not f.intercepted:
            self._status_delivered(tracked, f, self.responses_held.pop(f.id))

    def websocket_start(self, f: http.HTTPFlow) -> None:
        self._deliver_unless_intercepted(f)  # (the update hook comes first; in case it did not)
        # Messages an HTTP/2 client sent before the status went straight
        # upstream; they belong at the start of the conversation.
        early = self.bridge.facts(f.request).early_messages
        if early and f.websocket is not None:
            f.websocket.messages[:0] = [
                websocket.WebSocketMessage(opcode, True, content, timestamp)
                for opcode, content, timestamp in early
            ]

    def error(self, f: http.HTTPFlow) -> None:
        tracked = self.tracker.get(f.id) or self._adopt(f)
        if tracked is None or f.error is None:
            return
        facts = self._sync(tracked, f)
        self._end(f.id, end_cause(f, facts), self.clock(), facts.ended_by_proxy)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.opening[data.server] = data.client.id

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if not data.server.tls:
            self.opening.pop(data.server, None)

    def tls_start_server(self, tls_start) -> None:
        self.bridge.offer_http1_only(tls_start.conn)

    def tls_established_server(self, data) -> None:
        self.opening.pop(data.conn, None)

    def tls_failed_server(self, data) -> None:
        self.opening.pop(data.conn, None)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.opening.pop(data.server, None)

    def client_disconnected(self, client: connection.Client) -> None:
        # Backstop: mitmproxy normally reports a client leaving mid-handshake
        # through the error hook; this catches any flow it did not.
        now = self.clock()
        for flow_id in list(self.of_client.get(client.id, ())):
            self._end(flow_id, EndCause.CLIENT_GONE, now)

    # -- following a handshake -------------------------------------------

    def _matches(self, f: http.HTTPFlow) -> bool:
        if self.filter is None:
            return True
        if f.websocket is not None:
            return self.filter(f)
        # mitmproxy sets flow.websocket only once the upgrade is done, so
        # `~websocket` could never match a handshake: let it, for the filter.
        f.websocket = websocket.WebSocketData()
        try:
            return self.filter(f)
        finally:
            f.websocket = None

    def _track(self, f: http.HTTPFlow, received_at: float, adopted: bool = False) -> TrackedHandshake | None:
        transport = client_transport(f)
        facts = self.bridge.facts(f.request)
        known = facts.handshake  # the bridge's stream classified it already
        if known is None and not_a_handshake(f.request):
            return None  # (most requests: not classified twice)
        handshake = known if known is not None and known.transport is transport else classify(f.request, transport)
        if handshake is None or not self._matches(f):
            return None
        if facts is not NO_FACTS:
            facts.clock = self.clock  # the bridge notes this handshake's times on the addon's clock
        tracked = self.tracker.received(
            f.id, handshake, received_at, self.policy, redact_url(url_of(f.request)),
            header(f.request.headers, "accept-encoding"),
            stalled=adopted and f.metadata.get("ws_encode", {}).get("event") == "stall",
        )
        self.flows[f.id] = f
        of_client = self.of_client.setdefault(f.client_conn.id, [])
        if f.id not in of_client:
            of_client.append(f.id)
        if self.bundle_at_exit:
            self.for_bundle[f.id] = f
            while len(self.for_bundle) > BUNDLED_AT_EXIT:
                self.for_bundle.popitem(last=False)
        if handshake.malformed:
            logger.warning("Malformed WebSocket handshake to %s: %s", tracked.url, "; ".join(handshake.problems))
        if not adopted:  # an adopted handshake is answered or ended already
            self._stall_watch().arm(f.id, self.stall_after, lambda: self._on_stall(f.id))
            self._keep_progress()
        return tracked

    def _adopt(self, f: http.HTTPFlow) -> TrackedHandshake | None:
        """A handshake an earlier copy of the addon followed (the script was
        reloaded while it waited): follow it from here, so it still gets its
        one record. Its wait counts from the request's arrival."""
        # (not `"upgrade" in headers`: mitmproxy's Headers raises and catches
        # a KeyError for every request without one)
        if not f.live or (value_of(f.request.headers, "upgrade") is None and f.request.method != "CONNECT"):
            return None  # not a handshake: the common case, kept cheap
        if f.metadata.get("ws_encode", {}).get("event") == "handshake":
            return None
        waited_wall = max(0.0, time.time() - (f.request.timestamp_start or time.time()))
        return self._track(f, self.clock() - waited_wall, adopted=True)

    def _sync(self, tracked: TrackedHandshake, f: http.HTTPFlow) -> StreamFacts:
        """Take what the bridge saw of this handshake (when it really went
        upstream, the client's early bytes) into the core's record of it."""
        facts = self.bridge.facts(f.request)
        progress = tracked.progress
        if facts.forwarded_at is not None:
            progress.forwarded_at = facts.forwarded_at
        progress.client_bytes_before_status = facts.client_bytes_before_status
        tracked.upstream_transport = upstream_transport(f.server_conn)
        return facts

    def _stage(self, tracked: TrackedHandshake, f: http.HTTPFlow, facts: StreamFacts) -> Stage:
        """Where a waiting handshake is now."""
        return stage_of(f, facts, tracked.progress.forwarded_at is not None, self.opening)

    def _keep_progress(self) -> None:
        """While handshakes wait, a line every few seconds says how many and
        how long, once any has waited past the stall threshold."""
        if self.progress_timer is not None:
            return
        schedule = self.schedule_progress or asyncio.get_running_loop().call_later
        self.progress_timer = schedule(min(PROGRESS_EVERY, max(1.0, self.stall_after)), self._progress)

    def _progress(self) -> None:
        self.progress_timer = None
        if not self.tracker:
            return
        longest = self.tracker.longest_wait(self.clock())
        if longest >= self.stall_after:
            n = len(self.tracker)
            logger.warning(
                "%d WebSocket handshake%s waiting for a status, longest %.1f s",
                n, "" if n == 1 else "s", longest,
            )
        self._keep_progress()

    def _stall_watch(self) -> StallWatch:
        if self.watch is None:
            self.watch = StallWatch(asyncio.get_running_loop().call_later, self.clock)
        return self.watch

    def _on_stall(self, flow_id: str) -> None:
        f = self.flows.get(flow_id)
        tracked = self.tracker.get(flow_id)
        if f is None or tracked is None or not f.live:
            return
        facts = self._sync(tracked, f)
        record = self.tracker.stall(flow_id, self._stage(tracked, f, facts), self.clock())
        if record is None:
            return
        text = record["diagnosis"]
        if not f.marked:
            f.marked = STALL_MARK
        self._comment(f, text)
        self._write(f, record)
        logger.warning("WebSocket handshake stall on %s: %s", tracked.url, text)
        # One update hook for all the stalls of this turn of the event loop
        # (each is a dispatch to every addon), not one per stall.
        self.updated.append(f)
        if len(self.updated) == 1:
            try:
                asyncio.get_running_loop().call_soon(self._send_updates)
            except RuntimeError:  # no event loop (a test driving the timer by hand)
                self._send_updates()

    def _send_updates(self) -> None:
        flows, self.updated = self.updated, []
        ctx.master.addons.trigger(hooks.UpdateHook(flows))

    def _status_delivered(self, tracked: TrackedHandshake, f: http.HTTPFlow, bad_accept: bool) -> None:
        facts = self._sync(tracked, f)  # (the upstream's status is noted at the response hook)
        status = f.response.status_code
        content_encoding = header(f.response.headers, "content-encoding")  # as the upstream sent it
        if status == 101 or 200 <= status < 300:
            self.policy.apply_to_success(f.response.headers)
        record = self.tracker.status(
            f.id, status, self.clock(),
            content_encoding=content_encoding,
            status_with_data=facts.status_with_data,
            bad_accept=bad_accept,
        )
        if record is not None:
            self._finished(f, record)

    def _end(self, flow_id: str, cause: EndCause, now: float, reason: str | None = None) -> None:
        f = self.flows.get(flow_id)
        tracked = self.tracker.get(flow_id)
        if f is None or tracked is None:
            return
        stage = self._stage(tracked, f, self.bridge.facts(f.request))
        record = self.tracker.end(flow_id, cause, stage, now, reason)
        if record is not None:
            self._finished(f, record)

    def _forget(self, flow_id: str) -> None:
        self.tracker.forget(flow_id)
        self.responses_held.pop(flow_id, None)
        f = self.flows.pop(flow_id, None)
        if f is not None:
            ids = self.of_client[f.client_conn.id]
            ids.remove(flow_id)
            if not ids:
                del self.of_client[f.client_conn.id]
        if self.watch is not None:
            self.watch.disarm(flow_id)

    def _finished(self, f: http.HTTPFlow, record: Record) -> None:
        facts = self.bridge.facts(f.request)
        self._forget(f.id)
        self._comment(f, record["diagnosis"])
        if facts is not NO_FACTS and f.request.method == "CONNECT":
            line, f.metadata["ws_encode_wire"] = wireform.described(f.request.path, record, facts.key_sent)
            self._comment(f, line)
        self._write(f, record)
        quiet = record["outcome"] == "upgraded" and not record["stalled"]
        if quiet and not info_shown():
            return
        (logger.info if quiet else logger.warning)(
            "WebSocket handshake %s on %s: %s", record["outcome"], record["url"], record["diagnosis"]
        )

    @staticmethod
    def _comment(f: http.HTTPFlow, line: str) -> None:
        # Appended, so a comment the user wrote stays as it was.
        f.comment = f"{f.comment}\n{line}" if f.comment else line

    def _write(self, f: http.HTTPFlow, record: Record) -> None:
        record = {"event": record["event"], "ts": utc_now_iso(), **record}
        f.metadata["ws_encode"] = {k: v for k, v in record.items() if k != "flow_id"}
        if self.report:
            try:
                self.report.write(record)
            except OSError as e:
                logger.error("ws_encode_report: cannot write to %s: %s", printable(str(self.report.path)), e.strerror)

    # -- commands --------------------------------------------------------

    # Every command answers at least one line: mitmproxy's console data
    # viewer cannot show an empty list. Lines lead with what a person reads
    # (the URL, the time), and wrap at words.

    def _summary_lines(self) -> list[str]:
        report = printable(str(self.report.path)) if self.report else None
        return self.tracker.summary.lines(len(self.tracker), self.tracker.longest_wait(self.clock()), report)

    @command.command("wsencode.summary")
    def summary(self) -> Sequence[str]:
        """Counts of WebSocket handshakes by outcome and transport, stalls, the slowest status, the report."""
        lines = self._summary_lines()
        logger.info("ws_encode summary: %s", "; ".join(lines))
        return lines

    @command.command("wsencode.stalls")
    def stalled_handshakes(self) -> Sequence[str]:
        """The handshakes that stalled (the last 1000, newest first), each with its diagnosis."""
        return self.tracker.stall_answers() or ["no WebSocket handshake has stalled"]

    @command.command("wsencode.waiting")
    def waiting_handshakes(self) -> Sequence[str]:
        """The handshakes still waiting for a status: where each is stuck, and for how long."""
        now = self.clock()
        lines = []
        for tracked in self.tracker:
            f = self.flows[tracked.flow_id]
            stage = self._stage(tracked, f, self._sync(tracked, f))
            waited = tracked.progress.waited(now)
            since = "not forwarded" if waited is None else f"forwarded {waited:.1f} s ago"
            lines.append(f"[flow {tracked.flow_id[:8]}] {tracked.url}")
            lines += wrap(f"{DOING[stage]} ({stage.value}): received {tracked.progress.received(now):.1f} s ago, {since}")
        return lines or ["no WebSocket handshake is waiting for its status"]

    def _write_bundle(self, flows: Sequence[flow.Flow], folder: str) -> str:
        options = {name: getattr(ctx.options, name) for name in OPTIONS}
        try:
            written = bundle.write_bundle(folder, flows, self._report_records(), options=options)
        except (bundle.BundleError, OSError) as e:
            message = f"ws_encode_bundle: not written: {printable(str(e))}"
            logger.error("%s", message)
            return message
        message = f"bug-report bundle of {len(flows)} flows written to {printable(str(written))}"
        logger.info("%s", message)
        return message

    def _report_records(self) -> list[Record] | None:
        """Every record the report holds (a flow keeps only its latest one)."""
        if self.report is None:
            return None
        try:
            with open(self.report.path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:
            logger.warning("ws_encode: the report cannot be read for the bundle (%s); using the flows' records",
                           printable(str(e)))
            return None

    @command.command("wsencode.bundle")
    def bundle_flows(self, flows: Sequence[flow.Flow], folder: mitmproxy.types.Path) -> str:
        """Write a redacted bug-report bundle of these flows (e.g. @marked) into an empty folder:
        report.jsonl, flows.mitm and summary.md."""
        return self._write_bundle(flows, str(folder))

    @command.command("wsencode.show")
    def show_stalled(self) -> Sequence[str]:
        """Limit the flow list to the handshakes that stalled."""
        if "view_filter" not in ctx.options:
            return ["no flow list here (mitmdump); the stalled flows match", f"    {STALLED_FILTER}"]
        ctx.options.view_filter = STALLED_FILTER
        return [
            "the flow list shows only stalled handshakes now:",
            f"    view_filter = {STALLED_FILTER}",
            "to see every flow again, clear view_filter",
            "    (console: `:set view_filter`; mitmweb: Options)",
        ]


addons = [WsEncode()]
