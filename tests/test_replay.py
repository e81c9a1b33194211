"""How `scripts/replay` makes a bundle's handshakes again, and what it refuses; an HTTP/3 handshake
replayed against a server without HTTP/3. Replaying a probe's bundle against the lab (HTTP/3 end to
end included) is in test_probe.py, which records the bundle (one probe saved)."""

from __future__ import annotations

import json
import os
import re

import pytest
from mitmproxy.test import tflow
from conftest import LabAlone, handshake_flow, record, replay

from bugreport.replay import recorded, speaker_of, without_redacted
from bugreport.target import Target
from wsencode.bundle import write_bundle


def test_handshakes_are_made_again_the_same_way_without_what_was_redacted(tmp_path):
    h2 = handshake_flow("/echo/x;jsessionid=secret;v=2?token=secret&room=7#frag", h2=True)
    h1 = handshake_flow("/echo/y")
    h1.metadata["ws_encode_probe"] = {"speaker": "server", "message": "hi"}
    folder = write_bundle(tmp_path / "b", [h2, h1], [
        record(h2, "handshake"),
        record(h1, "handshake", transport="h1", accept_encoding_client=None, outcome="upgraded", stalled=False),
    ])
    made = recorded(folder, Target.parse("wss://127.0.0.1:1"))
    assert [(h.shake.transport, h.shake.offer, h.shake.speaker, h.shake.message, h.stalled) for h in made] == [
        ("h2", "gzip, deflate, br, zstd", "client", "hello", True), ("h1", None, "server", "hi", False)]
    # Every query and path-parameter value was redacted: the items go, the path stays.
    assert [h.shake.path for h in made] == ["/echo/x", "/echo/y"]
    for h in made:
        assert h.shake.authority == "127.0.0.1:1"
        names = {k.lower() for k, _ in h.shake.headers}
        assert "x-kept" in names and "origin" in names
        assert not names & {"cookie", "authorization", "proxy-authorization", "referer"}  # redacted: left behind
        assert all("REDACTED" not in v for _, v in h.shake.headers)
    own = recorded(folder, Target.parse("wss://127.0.0.1:1/elsewhere?room=1"))
    assert {h.shake.path for h in own} == {"/elsewhere?room=1"}


def h3_bundle(folder):
    """A bundle of one HTTP/3 handshake that stalled: offered accept-encoding, its client speaking first."""
    f = handshake_flow("/echo/h3", h2=True)
    f.request.http_version = "HTTP/3"
    return write_bundle(folder, [f], [record(f, "stall", transport="h3", upstream_transport="h3"),
                                      record(f, "handshake", transport="h3", upstream_transport="h3")])


def test_an_http3_handshake_is_made_again_over_http3(tmp_path):
    [made] = recorded(h3_bundle(tmp_path / "b"), Target.parse("wss://127.0.0.1:1"))
    assert (made.shake.transport, made.shake.offer, made.shake.speaker, made.stalled) == (
        "h3", "gzip, deflate, br, zstd", "client", True)
    assert made.shake.label.startswith("HTTP/3   with accept-encoding")


@pytest.mark.timeout(120)
def test_an_http3_stall_replayed_against_a_server_without_http3_goes_on_over_tcp_and_recurs(tmp_path):
    """The client speaks HTTP/3 to the proxy as recorded; the proxy carries it over TCP
    (ws_encode_h3_upstream=tcp) to a server whose HTTP/2 holds the status just the same."""
    folder = h3_bundle(tmp_path / "b")
    with LabAlone(tmp_path, "--quiet", "--no-h3", "--port", "0", "--behaviour", "hold-until-body") as lab:
        port = re.search(r"listening on https://127\.0\.0\.1:(\d+)", lab.printed).group(1)
        done = replay(str(folder), "--target", f"wss://127.0.0.1:{port}", "--insecure", "--loopback-only",
                      "--timeout", "1.5")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "; no HTTP/3 offered (no Alt-Svc: h3 on its responses)\n" in done.stdout
    assert "  (HTTP/3 handshakes reach it through the proxy over TCP, as HTTP/2 or HTTP/1.1: no HTTP/3 offered" \
           in done.stdout, out
    head, was, observe, strip = done.stdout.split("\n\n")[1].splitlines()
    assert head.startswith("1. HTTP/3   with accept-encoding  client-first  /echo/h3  [recorded flow"), out
    assert "no-status ⌛" in was and "no-status ⌛" in observe and observe.endswith("the recorded stall recurs"), out
    assert "upgraded" in strip and "⌛" not in strip, out
    assert done.stdout.splitlines()[-1] == f"replay: 1 of 1 recorded stall recurs against wss://127.0.0.1:{port}/"


def test_http3_handshakes_are_not_replayed_against_ws(tmp_path):
    done = replay(str(h3_bundle(tmp_path / "b")), "--target", "ws://127.0.0.1:9")
    assert done.returncode == 2
    assert done.stdout.splitlines()[-1] == (
        "replay: cannot replay HTTP/3 handshakes against ws://127.0.0.1:9/: HTTP/3 needs TLS (wss://)")


def test_a_folder_without_a_bundle_is_refused(tmp_path):
    done = replay(str(tmp_path), "--target", "wss://127.0.0.1:9")
    assert done.returncode == 2
    assert done.stdout.startswith(f"replay: cannot read the bundle: {tmp_path} holds no WebSocket handshake")


@pytest.mark.parametrize("path, kept", [
    ("/echo/x;jsessionid=REDACTED?token=REDACTED&room=1#REDACTED", "/echo/x?room=1"),
    ("/a;v=1;sid=REDACTED/b?REDACTED", "/a;v=1/b"),
    ("/plain", "/plain"),
])
def test_redacted_items_are_left_out_of_the_path(path, kept):
    assert without_redacted(path) == kept


def test_who_spoke_first_comes_from_the_messages_when_the_probe_did_not_note_it():
    f = tflow.twebsocketflow()
    assert f.websocket.messages[0].from_client and speaker_of(f) == "client"
    f.websocket.messages = [m for m in f.websocket.messages if not m.from_client]
    assert f.websocket.messages and speaker_of(f) == "server"
    f.metadata["ws_encode_probe"] = {"speaker": "client"}
    assert speaker_of(f) == "client"
    assert speaker_of(tflow.tflow()) == "client"  # no messages: a browser waits for the status, then speaks


# -- a damaged bundle: exit 2 and one line naming the file and what is wrong -------------------------


@pytest.fixture
def good(tmp_path):
    f = handshake_flow("/echo/x", h2=True)
    return write_bundle(tmp_path / "b", [f], [record(f, "stall"), record(f, "handshake")])


def rewrite_report(folder, change) -> None:
    path = folder / "report.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(line + "\n" for line in change(records)))


def dropped(name):
    return lambda records: [json.dumps({k: v for k, v in r.items() if k != name}) for r in records]


def as_string(name):
    return lambda records: [json.dumps({**r, name: str(r[name])}) for r in records]


DAMAGES = {
    "flows cut short": ("flows.mitm", lambda folder: (folder / "flows.mitm").write_bytes(
        (folder / "flows.mitm").read_bytes()[:-40]), "not a flow file mitmproxy can read, or cut short"),
    "flows not a flow": ("flows.mitm", lambda folder: (folder / "flows.mitm").write_bytes(b"5:hello,"),
                         "not a flow file mitmproxy can read, or cut short"),
    "a line that is a list": ("report.jsonl", lambda folder: rewrite_report(folder, lambda rs: ["[1, 2]"]),
                              "line 1: an array, not a record (an object)"),
    "a line that is not JSON": ("report.jsonl", lambda folder: rewrite_report(
        folder, lambda rs: [json.dumps(rs[0]), '{"event": "handshake",']), "line 2 is not JSON"),
    "no stuck_in": ("report.jsonl", lambda folder: rewrite_report(folder, dropped("stuck_in")),
                    "line 1: a stall record without `stuck_in`"),
    "no event": ("report.jsonl", lambda folder: rewrite_report(folder, dropped("event")),
                 "line 1: `event` is null, not one of stall, handshake"),
    "a string received_s": ("report.jsonl", lambda folder: rewrite_report(folder, as_string("received_s")),
                            "line 1: `received_s` is a string, not a number"),
    "a string status": ("report.jsonl", lambda folder: rewrite_report(
        folder, lambda rs: [json.dumps({**r, "status": "101"}) for r in rs]),
        "line 1: `status` is a string, not a number or null"),
    "stalled not a bool": ("report.jsonl", lambda folder: rewrite_report(
        folder, lambda rs: [json.dumps({**r, "stalled": "yes"}) for r in rs]),
        "line 2: `stalled` is a string, not a boolean"),
    "not UTF-8": ("report.jsonl", lambda folder: (folder / "report.jsonl").write_bytes(b"\xff\xfe{}\n"),
                  "not UTF-8 text"),
    "report a FIFO": ("report.jsonl", lambda folder: ((folder / "report.jsonl").unlink(),
                                                      os.mkfifo(folder / "report.jsonl")),
                      "cannot be read: not a regular file but a FIFO"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_bundle_exits_2_with_one_line_naming_the_file_and_what_is_wrong(good, damage):
    name, do, says = DAMAGES[damage]
    do(good)
    done = replay(str(good), "--target", "wss://127.0.0.1:9")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == f"replay: cannot read the bundle: {good / name}: {says}\n", done.stdout + done.stderr
    assert done.stderr == ""


def test_a_record_kept_on_a_flow_is_checked_too(tmp_path):
    from mitmproxy import io

    f = handshake_flow("/echo/x")
    folder = write_bundle(tmp_path / "b", [f])  # no records: the flows' own are read
    f.metadata["ws_encode"] = {**record(f, "handshake"), "received_s": "6.0"}
    with open(folder / "flows.mitm", "wb") as out:
        io.FlowWriter(out).add(f)
    done = replay(str(folder), "--target", "wss://127.0.0.1:9")
    assert done.returncode == 2 and done.stdout == (
        f"replay: cannot read the bundle: {folder / 'flows.mitm'}: the record kept on flow {f.id[:8]}: "
        "`received_s` is a string, not a number\n"), done.stdout + done.stderr


def test_a_folder_that_does_not_exist_is_said_to_not_exist(tmp_path):
    done = replay(str(tmp_path / "nothing-here"), "--target", "wss://127.0.0.1:9")
    assert done.returncode == 2
    assert done.stdout == f"replay: cannot read the bundle: {tmp_path / 'nothing-here'} does not exist\n"


def test_an_event_stream_is_made_again_as_an_event_stream_request(tmp_path):
    from test_bundle import event_stream_flow

    f = event_stream_flow("/events?token=secret-70ken&room=7")
    f.request.headers["x-kept"] = "kept-value"
    folder = write_bundle(tmp_path / "b", [f], [
        record(f, "stall", kind="event-stream"),
        record(f, "handshake", kind="event-stream", transport="h3", upstream_transport="h3"),
    ])
    [made] = recorded(folder, Target.parse("https://127.0.0.1:1"))
    shake = made.shake
    assert (shake.kind, shake.transport, shake.offer, shake.speaker, shake.path, made.stalled) == (
        "event-stream", "h3", "gzip, deflate, br, zstd", None, "/events", True)  # (every query value redacted)
    assert shake.label == "HTTP/3   with accept-encoding "
    # The user's headers go again but the redacted ones; EventSource's own and the offer the client sets itself.
    assert shake.fields() == [("x-kept", "kept-value")]
