"""How `scripts/replay` makes a bundle's handshakes again, and what it refuses. Replaying a probe's
bundle against the lab is in test_probe.py, which records the bundle (one probe saved)."""

from __future__ import annotations

import pytest
from mitmproxy.test import tflow
from conftest import handshake_flow, record, replay

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
    assert f.websocket.messages[0].from_client and speaker_of(f, {}) == "client"
    f.websocket.messages = [m for m in f.websocket.messages if not m.from_client]
    assert f.websocket.messages and speaker_of(f, {}) == "server"
    f.metadata["ws_encode_probe"] = {"speaker": "client"}
    assert speaker_of(f, {}) == "client"
    assert speaker_of(tflow.tflow(), {}) == "client"  # no messages: a browser waits for the status, then speaks
