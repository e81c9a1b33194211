"""The addon class against mitmproxy's own test context, with time driven by hand."""

from __future__ import annotations

import io
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st
from conftest import ManualClock
from conftest import handshake_request as request
import ws_encode
from mitmproxy import connection, exceptions, flow, http
from mitmproxy import io as mitmio
from mitmproxy.addons import view
from mitmproxy.test import taddons, tflow, tutils

from wsencode.mitm import flowview, options
from wsencode.mitm.commands import STALLED_FILTER, answer_width
from wsencode.mitm.output import STALL_MARK
from wsencode.core.lifecycle import EndCause
from wsencode.bridge import Bridge
from wsencode.core.extconnect import accept_for
from wsencode.core.stallwatch import StallWatch
from wsencode.core.streamfacts import CLIENT, UPSTREAM, StreamFacts


class FakeBridge(Bridge):
    """The bridge as the addon sees it, without touching mitmproxy's classes."""

    def install(self, h2: bool) -> None:
        pass

    def uninstall(self) -> None:
        pass


def carried(f: http.HTTPFlow, facts: StreamFacts) -> StreamFacts:
    """`facts` as the bridge's stream notes them on a handshake it classified."""
    facts.handshake = facts.handshake or flowview_classify(f)
    setattr(f.request, "ws_encode_facts", facts)
    return facts


def flowview_classify(f):
    from wsencode.core.handshake import classify
    return classify(f.request, flowview.client_transport(f))


@pytest.fixture
def addon():
    addon = ws_encode.WsEncode()
    addon.bridge = addon.addons[1] = FakeBridge()
    return addon


@pytest.fixture
def clock(addon):
    clock = ManualClock()
    addon.clock = clock
    addon.handshakes.watch = StallWatch(clock.schedule, clock)
    # Progress ticks are kept apart, so fire_all runs stall timers only.
    addon.ticks = ManualClock()
    addon.waiting_line.schedule = addon.ticks.schedule
    return clock


def handshake_flow(**headers) -> flow.Flow:
    f = tflow.tflow(req=request(**headers), live=True)
    if f.request.http_version == "HTTP/2.0":
        f.client_conn.alpn = b"h2"
    return f


def arrive(addon, f) -> None:
    """The request hooks, in mitmproxy's order."""
    addon.requestheaders(f)
    addon.request(f)


def respond(f, status=101) -> None:
    f.response = tutils.tresp(status_code=status)
    if status == 101:
        f.response.headers["sec-websocket-accept"] = accept_for(f.request.headers["sec-websocket-key"])


def deliver(addon, f, status=101) -> None:
    """The status arrives: the response hook, then the update hook mitmproxy
    runs after every hook of a flow (the response goes out after it)."""
    respond(f, status)
    addon.response(f)
    addon.update([f])


def test_options_have_the_spec_defaults(addon):
    with taddons.context(addon) as tctx:
        opts = tctx.options
        assert opts.ws_encode_policy == "observe"
        assert opts.ws_encode_codings == "zstd, br, gzip"
        assert opts.ws_encode_stall == "2"
        assert opts.ws_encode_report == ""
        assert opts.ws_encode_filter == ""
        assert opts.ws_encode_h2 == "true"


@pytest.mark.parametrize(
    "option,bad,good",
    [
        ("ws_encode_stall", "-1", "1.5"),
        ("ws_encode_stall", "nan", "0.25"),
        ("ws_encode_filter", "~d", "~d example.test"),
        ("ws_encode_codings", "  ", "gzip"),
    ],
)
def test_bad_live_value_is_refused_and_the_previous_one_stays(addon, option, bad, good):
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **{option: good})
        probe = tflow.tflow()
        probe.request.host = "example.test"

        def state():
            return addon.handshakes.stall_after, addon.codings, addon.filter is None or addon.filter(probe)

        before = state()
        with pytest.raises(exceptions.OptionsError, match=option):
            tctx.configure(addon, **{option: bad})
        assert getattr(tctx.options, option) == good
        assert state() == before


def test_unwritable_report_path_is_refused(addon, tmp_path):
    with taddons.context(addon) as tctx:
        good = tmp_path / "r.jsonl"
        tctx.configure(addon, ws_encode_report=str(good))
        with pytest.raises(exceptions.OptionsError, match="ws_encode_report"):
            tctx.configure(addon, ws_encode_report=str(tmp_path / "missing" / "r.jsonl"))
        assert addon.output.report.path == good


def test_stall_marks_comments_logs_and_reports(addon, clock, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ws_encode_report=str(tmp_path / "r.jsonl"))
        f = handshake_flow(accept_encoding="gzip")
        f.comment = "user note"
        arrive(addon, f)
        assert clock.fire_all() == 1
        assert f.marked == STALL_MARK
        assert f.comment.startswith("user note\nStall: no status")
        [stall_log] = [r for r in caplog.records if "stall" in r.getMessage()]
        assert stall_log.levelno == logging.WARNING
        assert addon.commands.stalled_handshakes()[0] == f"[flow {f.id[:8]}] http://address:22/path"
        assert addon.commands.stalled_handshakes()[1].startswith("    Stall: no status")
        assert addon.commands.waiting_handshakes()[0] == f"[flow {f.id[:8]}] http://address:22/path"

        deliver(addon, f)
        assert addon.commands.waiting_handshakes() == ["no WebSocket handshake is waiting for its status"]
        records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
        assert [r["event"] for r in records] == ["stall", "handshake"]
        assert records[1]["outcome"] == "upgraded" and records[1]["stalled"] is True
        assert "late" in addon.commands.stalled_handshakes()[1]
        assert all(len(line) <= answer_width() for line in addon.commands.stalled_handshakes()[1:])
        assert any("accept-encoding:" in line for line in addon.commands.stalled_handshakes())  # never split


def test_a_mark_the_user_set_is_kept(addon, clock):
    with taddons.context(addon):
        f = handshake_flow()
        f.marked = ":star:"
        arrive(addon, f)
        clock.fire_all()
        assert f.marked == ":star:"
        assert "Stall" in f.comment


def test_status_in_time_cancels_the_timer(addon, clock):
    with taddons.context(addon):
        f = handshake_flow()
        arrive(addon, f)
        deliver(addon, f)
        assert clock.fire_all() == 0
        assert not f.marked
        assert f.metadata["ws_encode"]["outcome"] == "upgraded"


def test_error_ends_the_handshake_once(addon, clock, tmp_path):
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ws_encode_report=str(tmp_path / "r.jsonl"))
        f = handshake_flow()
        arrive(addon, f)
        f.error = flow.Error("Client disconnected.")
        addon.error(f)
        addon.client_disconnected(f.client_conn)
        records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
        assert len(records) == 1 and records[0]["outcome"] == "no-status"
        assert "client gave up" in records[0]["diagnosis"]
        assert clock.fire_all() == 0


def test_stalled_flow_survives_a_flow_file_round_trip(addon, clock):
    with taddons.context(addon):
        f = handshake_flow(accept_encoding="br")
        arrive(addon, f)
        clock.fire_all()
        buf = io.BytesIO()
        mitmio.FlowWriter(buf).add(f)
        buf.seek(0)
        [loaded] = list(mitmio.FlowReader(buf).stream())
        assert loaded.comment == f.comment and loaded.marked == f.marked
        assert loaded.metadata["ws_encode"]["event"] == "stall"


def test_non_handshakes_and_filtered_flows_are_untouched(addon, clock):
    with taddons.context(addon) as tctx:
        plain = tflow.tflow(live=True)
        plain.request.headers["accept-encoding"] = "gzip"
        tctx.configure(addon, ws_encode_policy="strip")
        arrive(addon, plain)
        assert plain.request.headers["accept-encoding"] == "gzip"

        tctx.configure(addon, ws_encode_filter="~d other.test")
        f = handshake_flow(accept_encoding="gzip")
        arrive(addon, f)
        assert f.request.headers["accept-encoding"] == "gzip"
        assert len(addon.handshakes) == 0 and clock.fire_all() == 0


def test_done_at_shutdown_ends_waiting_handshakes(addon, clock, tmp_path):
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ws_encode_report=str(tmp_path / "r.jsonl"))
        arrive(addon, handshake_flow())
        tctx.master.should_exit.set()
        addon.done()
        [record] = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
        assert record["outcome"] == "no-status" and "proxy stopped" in record["diagnosis"]


CLIENT_OPEN, CLIENT_HALF_CLOSED, CLIENT_CLOSED = "open", "half-closed", "closed"


@pytest.mark.parametrize(
    "message,client,ended_by,connected,ended_by_proxy,cause",
    [
        # The wording of an error never decides: mitmproxy's HTTP/2 codec says
        # "stream reset by client" for either peer's reset.
        ("stream reset by client (CANCEL)", CLIENT_OPEN, CLIENT, True, None, EndCause.CLIENT_GONE),
        ("stream reset by client (CANCEL)", CLIENT_OPEN, UPSTREAM, True, None, EndCause.UPSTREAM_CLOSED),
        ("peer closed connection", CLIENT_OPEN, UPSTREAM, True, None, EndCause.UPSTREAM_CLOSED),
        # Without the bridge's word: the client connection's state.
        ("peer closed connection", CLIENT_HALF_CLOSED, None, True, None, EndCause.CLIENT_GONE),
        ("peer closed connection", CLIENT_CLOSED, None, True, None, EndCause.CLIENT_GONE),
        ("peer closed connection", CLIENT_OPEN, None, True, None, EndCause.UPSTREAM_CLOSED),
        ("the client said so", CLIENT_OPEN, None, False, None, EndCause.UPSTREAM_UNREACHABLE),
        (flow.Error.KILLED_MESSAGE, CLIENT_OPEN, None, True, None, EndCause.KILLED),
        ("whatever mitmproxy says", CLIENT_HALF_CLOSED, CLIENT, True, "too much early data", EndCause.PROXY_RESET),
    ],
)
def test_end_cause(message, client, ended_by, connected, ended_by_proxy, cause):
    f = handshake_flow()
    f.error = flow.Error(message)
    f.client_conn.state = connection.ConnectionState.CAN_WRITE if client == CLIENT_HALF_CLOSED else (
        connection.ConnectionState.CLOSED if client == CLIENT_CLOSED else connection.ConnectionState.OPEN)
    f.client_conn.timestamp_end = 5.0 if client == CLIENT_CLOSED else None
    f.server_conn.timestamp_tcp_setup = 1.0 if connected else None
    assert flowview.end_cause(f, StreamFacts(ended_by=ended_by, ended_by_proxy=ended_by_proxy)) is cause


@given(st.lists(st.tuples(st.sampled_from([b"Content-Encoding", b"content-encoding", b"CONTENT-ENCODING", b"x"]),
                          st.binary(max_size=6)), max_size=5))
def test_value_of_is_what_mitmproxys_headers_get_answers(fields):
    headers = http.Headers(fields)
    assert flowview.value_of(headers, "content-encoding") == headers.get("content-encoding")


@pytest.mark.parametrize("value", ["0", "-2", "inf", "nan", "", "2s"])
def test_parse_stall_seconds_refuses(value):
    with pytest.raises(ValueError):
        options.parse_stall_seconds(value)


def test_parse_stall_seconds():
    assert options.parse_stall_seconds("1.5") == 1.5


def test_the_stall_clock_starts_when_the_proxy_receives_the_handshake(addon, clock):
    """Wherever the handshake is stuck, the client has waited since it arrived;
    waited_s still counts from when it really went upstream."""
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ws_encode_stall="2")
        f = handshake_flow()
        facts = carried(f, StreamFacts(stage="forwarded", forwarded_at=1001.5))
        arrive(addon, f)  # at 1000
        clock.fire_all()
        record = f.metadata["ws_encode"]
        assert record["event"] == "stall" and clock.now == 1002
        assert record["stuck_in"] == "forwarded"
        assert record["received_s"] == 2.0 and record["waited_s"] == 0.5
        facts.client_bytes_before_status = 7
        deliver(addon, f)
        assert f.metadata["ws_encode"]["client_bytes_before_status"] == 7
        assert f.metadata["ws_encode"]["stuck_in"] == "done"


def test_the_bridge_notes_a_handshakes_times_on_the_addons_clock(addon, clock):
    """The addon gives the bridge's facts its clock when it starts to follow
    a handshake: what the bridge notes later (the forwarding) is on it."""
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ws_encode_stall="2")
        f = handshake_flow()
        facts = carried(f, StreamFacts(stage="connecting"))
        arrive(addon, f)  # at 1000
        clock.now = 1001.25
        facts.forwarded()  # as the bridge's stream does once it has the upstream connection
        assert facts.forwarded_at == 1001.25
        clock.fire_all()
        assert f.metadata["ws_encode"]["waited_s"] == 0.75


@pytest.mark.parametrize("stage", ["settings", "queued"])
def test_a_handshake_held_in_the_proxy_stalls_there_without_blaming_the_upstream(addon, clock, stage):
    with taddons.context(addon):
        f = handshake_flow(accept_encoding="gzip")
        carried(f, StreamFacts(stage=stage))  # followed, not sent
        arrive(addon, f)
        assert clock.fire_all() == 1
        record = f.metadata["ws_encode"]
        assert record["stuck_in"] == stage and record["waited_s"] is None
        assert "neither the upstream nor an encoder" in record["diagnosis"]
        assert " ".join(" ".join(addon.commands.waiting_handshakes()[1:]).split()).endswith(
            f"({stage}): received 2.0 s ago, not forwarded"
        )


def test_an_intercepted_handshake_is_held_by_the_user(addon, clock):
    with taddons.context(addon):
        f = handshake_flow()
        arrive(addon, f)
        f.intercept()
        clock.fire_all()
        assert f.metadata["ws_encode"]["stuck_in"] == "intercepted"
        f.resume()
        respond(f)
        f.intercept()  # the response is intercepted in its turn
        addon.response(f)
        assert f.metadata["ws_encode"]["event"] == "stall"  # no outcome while the client waits
        f.resume()
        addon.update([f])
        assert f.metadata["ws_encode"]["event"] == "handshake"
        assert f.metadata["ws_encode"]["outcome"] == "upgraded"
        assert not addon.handshakes  # update is a no-op again


def test_a_response_an_addon_after_this_one_intercepts_is_held_too(addon, clock):
    """mitmproxy's console and mitmweb intercept after every script: the
    status reaches the client only when the user resumes the flow."""
    with taddons.context(addon):
        f = handshake_flow()
        arrive(addon, f)
        respond(f)
        addon.response(f)
        f.intercept()  # the console's intercept addon, after this one
        addon.update([f])  # as mitmproxy runs it right after the response hooks
        assert "ws_encode" not in f.metadata  # no outcome while the client waits
        clock.fire_all()
        assert f.metadata["ws_encode"]["stuck_in"] == "intercepted"
        f.resume()
        addon.update([f])
        assert f.metadata["ws_encode"]["outcome"] == "upgraded" and f.metadata["ws_encode"]["stalled"]


def test_a_script_reload_hands_waiting_handshakes_to_the_next_copy(addon, clock, tmp_path):
    """Each handshake waiting across a reload is followed by the next copy:
    listed as waiting, its stall reported when due (counted from its
    receipt), and its one record written; one already reported stalled is
    not reported again."""
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ws_encode_report=str(tmp_path / "r.jsonl"), ws_encode_stall="2")
        f, stalled = handshake_flow(accept_encoding="gzip"), handshake_flow()
        arrive(addon, stalled)
        clock.now = 1000.5
        arrive(addon, f)
        clock.advance(1002.0)  # `stalled` stalls
        tctx.master.addons.remove(addon)  # a reload: mitmproxy is not exiting
        assert [json.loads(x)["event"] for x in (tmp_path / "r.jsonl").read_text().splitlines()] == ["stall"]
        successor = ws_encode.WsEncode()
        successor.bridge = successor.addons[1] = FakeBridge()
        successor.clock = clock
        successor.handshakes.watch = StallWatch(clock.schedule, clock)
        tctx.master.addons.add(successor)
        tctx.configure(successor, ws_encode_report=str(tmp_path / "r.jsonl"))
        assert len(successor.handshakes) == 2
        assert any(line.startswith(f"[flow {f.id[:8]}]") for line in successor.commands.waiting_handshakes())
        clock.fire_all()  # f's stall, due 2 s after it arrived
        assert clock.now == 1002.5 and f.metadata["ws_encode"]["event"] == "stall"
        deliver(successor, f)
        deliver(successor, stalled)
        records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
        assert [(r["flow_id"], r["event"]) for r in records] == [
            (stalled.id, "stall"), (f.id, "stall"), (f.id, "handshake"), (stalled.id, "handshake")]
        assert records[2]["stalled"] and records[3]["stalled"]
        assert "encoding layer" in records[2]["diagnosis"]


def test_the_transport_is_the_connection_s_not_the_request_line_s(addon, clock, tmp_path):
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ws_encode_report=str(tmp_path / "r.jsonl"))
        spoofed = tflow.tflow(req=request(version="HTTP/2.0"), live=True)  # on an HTTP/1.1 connection
        arrive(addon, spoofed)
        deliver(addon, spoofed)
        record = spoofed.metadata["ws_encode"]
        assert record["transport"] == "h1" and record["status"] == 101 and record["outcome"] == "upgraded"


def test_websocket_filters_match_handshakes(addon, clock):
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ws_encode_filter="~websocket")
        f = handshake_flow()
        arrive(addon, f)
        assert f.websocket is None and len(addon.handshakes) == 1
        tctx.configure(addon, ws_encode_filter="!~websocket")
        g = handshake_flow()
        arrive(addon, g)
        assert len(addon.handshakes) == 1


def test_a_handshake_that_errors_before_its_request_hook_gets_its_record(addon, clock, tmp_path):
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ws_encode_report=str(tmp_path / "r.jsonl"))
        f = handshake_flow()
        addon.requestheaders(f)
        f.error = flow.Error("Client disconnected.")
        f.client_conn.timestamp_end = 5.0
        addon.error(f)
        addon.request(f)
        [record] = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
        assert record["outcome"] == "no-status" and "client gave up" in record["diagnosis"]


def test_control_characters_in_codings_are_refused(addon):
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ws_encode_codings="zstd, br, gzip")  # at start-up an error is only logged
        for bad in ["gzip\r", "gzip\rX-Injected: 1", "gzip\n", "gzip\x00"]:
            with pytest.raises(exceptions.OptionsError, match="ws_encode_codings"):
                tctx.configure(addon, ws_encode_codings=bad)
        assert addon.codings == "zstd, br, gzip"


def test_commands_are_registered_for_console_and_web(addon, clock):
    with taddons.context(addon, view.View()) as tctx:
        commands = tctx.master.commands
        assert commands.execute("wsencode.stalls") == ["no WebSocket handshake has stalled"]
        f = handshake_flow()
        arrive(addon, f)
        assert commands.execute("wsencode.waiting")[0].startswith(f"[flow {f.id[:8]}] ")
        clock.fire_all()
        headline, *sentence = commands.execute("wsencode.stalls")
        assert headline.startswith(f"[flow {f.id[:8]}] ") and sentence[0].startswith("    Stall")
        assert commands.execute("wsencode.summary")[0] == "no WebSocket handshake finished yet"
        assert commands.execute("wsencode.show")[1] == f"    view_filter = {STALLED_FILTER}"
        assert tctx.options.view_filter == STALLED_FILTER


def test_a_handshake_the_bridge_does_not_follow_counts_as_forwarded_at_the_request_hook(addon, clock):
    with taddons.context(addon):
        f = handshake_flow()
        arrive(addon, f)
        clock.fire_all()
        assert f.metadata["ws_encode"]["event"] == "stall"
        assert f.metadata["ws_encode"]["stuck_in"] == "forwarded"


def test_summary_and_progress_lines(addon, clock, caplog, tmp_path):
    caplog.set_level(logging.INFO)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ws_encode_report=str(tmp_path / "r.jsonl"))
        assert addon.commands.summary()[0] == "no WebSocket handshake seen yet"
        quick, slow, refused = handshake_flow(), handshake_flow(), handshake_flow(version="HTTP/2.0")
        for f in (quick, slow, refused):
            arrive(addon, f)
        deliver(addon, quick)
        deliver(addon, refused, status=403)
        def tick():
            entry = next(e for e in addon.ticks.pending if not e[2])
            entry[2] = True
            entry[1]()

        tick()  # 0 s in: nothing has waited past the threshold, so nothing is said
        assert not [r for r in caplog.records if "waiting for a status" in r.getMessage()]
        clock.fire_all()  # slow stalls at 1002
        clock.now = 1005.0
        tick()
        [line] = [r.getMessage() for r in caplog.records if "waiting for a status" in r.getMessage()]
        assert line == "1 WebSocket handshake waiting for a status, longest 5.0 s"
        clock.now = 1006.0
        deliver(addon, slow)
        lines = addon.commands.summary()
        assert lines[0] == "3 WebSocket handshakes finished: 1 rejected, 2 upgraded (2 over h1, 1 over h2)"
        assert lines[1] == "1 stall reported"
        assert lines[2] == "slowest status: 6.00 s, http://address:22/path"
        assert lines[3] == f"report: {tmp_path / 'r.jsonl'}"
        tick()  # nothing waits any more: the ticker stops
        assert [e for e in addon.ticks.pending if not e[2]] == []
        tctx.master.should_exit.set()
        addon.done()
        assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("ws_encode summary")][-1] == (
            f"ws_encode summary: report: {tmp_path / 'r.jsonl'}"
        )


def test_wsencode_bundle_writes_a_redacted_bundle_of_the_chosen_flows(addon, clock, tmp_path):
    flows = view.View()
    with taddons.context(addon, flows) as tctx:
        tctx.configure(addon, ws_encode_report=str(tmp_path / "r.jsonl"))
        f = handshake_flow(authorization="Bearer BUNDLE-SECRET")
        f.request.path = "/chat;jsessionid=PATH-SECRET?token=QUERY-SECRET"
        arrive(addon, f)
        clock.fire_all()
        deliver(addon, f)
        flows.add([f])
        answer = tctx.master.commands.execute(f"wsencode.bundle @all {tmp_path / 'bundle'}")
        assert answer.startswith("bug-report bundle of 1 flow written to")
        files = sorted(p.name for p in (tmp_path / "bundle").iterdir())
        assert files == ["flows.mitm", "report.jsonl", "summary.md"]
        everything = b"".join(p.read_bytes() for p in (tmp_path / "bundle").iterdir())
        assert b"SECRET" not in everything
        events = [json.loads(x)["event"] for x in (tmp_path / "bundle" / "report.jsonl").read_text().splitlines()]
        assert events == ["stall", "handshake"]  # from the report, not only the flow's latest record
        again = tctx.master.commands.execute(f"wsencode.bundle @all {tmp_path / 'bundle'}")
        assert again.startswith("ws_encode_bundle: not written") and "empty" in again


def test_a_bundle_at_exit_needs_an_empty_folder(addon, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with taddons.context(addon) as tctx:
        tctx.configure(addon, ws_encode_bundle=str(tmp_path / "empty"))
        with pytest.raises(exceptions.OptionsError, match="ws_encode_bundle"):
            tctx.configure(addon, ws_encode_bundle=str(tmp_path / "full"))
