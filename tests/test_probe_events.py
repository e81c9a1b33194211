"""`scripts/probe` of an event stream, from the outside: the lab's /events behind each encoder
behaviour is the server under study, over HTTP/1.1, HTTP/2 and HTTP/3 (offered in Alt-Svc), with
and without accept-encoding; a URL whose answer is no event stream; a bundle of event streams that
keeps no secret; and `scripts/replay` of it, whose recorded stall (a head withheld) recurs against
its behaviour and not against fixed. Then the verdict's rules and the failure texts without a
server, and a plain http:// event stream, over HTTP/1.1 alone.

The lab writes an event every EVERY s from AFTER s on, N of them (/events?QUERY), each about 50
bytes; its hold-until-min-size lets go at MIN_SIZE bytes. What each verdict says follows from those
numbers, not from how fast the machine is: a head held until the first event comes a second late."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import SCRIPTS_ENV, flows_read_by_each_line, replay
from test_probe import T, handshake_head, probe, start_lab, stop

from wslab.app import tick
from wslab.encoders import Behaviour

TIMEOUT = 4.0  # the probe's --timeout: its proxy reports a stall after 2 s (room for a proxy a loaded machine starves)
AFTER, EVERY, N = 1, 0.3, 5
QUERY = f"after={AFTER}&every={EVERY}&n={N}"
MIN_SIZE = 150  # three of the lab's events
# For hold-until-min-size: its third event, which lets the first go, 1.2 s after the first; a loaded
# lab writes its events late, but not that much closer together.
MIN_SIZE_EVERY = 0.6
MIN_SIZE_QUERY = f"after=0.5&every={MIN_SIZE_EVERY}&n={N}"
ENDLESS = "after=0.2&every=3"  # a small event every 3 s, without end: MIN_SIZE comes after the attempt gives up
TRANSPORTS = ("HTTP/2", "HTTP/3", r"HTTP/1\.1")
SECRETS = ("cookie-sse-c00k1e", "auth-sse-a07h", "token-sse-70ken", "jsession-sse-j5e55", "pw-sse-u5er")
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def lab():
    """The behaviours that hold an event stream, and fixed, each on its own port: {behaviour: TCP port}."""
    behaviours = (Behaviour.HOLD_UNTIL_BODY, Behaviour.BUFFER_EVENTS, Behaviour.HOLD_UNTIL_MIN_SIZE, Behaviour.FIXED)
    proc, ports = start_lab("--min-size", str(MIN_SIZE), *(a for b in behaviours for a in ("--behaviour", b.value)))
    yield {b: tcp for b, (tcp, _udp) in ports.items()}
    stop(proc)


def lab_probe(url: str, *args: str):
    return probe(url, "--insecure", "--loopback-only", "--timeout", f"{TIMEOUT:g}", *args)


def every_transport(phrase: str) -> str:
    """A verdict that says `phrase` (a regular expression) of each transport, in the probe's order."""
    return "; ".join(f"over {name} the offer {phrase}" for name in TRANSPORTS)


HELD = r"^verdict: this server holds its event stream while accept-encoding is offered: "
FIRST_THREE = sum(len(tick(i, N, MIN_SIZE_EVERY)) for i in range(1, 4))  # what hold-until-min-size lets go
# name -> (behaviour, path and query, extra arguments, exit status, the whole verdict)
RUNS = {
    "hold-until-body": (Behaviour.HOLD_UNTIL_BODY, f"/events?{QUERY}", (), 1, HELD + every_transport(
        rf"delays the head by {T} \(it came with the first event after {T} with the offer, {T} without\)") + "$"),
    "buffer-events": (Behaviour.BUFFER_EVENTS, f"/events?{QUERY}", (), 1, HELD + every_transport(
        rf"delays the head by {T} \(it came after {T} with the offer, {T} without\) and holds the first event "
        rf"until the stream ends \({N} events at once after {T} with the offer, the first after {T} without\)") + "$"),
    "min-size": (Behaviour.HOLD_UNTIL_MIN_SIZE, f"/events?{MIN_SIZE_QUERY}", (), 1, HELD + every_transport(
        rf"delays the head by {T} \(it came with the first event after {T} with the offer, {T} without\) and holds "
        rf"the first event until {FIRST_THREE} bytes \(3 events at once after {T} with the offer, the first after "
        rf"{T} without\)") + "$"),
    "fixed": (Behaviour.FIXED, f"/events?{QUERY}", (), 0,
              rf"^verdict: no difference: the head in {T} and the first event after {T} with and without "
              r"accept-encoding over HTTP/2, HTTP/3 and HTTP/1\.1; with the offer it came with content-encoding: "
              r"zstd, its events as promptly$"),
    "not an event stream": (Behaviour.FIXED, "/", (), 2,
                            r"^verdict: not an event stream: without accept-encoding the answer was 200 with "
                            r"content-type: text/html; charset=utf-8 \(--event-stream probes it as one all the "
                            r"same\)$"),
}
ENDLESS_VERDICT = HELD + every_transport(rf"withholds the head \(none in 4\.0 s with the offer, {T} without\)") + "$"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tmp_path_factory.mktemp("sse-probe") / "bundle"


@pytest.fixture(scope="module")
def runs(lab, bundle):
    """Every probe, three at a time: {name: CompletedProcess}. The endless one, whose head the offer
    withholds, carries every kind of secret and writes a bundle; --event-stream probes a wss:// URL's twin."""
    cookie, auth, token, jsession, password = SECRETS
    port = lab[Behaviour.HOLD_UNTIL_MIN_SIZE.value]
    endless = (f"https://alice:{password}@127.0.0.1:{port}/events/probe;jsessionid={jsession}?{ENDLESS}&token={token}",
               "--header", f"Cookie: sid={cookie}", "--header", f"Authorization: Bearer {auth}",
               "--bundle", str(bundle))
    with ThreadPoolExecutor(3) as pool:
        done = {name: pool.submit(lab_probe, f"https://127.0.0.1:{lab[b.value]}{path}", *extra)
                for name, (b, path, extra, _code, _verdict) in RUNS.items()}
        done["endless"] = pool.submit(lab_probe, *endless)
        done["asked"] = pool.submit(lab_probe, f"wss://127.0.0.1:{lab[Behaviour.FIXED.value]}/events?{QUERY}",
                                    "--event-stream")
        return {name: run.result() for name, run in done.items()}


def attempt_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(r"  HTTP/(2|3|1\.1) ", line)]


def printed_records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("  {")]


@pytest.mark.parametrize("name", list(RUNS))
def test_each_behaviour_gets_its_verdict_and_exit_status(runs, name):
    done = runs[name]
    out = done.stdout + done.stderr
    _behaviour, _path, _extra, code, verdict = RUNS[name]
    assert done.returncode == code, out
    assert re.search(verdict, done.stdout.splitlines()[-1]), out
    assert re.search(r"^ws-encode probe of the event stream https://127\.0\.0\.1:\d+/", done.stdout), out
    assert re.search(r"HTTP/2; HTTP/3 \(Alt-Svc: h3, UDP port \d+\)\n  trying HTTP/2, HTTP/3 and HTTP/1\.1, each with "
                     r"and without accept-encoding\n", done.stdout), out
    # One attempt per transport and offer, each with its time to head and to first event.
    lines = attempt_lines(done.stdout)
    assert len(lines) == 6, out
    for transport in ("HTTP/2  ", "HTTP/3  ", "HTTP/1.1"):
        for offer in ("with accept-encoding", "no accept-encoding"):
            assert sum(line.startswith(f"  {transport} {offer}") for line in lines) == 1, out
    if code != 2:
        assert all(re.search(rf"200 in {T}, .*first event after {T}", line) for line in lines), out
        # The addon's records: an event stream's, one opened per attempt, its first event timed.
        ends = [r for r in printed_records(done.stdout) if r["event"] == "handshake"]
        assert sorted(r["transport"] for r in ends) == ["h1", "h1", "h2", "h2", "h3", "h3"], out
        assert all(r["kind"] == "event-stream" and r["outcome"] == "opened" and r["first_event_s"] is not None
                   and r["upstream_transport"] == r["transport"] for r in ends), out
        offered = [r for r in ends if r["accept_encoding_client"]]
        assert {r["content_encoding"] for r in offered} == {"zstd"}, out


def test_the_offers_hold_shows_in_the_addons_records_too(runs):
    """min-size: the head came with the third event, 1.7 s after the lab had the request, and
    its first event with it; without the offer the head at once, the first event 0.5 s after it."""
    ends = [r for r in printed_records(runs["min-size"].stdout) if r["event"] == "handshake"]
    offered = [r for r in ends if r["accept_encoding_client"]]
    plain = [r for r in ends if not r["accept_encoding_client"]]
    assert all(r["waited_s"] > 1.5 for r in offered), offered
    assert all(r["waited_s"] < 1.5 and not r["stalled"] for r in plain), plain
    assert all(r["first_event_s"] < MIN_SIZE_EVERY for r in offered) and all(r["first_event_s"] > 0.4 for r in plain)


def test_a_head_withheld_for_good_is_a_stall_and_the_verdict_says_so(runs):
    done = runs["endless"]
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert re.search(ENDLESS_VERDICT, done.stdout.splitlines()[-1]), out
    held = [line for line in attempt_lines(done.stdout) if "with accept-encoding" in line]
    assert len(held) == 3 and all("no head in 4.0 s" in line and "no-status ⌛" in line for line in held), out
    records = printed_records(done.stdout)
    stalls = [r for r in records if r["event"] == "stall"]
    assert sorted(r["transport"] for r in stalls) == ["h1", "h2", "h3"], out
    assert all(r["kind"] == "event-stream" and r["stuck_in"] == "forwarded" and r["accept_encoding_client"]
               for r in stalls), out


def test_event_stream_probes_a_websocket_urls_twin_as_an_event_stream(runs):
    done = runs["asked"]
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ws-encode probe of the event stream wss://127.0.0.1:")
    assert done.stdout.splitlines()[-1].startswith("verdict: no difference: the head in ")


def test_the_bundle_of_event_streams_keeps_no_secret_and_says_what_each_did(runs, bundle):
    done = runs["endless"]
    out = done.stdout + done.stderr
    assert f"bundle written to {bundle}" in done.stdout, out
    files = sorted(bundle.iterdir())
    assert [p.name for p in files] == ["flows.mitm", "report.jsonl", "summary.md"]
    for secret in SECRETS:
        assert secret not in out, secret
        for f in files:
            assert secret.encode() not in f.read_bytes(), (secret, f.name)
    summary = (bundle / "summary.md").read_text()
    assert "6 event streams (report.jsonl has their records" in summary
    assert "6 attempts over HTTP/2, HTTP/3 and HTTP/1.1, with and without `accept-encoding`, each an event-stream " \
           "request" in summary
    assert summary.count("/events/probe;jsessionid=REDACTED?after=REDACTED&every=REDACTED&token=REDACTED") >= 6
    titles = [line for line in summary.splitlines() if line.startswith("## ") and "/events/probe" in line]
    assert sum(line.endswith(": no-status ⌛ (stalled head)") for line in titles) == 3, titles
    assert sum(bool(re.search(r": opened \(first event 0\.\d\d s after the head\)$", line)) for line in titles) == 3
    assert "| transport | accept-encoding | the client saw | record |" in summary
    assert re.search(r"\| HTTP/3 \| offered \| no head in 4\.0 s \| no-status ⌛ \|", summary), summary
    assert "`authorization` (6), `cookie` (6)" in summary
    records = [json.loads(line) for line in (bundle / "report.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"event-stream"} and sum(r["event"] == "handshake" for r in records) == 6
    counts = flows_read_by_each_line(bundle / "flows.mitm")
    assert list(counts.values()) == ["6"] * len(counts), counts


@pytest.fixture(scope="module")
def replays(lab, runs, bundle):
    """The endless probe's bundle replayed at its own path against hold-until-min-size and fixed, at once."""
    assert runs["endless"].returncode == 1
    behaviours = (Behaviour.HOLD_UNTIL_MIN_SIZE.value, Behaviour.FIXED.value)
    with ThreadPoolExecutor(2) as pool:
        done = {b: pool.submit(replay, str(bundle), "--target", f"https://127.0.0.1:{lab[b]}/events?{ENDLESS}",
                               "--insecure", "--loopback-only", "--timeout", f"{TIMEOUT:g}")
                for b in behaviours}
        return {b: run.result() for b, run in done.items()}


# behaviour replayed against -> (exit status, the last line, what observe says of a recorded stall)
ENDINGS = {
    Behaviour.HOLD_UNTIL_MIN_SIZE.value: (1, "replay: 3 of 3 recorded stalls recur against {url}",
                                          "the recorded stall recurs"),
    Behaviour.FIXED.value: (0, "replay: no recorded stall recurs against {url} (3 were recorded)",
                            "the recorded stall is gone"),
}


@pytest.mark.parametrize("behaviour", list(ENDINGS))
def test_a_recorded_head_stall_recurs_against_its_behaviour_and_not_against_fixed(replays, lab, behaviour):
    done = replays[behaviour]
    out = done.stdout + done.stderr
    code, last, note = ENDINGS[behaviour]
    assert done.returncode == code, out
    url = f"https://127.0.0.1:{lab[behaviour]}/events?after=REDACTED&every=REDACTED"
    assert done.stdout.splitlines()[0].startswith("ws-encode replay of 6 event streams from "), out
    assert done.stdout.splitlines()[-1] == last.format(url=url), out
    assert "reach it through the proxy" not in done.stdout  # (HTTP/2 and HTTP/3 end to end: the lab has both)
    blocks = done.stdout.split("\n\n")[1:-1]
    assert len(blocks) == 6 and sum(". HTTP/3 " in block for block in blocks) == 2, out
    for block in blocks:
        head, was, observe, strip = block.splitlines()
        assert "/events?after=REDACTED&every=REDACTED  [recorded flow" in head, block  # (printed redacted)
        assert re.search(rf"strip +200 after {T}, first event \+{T} +opened$", strip), block  # the workaround works
        if "with accept-encoding" in head:
            assert re.search(r"recorded no head, ended after \d\.\d s +no-status ⌛$", was), block
            assert observe.endswith(note), block
        else:
            assert "⌛" not in was and "opened" in observe and "stall" not in observe, block
    assert not [secret for secret in SECRETS if secret in out]


# -- what is printed of a failure, and the rules of the verdict, without a server ----------------------


@pytest.mark.parametrize("outcome, printed", [
    ("failed (connection closed: connection closed by peer with H3_MESSAGE_ERROR (0x10e): 'refused x-token "
     "70ken-echoed')", "connection closed by peer with H3_MESSAGE_ERROR (0x10e)"),
    ("failed (the connection closed before the response ended)", "the connection closed before the response ended"),
    ("failed (stream reset with error code 2)", "stream reset with error code 2"),
    ("failed (RemoteProtocolError: illegal header value b'sid=70ken-echoed')",
     "RemoteProtocolError (details not shown)"),
    ("failed (ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 9))",
     "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 9)"),
])
def test_an_event_stream_failure_is_printed_without_what_a_peer_said(outcome, printed):
    from bugreport.attempt import stream_failure

    assert stream_failure(outcome) == printed


def stream_attempt(offer: bool, head: float | None, events: list[float], ended: float | None = None, record=None):
    """An event-stream attempt as the probe makes one: the client saw its head at `head` s and its
    events at `events` (50 bytes each)."""
    from bugreport.attempt import Handshake, Seen
    from bugreport.proxy import Attempt
    from wslab.clients import EventStreamSeen
    from wslab.sse import ServerEvent

    stream = EventStreamSeen("h2", "ended" if ended else "gave up", 200 if head is not None else None,
                             [("content-type", "text/event-stream")], 0.0, head, ended,
                             [ServerEvent(str(i), at_s=t) for i, t in enumerate(events)],
                             decoded=[(t, 50) for t in events])
    shake = Handshake("h2", "gzip" if offer else None, None, "/events", "localhost", kind="event-stream")
    return Attempt(shake, Seen(stream.status, head, stream=stream), record, None)


def test_a_head_or_first_event_is_held_only_well_beyond_jitter():
    from bugreport.verdict import ENCODING, NO_STALL, OTHER, judge_event_streams

    plain = stream_attempt(False, 0.02, [1.0, 1.3])

    def judged(offered):
        return judge_event_streams([offered, plain], 3.0, 1.5)

    # A head 0.2 s late, well before the first event: jitter, not a hold.
    assert judged(stream_attempt(True, 0.2, [1.0, 1.3])).code == NO_STALL
    # A head held until the first event; the first event held until the stream ended.
    assert judged(stream_attempt(True, 1.0, [1.0, 1.3])).text.endswith(
        "over HTTP/2 the offer delays the head by 980 ms (it came with the first event after 1.0 s with the "
        "offer, 20 ms without)")
    held = judged(stream_attempt(True, 0.02, [1.6, 1.6], ended=1.6))
    assert held.code == ENCODING and held.text.endswith(
        "holds the first event until the stream ends (2 events at once after 1.6 s with the offer, the first "
        "after 1.0 s without)")
    # One event a little late, alone: not a hold.
    assert judged(stream_attempt(True, 0.02, [1.3, 1.6])).code == NO_STALL
    # The probe's own proxy passed the first event long before its client got it: not the server's doing.
    proxied = stream_attempt(True, 0.02, [2.9], record={"received_s": 0.02, "first_event_s": 0.98})
    assert judged(proxied).code == OTHER and "the probe's own proxy passed the first event 1.9 s late" in \
        judged(proxied).text


# -- an event stream over plain HTTP ------------------------------------------------------------------


async def head_held_when_offered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An http:// event stream behind an encoder that holds the head while accept-encoding is offered,
    until the client goes; without the offer, the head at once and an event EVERY s later, then the end."""
    fields = await handshake_head(reader)
    try:
        if fields is not None and "accept-encoding" not in fields:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(EVERY)  # (the application's own pace, as the lab's ?after=)
            event = tick(1, 1, EVERY)
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
            await writer.drain()
        await reader.read()  # until the client goes
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.mark.timeout(120)
def test_a_plain_http_event_stream_is_probed_over_http1_and_its_withheld_head_found():
    async def scenario():
        server = await asyncio.start_server(head_held_when_offered, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bugreport.probe", f"http://127.0.0.1:{port}/events", "--loopback-only",
            "--timeout", f"{TIMEOUT:g}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=SCRIPTS_ENV)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 90)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            server.close()
        return proc.returncode, out.decode(), err.decode()

    code, out, err = asyncio.run(scenario())
    assert code == 1, out + err
    not_tried = "HTTP/2 and HTTP/3 not tried: http:// has neither"
    assert f"  target: plain TCP (http://): HTTP/1.1 only\n  trying HTTP/1.1, each with and without " \
           f"accept-encoding; {not_tried}\n" in out, out
    lines = attempt_lines(out)
    assert len(lines) == 2 and re.search(rf"no accept-encoding +200 in {T}, first event after {T} +opened", out), out
    assert re.search(r"with accept-encoding +no head in 4\.0 s +no-status ⌛", out), out
    assert re.search(rf"^verdict: this server holds its event stream while accept-encoding is offered: over "
                     rf"HTTP/1\.1 the offer withholds the head \(none in 4\.0 s with the offer, {T} without\) "
                     rf"\({not_tried}\)$", out.splitlines()[-1]), out
