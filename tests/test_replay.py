"""`scripts/replay` from the outside: a bundle recorded against `hold-until-body` stalls again against
that behaviour and not against `fixed`; and how a bundle's handshakes are made again."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from mitmproxy.test import tflow
from test_probe import ENV, TIMEOUT, lab, lab_probe  # noqa: F401  (lab is a fixture)

from bugreport.replay import recorded, speaker_of, without_redacted
from bugreport.target import Target
from wslab.encoders import Behaviour


def replay(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bugreport.replay", *args], capture_output=True, text=True,
                          timeout=90, env=ENV)


@pytest.fixture(scope="module")
def bundle(lab, tmp_path_factory):  # noqa: F811
    """A probe of hold-until-body, bundled: its HTTP/2 handshakes with the offer stalled."""
    folder = tmp_path_factory.mktemp("replay") / "bundle"
    port = lab[Behaviour.HOLD_UNTIL_BODY.value]
    done = lab_probe(f"wss://127.0.0.1:{port}/echo/replay?token=secret-70ken", "--header", "Cookie: sid=secret-c00k1e",
                     "--header", "X-Trace: kept", "--bundle", str(folder))
    assert done.returncode == 1, done.stdout + done.stderr
    return folder


@pytest.fixture(scope="module")
def replays(lab, bundle):  # noqa: F811
    """The bundle replayed against hold-until-body and against fixed, at once."""
    with ThreadPoolExecutor(2) as pool:
        runs = {b: pool.submit(replay, str(bundle), "--target", f"wss://127.0.0.1:{lab[b]}", "--insecure",
                               "--loopback-only", "--timeout", str(TIMEOUT))
                for b in (Behaviour.HOLD_UNTIL_BODY.value, Behaviour.FIXED.value)}
        return {b: run.result() for b, run in runs.items()}


# behaviour replayed against -> (exit status, the last line, what observe says of a recorded stall)
ENDINGS = {
    Behaviour.HOLD_UNTIL_BODY.value: (1, "replay: 2 of 2 recorded stalls recur against wss://127.0.0.1:{port}/",
                                      "the recorded stall recurs"),
    Behaviour.FIXED.value: (0, "replay: no recorded stall recurs against wss://127.0.0.1:{port}/ (2 were recorded)",
                            "the recorded stall is gone"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("behaviour", list(ENDINGS))
def test_a_recorded_stall_recurs_against_its_behaviour_and_not_against_fixed(replays, lab, behaviour):  # noqa: F811
    done = replays[behaviour]
    out = done.stdout + done.stderr
    code, last, note = ENDINGS[behaviour]
    assert done.returncode == code, out
    assert done.stdout.splitlines()[-1] == last.format(port=lab[behaviour]), out
    blocks = done.stdout.split("\n\n")[1:-1]
    assert len(blocks) == 8, out
    for block in blocks:
        head, was, observe, strip = block.splitlines()
        assert was.split()[0] == "recorded" and observe.split()[0] == "observe" and strip.split()[0] == "strip"
        assert "upgraded" in strip and "⌛" not in strip, block  # the workaround works, always
        if "HTTP/2" in head and "with accept-encoding" in head:
            assert "no-status ⌛" in was and observe.endswith(note), block
        else:
            assert "upgraded" in observe and "⌛" not in block, block
    assert "secret-" not in out


def test_handshakes_are_made_again_the_same_way_without_what_was_redacted(bundle):
    target = Target.parse("wss://127.0.0.1:1")
    shakes = [h.shake for h in recorded(bundle, target)]
    assert sorted((s.transport, s.offer is not None, s.speaker) for s in shakes) == sorted(
        (t, o, s) for t in ("h1", "h2") for o in (True, False) for s in ("client", "server"))
    for shake in shakes:
        assert shake.path == "/echo/replay" and shake.authority == "127.0.0.1:1"
        names = [k.lower() for k, _ in shake.headers]
        assert "x-trace" in names and "cookie" not in names
        assert all(v != "REDACTED" for _, v in shake.headers)
    own = recorded(bundle, Target.parse("wss://127.0.0.1:1/elsewhere?room=1"))
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
