"""ws-encode: find out why WebSocket handshakes hang, and prove it.

    mitmdump -s addon/ws_encode.py --mode reverse:http://127.0.0.1:9000 -p 8081 \
        --set ws_encode_policy=observe --set ws_encode_report=handshakes.jsonl

Sees every WebSocket handshake (HTTP/1.1 upgrades, HTTP/2 and HTTP/3 extended
CONNECTs), applies an encoding policy to it, reports a stall the moment a
status is withheld while the client waits, saying where the handshake is
stuck, and writes one report record per handshake. This class translates
mitmproxy's hooks into the core's events (`wsencode.core.handshakes`) and the
records it returns into marks, comments, log lines and report lines; the
bridge (`wsencode.bridge`) is what reaches into mitmproxy.
"""

import asyncio
import logging
import sys
import time
from collections.abc import Sequence

# mitmproxy re-imports this script when the file changes. Drop the package's
# cached modules first, so that a reload also picks up changes to them.
for _name in [n for n in sys.modules if n == "wsencode" or n.startswith("wsencode.")]:
    del sys.modules[_name]

from mitmproxy import connection, ctx, exceptions, flow, hooks, http, tls, websocket  # noqa: E402
from mitmproxy.proxy import server_hooks  # noqa: E402

from wsencode.bridge import Bridge  # noqa: E402
from wsencode.core.handshakes import FollowedHandshake, Handshakes  # noqa: E402
from wsencode.core.lifecycle import EndCause, Stage  # noqa: E402
from wsencode.core.policy import EncodingPolicy  # noqa: E402
from wsencode.core.stallwatch import StallWatch  # noqa: E402
from wsencode.core.streamfacts import facts_of  # noqa: E402
from wsencode.mitm import bundling, eventstream, flowview, options  # noqa: E402
from wsencode.mitm.commands import Commands  # noqa: E402
from wsencode.mitm.output import Output, WaitingLine  # noqa: E402
from wsencode.report import printable, redact_url  # noqa: E402

logger = logging.getLogger("ws_encode")

HANDOFF = "ws_encode_handoff"  # where a copy being reloaded leaves its handshakes, on mitmproxy's master


def _call_later(delay, callback):
    return asyncio.get_running_loop().call_later(delay, callback)


class WsEncode:
    def __init__(self) -> None:
        self.clock = time.monotonic  # the bridge notes its times on it too (StreamFacts.clock)
        self.handshakes = Handshakes(StallWatch(_call_later, lambda: self.clock()), self._on_stall_due)
        self.flows: dict[str, http.HTTPFlow] = {}  # the live flow of each followed handshake
        self.policy, self.codings, self.filter = EncodingPolicy.OBSERVE, "zstd, br, gzip", None
        self.output, self.waiting_line = Output(), WaitingLine(self.handshakes, lambda: self.clock(), _call_later)
        self.bridge, self.opening, self.at_exit = Bridge(), flowview.Opening(), bundling.AtExit()
        self.h2 = self.h3 = True  # what new client connections are offered (ws_encode_h2, ws_encode_h3)
        self.event_streams = True  # ws_encode_event_streams
        self.updated: list[http.HTTPFlow] = []  # stalled flows whose update hook is due
        self._configured = False
        self.commands = Commands(self)
        self.addons = [self.commands, self.bridge, self.at_exit]

    # -- options and life ------------------------------------------------------

    def load(self, loader) -> None:
        options.declare(loader)
        handed = getattr(ctx.master, HANDOFF, None)
        if handed is not None:  # the script was reloaded while handshakes waited: follow them on
            delattr(ctx.master, HANDOFF)
            handoff, flows = handed
            # (whatever the option says now: the earlier copy followed these)
            self.handshakes.take_over(handoff, lambda flow_id: flowview.classified(flows.get(flow_id), event_streams=True))
            self.flows.update((i, flows[i]) for i in self.handshakes.waiting)

    def configure(self, updated: set[str]) -> None:
        try:
            values = options.parsed(ctx.options, updated)
            if "ws_encode_report" in values:
                self.output.open_report(values["ws_encode_report"])
        except exceptions.OptionsError as e:
            if self._configured:
                raise  # set live: mitmproxy keeps the previous value and shows this
            # At start-up an error logged makes mitmproxy refuse to start; one
            # line says it better than the traceback a script's error gets.
            logger.error("%s", e)
            return
        finally:
            self._configured = True
        self.policy = values.get("ws_encode_policy", self.policy)
        self.codings = values.get("ws_encode_codings", self.codings)
        self.filter = values.get("ws_encode_filter", self.filter)
        self.event_streams = values.get("ws_encode_event_streams", self.event_streams)
        if "ws_encode_stall" in values:
            self.handshakes.stall_after_changed(values["ws_encode_stall"])
        if "ws_encode_bundle" in values:
            self.at_exit.set_folder(values["ws_encode_bundle"])
        if "ws_encode_h2" in values or "ws_encode_h3" in values:
            self.h2, self.h3 = values.get("ws_encode_h2", self.h2), values.get("ws_encode_h3", self.h3)
            self.bridge.install(h2=self.h2, h3=self.h3)

    def done(self) -> None:
        self.waiting_line.cancel()
        if ctx.master.should_exit.is_set():
            for flow_id in list(self.flows):
                self._end(flow_id, EndCause.PROXY_STOPPED)
            for line in self.commands.summary_lines():
                logger.info("ws_encode summary: %s", line)
            self.at_exit.write(self._report_file(), self._option_values())
        else:  # reloaded or removed: the handshakes go on, followed by the next copy
            setattr(ctx.master, HANDOFF, (self.handshakes.hand_over(), self.flows))
        self.output.close()
        self.bridge.uninstall()

    # -- hooks ---------------------------------------------------------------

    def requestheaders(self, f: http.HTTPFlow) -> None:
        # The clock starts here, when the proxy has the handshake: the client
        # has been waiting since, wherever the handshake gets stuck next.
        if f.response or not f.live:
            return
        found = flowview.classified(f, self.event_streams)
        if found is None or not flowview.matches(f, self.filter, found[0]):
            return
        handshake, facts = found
        facts.clock = self.clock  # the bridge notes this handshake's times on the addon's clock
        if facts.handshake is None:  # no bridge's stream classified it: the hooks note what they can
            facts.handshake, facts.noted_by_hooks = handshake, True
        self.flows[f.id] = f
        self.at_exit.keep(f)
        followed = self.handshakes.received(f.id, f.client_conn.id, handshake, facts, self.clock(), self.policy,
                                            redact_url(flowview.url_of(f.request)),
                                            flowview.header(f.request.headers, "accept-encoding"))
        if handshake.malformed:
            logger.warning("Malformed WebSocket handshake to %s: %s", followed.url, "; ".join(handshake.problems))
        if f.error:  # mitmproxy's request checks refused it before this hook: it goes nowhere
            self._end(f.id, EndCause.PROXY_RESET, "mitmproxy refused the request")
            return
        self.waiting_line.keep()

    def request(self, f: http.HTTPFlow) -> None:
        followed = self.handshakes.get(f.id)
        if followed is None or f.response:
            return
        self.policy.apply_to_request(f.request.headers, self.codings)
        self.handshakes.sent_upstream(f.id, self.policy, flowview.header(f.request.headers, "accept-encoding"))
        if followed.facts.noted_by_hooks:
            followed.facts.forwarded()  # it goes upstream right after this hook

    def responseheaders(self, f: http.HTTPFlow) -> None:
        followed = self.handshakes.get(f.id)
        if followed is None or f.response is None:
            return
        if followed.facts.noted_by_hooks:
            followed.facts.answer_status = followed.facts.upstream_status = f.response.status_code
        if not followed.progress.handshake.is_websocket and eventstream.is_event_stream(f.response):
            # Streamed, its head goes out once every addon has had this hook,
            # and each event as it comes (the update hook times them).
            f.response.stream = f.response.stream or True
            self.handshakes.answered(f.id, flowview.upstream_transport(f.server_conn), False)

    def response(self, f: http.HTTPFlow) -> None:
        followed = self.handshakes.get(f.id)
        if followed is None or f.response is None:
            return
        if followed.facts.noted_by_hooks and followed.facts.answer_status is None:
            self.responseheaders(f)
        # An upgrade's accept, where the proxy did not check it itself.
        bad = followed.facts.proxy_refused is not None or not flowview.accept_matches(f)
        self.handshakes.answered(f.id, flowview.upstream_transport(f.server_conn), bad)

    def update(self, flows: Sequence[flow.Flow]) -> None:
        # mitmproxy calls this right after every hook of a flow, once every
        # addon has had it: an answered status goes out now, unless an addon
        # or the user holds it (interception) or killed it. A busy event loop
        # runs the stall timer late; the hooks, meanwhile, keep coming. With
        # no handshake followed there is neither (the flows of most hooks).
        if not self.handshakes:
            return
        self.handshakes.watch.fire_due()
        for f in flows:
            followed = self.handshakes.get(f.id)
            if followed is None or not followed.answered or f.intercepted:
                continue
            if followed.progress.status is None:
                if f.response is not None and f.response.stream and not followed.progress.handshake.is_websocket:
                    # (wrapping any stream function an addon after this one set)
                    eventstream.pass_through(f, followed.facts, lambda f=f: self._call_update(f))
                if f.response is None or f.response.stream or f.response.timestamp_end is not None:
                    self._deliver(followed, f)  # (a response not streamed goes out at its end)
                    if (self.handshakes.get(f.id) is not None and f.response is not None
                            and f.response.timestamp_end is not None):
                        self._stream_went_on(followed, f)  # an event stream's whole response: no event to come
            else:
                self._stream_went_on(followed, f)

    def websocket_start(self, f: http.HTTPFlow) -> None:
        followed = self.handshakes.get(f.id)
        if followed is not None and followed.answered:
            self._deliver(followed, f)  # (the update hook comes first; in case it did not)
        # Messages a client sent before the status went straight upstream;
        # they belong at the start of the conversation.
        facts = facts_of(f.request)
        if facts is not None and facts.early_messages and f.websocket is not None:
            f.websocket.messages[:0] = [websocket.WebSocketMessage(opcode, True, content, timestamp)
                                        for opcode, content, timestamp in facts.early_messages]

    def error(self, f: http.HTTPFlow) -> None:
        followed = self.handshakes.get(f.id)
        if followed is not None and f.error is not None:
            self._end(f.id, flowview.end_cause(f, followed.facts), followed.facts.ended_by_proxy)

    def client_disconnected(self, client: connection.Client) -> None:
        # Backstop: mitmproxy normally reports a client leaving mid-handshake
        # through the error hook; this catches any flow it did not.
        for flow_id in self.handshakes.of(client.id):
            self._end(flow_id, EndCause.CLIENT_GONE)

    # Upstream connections being opened: where a handshake waiting for one is.

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.opening.connecting(data.server, data.client.id)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.opening.connected(data.server)

    def tls_established_server(self, data: tls.TlsData) -> None:
        self.opening.ended(data.conn)

    def tls_failed_server(self, data: tls.TlsData) -> None:
        self.opening.ended(data.conn)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.opening.ended(data.server)

    # -- following a handshake ---------------------------------------------------

    def stage_of(self, followed: FollowedHandshake) -> Stage:
        return flowview.stage_of(self.flows[followed.flow_id], followed.facts, self.opening)

    def _on_stall_due(self, flow_id: str) -> None:
        f = self.flows.get(flow_id)
        followed = self.handshakes.get(flow_id)
        if f is None or followed is None or not f.live:
            return
        record = self.handshakes.stalled(flow_id, self.stage_of(followed), self.clock(),
                                         flowview.upstream_transport(f.server_conn))
        if record is None:
            return
        self.output.stalled(f, record)
        self._call_update(f)

    def _call_update(self, f: http.HTTPFlow) -> None:
        """The update hook for `f` (a stall shown, an event stream's first
        event), with every other flow's of this turn of the event loop: the
        copy of the addon loaded by then takes what an event stream noted."""
        self.updated.append(f)
        if len(self.updated) == 1:
            try:
                asyncio.get_running_loop().call_soon(self._send_updates)
            except RuntimeError:  # no event loop (a test driving the timer by hand)
                self._send_updates()

    def _send_updates(self) -> None:
        flows, self.updated = self.updated, []
        ctx.master.addons.trigger(hooks.UpdateHook(flows))

    def _stream_went_on(self, followed: FollowedHandshake, f: http.HTTPFlow) -> None:
        """An opened event stream: its first event went through, or it ended without one."""
        if followed.facts.first_event_at is not None:
            record = self.handshakes.first_event(f.id, followed.facts.first_event_at)
        elif f.response is not None and f.response.timestamp_end is not None:
            record = self.handshakes.ended(f.id, EndCause.UPSTREAM_CLOSED, Stage.DONE, self.clock(), None)
        else:
            return
        if record is not None:
            self.flows.pop(f.id, None)
            self.output.finished(f, record)

    def _deliver(self, followed: FollowedHandshake, f: http.HTTPFlow) -> None:
        if f.error is not None or f.response is None:  # killed, or failed, after its response hooks
            self._end(f.id, flowview.end_cause(f, followed.facts))
            return
        content_encoding = flowview.header(f.response.headers, "content-encoding")  # as the upstream sent it
        handshake = followed.progress.handshake
        if handshake.is_websocket and handshake.is_success(f.response.status_code):
            self.policy.apply_to_success(f.response.headers)
        record = self.handshakes.delivered(f.id, f.response.status_code, content_encoding, self.clock(),
                                           flowview.header(f.response.headers, "content-type") or "")
        if record is not None:
            self.flows.pop(f.id, None)
            self.output.finished(f, record)

    def _end(self, flow_id: str, cause: EndCause, reason: str | None = None) -> None:
        f, followed = self.flows.get(flow_id), self.handshakes.get(flow_id)
        if f is None or followed is None:
            return
        record = self.handshakes.ended(flow_id, cause, self.stage_of(followed), self.clock(),
                                       flowview.upstream_transport(f.server_conn), reason)
        if record is not None:
            self.flows.pop(flow_id, None)
            self.output.finished(f, record)

    # -- what the commands and bundles ask ------------------------------------------

    def report_path(self) -> str | None:
        return printable(str(self.output.report.path)) if self.output.report else None

    def _report_file(self):
        return self.output.report.path if self.output.report else None

    def _option_values(self) -> dict:
        return {name: getattr(ctx.options, name) for name in options.NAMES}

    def write_bundle(self, flows: Sequence[flow.Flow], folder: str) -> str:
        return bundling.write(flows, folder, self._report_file(), self._option_values())


addons = [WsEncode()]
