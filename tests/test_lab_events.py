"""The lab's event stream, /events, behind each encoder behaviour over HTTP/1.1, HTTP/2 and the
lab's HTTP/3, read by the event-stream client of wslab.clients: without accept-encoding the head
comes at once and each event as it is written; with it, each behaviour holds what its public
report says, and the events still decode to what the application wrote. Every timing is checked
against when the application wrote each event (`LabApp.events_sent`, the same clock), not
against slack on an idle machine. Then the page's EventSource in Chromium."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.parse

import pytest
from peers import chromium

from wslab.app import GREETING, tick
from wslab.clients import EventStreamSeen, read_event_stream
from wslab.encoders import MIN_SIZE
from wslab.server import LabServer
from wslab.sse import EventParser, ServerEvent, format_event

TRANSPORTS = ("h1", "h2", "h3")
BROWSER = "gzip, deflate, br, zstd"  # zstd is chosen
AFTER, EVERY, N = 0.4, 0.3, 3
QUERY = f"after={AFTER}&every={EVERY}&n={N}"
pytestmark = pytest.mark.timeout(60)


# -- the format ---------------------------------------------------------------------------------

def test_events_parse_as_the_standard_says_in_pieces_of_any_size():
    stream = ("\ufeff: a comment\r\nid: 7\r\nevent: tick\r\ndata: one\r\ndata: two\r\n\r\n"
              "data:no space\rretry: 10\r\r"
              "id\nevent: lonely\n\n"  # no data: nothing dispatched, the id emptied
              "data: é\n\n"
              "data: cut off").encode()
    want = [ServerEvent("one\ntwo", "tick", "7"), ServerEvent("no space", "message", "7"),
            ServerEvent("é", "message", "")]
    assert EventParser().feed(stream) == want
    for size in (1, 2, 3, 7):  # CRLF, and UTF-8 sequences, split between pieces
        parser = EventParser()
        assert [e for i in range(0, len(stream), size) for e in parser.feed(stream[i:i + size])] == want


def test_the_labs_events_are_small_and_read_back_as_written():
    assert format_event("a\nb", event="tick", id="3") == b"id: 3\nevent: tick\ndata: a\ndata: b\n\n"
    assert all(len(tick(i, None, 1.0)) < 100 for i in (1, 10, 10_000))  # well under 1 KiB, as real ones are
    assert EventParser().feed(tick(2, 3, 0.5)) == [ServerEvent("event 2 of 3, one every 0.5 s", "tick", "2")]


# -- each behaviour over each transport -------------------------------------------------------------

def written(n: int = N, every: float = EVERY) -> list[ServerEvent]:
    return [e for i in range(1, n + 1) for e in EventParser().feed(tick(i, n, every))]


def at(seen: EventStreamSeen, seconds: float) -> float:
    """A time `seen` noted, on the application's clock (time.monotonic)."""
    return seen.sent_at + seconds


async def both_ways(server: LabServer, query: str, give_up: float = 5.0, count: int | None = None) -> dict:
    """/events?`query` over every transport, with and without the browser's codings, all at once:
    {(transport, offered): (what the client saw, when the application wrote each event)}."""
    async def one(transport: str, offered: bool):
        path = f"/events/{transport}-{'offered' if offered else 'plain'}"
        port = server.h3.port if transport == "h3" else server.port
        seen = await read_event_stream(transport, port, f"{path}?{query}", accept_encoding=BROWSER if offered else None,
                                       give_up=give_up, count=count)
        return seen, [t for p, _i, t in server.app.events_sent if p == path]

    keys = [(t, offered) for t in TRANSPORTS for offered in (False, True)]
    return dict(zip(keys, await asyncio.gather(*(one(*key) for key in keys))))


def assert_at_once(seen: EventStreamSeen, sent: list[float]) -> None:
    """What an event stream with nothing in its way looks like: the head before the first
    event was written, each event readable before the next one was written."""
    assert (seen.outcome, seen.status) == ("ended", 200) and at(seen, seen.head_s) < sent[0]
    assert [(e.id, e.event, e.data) for e in seen.events] == [(e.id, e.event, e.data) for e in written()]
    assert all(at(seen, event.at_s) < sent[i + 1] for i, event in enumerate(seen.events[:-1])), (seen, sent)


def assert_head_with_first_event(seen: EventStreamSeen, sent: list[float]) -> None:
    """Caddy before #7905: the head waits for the first event, and comes with it; each event after
    it is flushed as written."""
    assert (seen.outcome, seen.status) == ("ended", 200) and sent[0] < at(seen, seen.head_s)
    assert seen.first_event_s >= seen.head_s and at(seen, seen.first_event_s) < sent[1]
    assert all(at(seen, event.at_s) < sent[i + 1] for i, event in enumerate(seen.events[:-1])), (seen, sent)


def assert_buffered_to_the_end(seen: EventStreamSeen, sent: list[float]) -> None:
    """Starlette's GZip, Express's compression: the head with the first event's write, and no event
    readable before the last was written (the stream's end let them out, all at once)."""
    assert (seen.outcome, seen.status) == ("ended", 200) and sent[0] < at(seen, seen.head_s) < sent[1]
    assert at(seen, seen.first_event_s) > sent[-1]
    assert len({event.at_s for event in seen.events}) == 1


# behaviour -> (what it does to an event stream offered the browser's codings, content-encoding)
WITH_ENCODING = {
    "none": (assert_at_once, None),
    "fixed": (assert_at_once, "zstd"),  # the head at once, each event flushed (Caddy #7905, workerd #7390)
    "encode-upgrade": (assert_at_once, "zstd"),  # decides from the headers, flushes as the handler does
    "hold-until-body": (assert_head_with_first_event, "zstd"),
    "hold-1xx": (assert_head_with_first_event, "zstd"),  # a final status is held as by hold-until-body
    "buffer-events": (assert_buffered_to_the_end, "zstd"),
}
MIN_SIZE_N, SMALL_MIN_SIZE = 5, 150
ENDLESS_EVERY = 0.25
# name -> (behaviour, the lab's options, the query, give_up, count): every one is run at once, below
SCENARIOS = {
    **{b: (b, {}, QUERY, 5.0, None) for b in WITH_ENCODING},
    "min-size": ("hold-until-min-size", {"min_size": SMALL_MIN_SIZE},
                 f"after={AFTER}&every={EVERY}&n={MIN_SIZE_N}", 5.0, None),
    "min-size endless": ("hold-until-min-size", {}, f"after={AFTER}&every={ENDLESS_EVERY}", 3.0, 2),
}


@pytest.fixture(scope="module")
def seen(cert) -> dict:
    """Every scenario over every transport, with and without accept-encoding, all at once (each
    behaviour on a lab of its own): {name: {(transport, offered): (seen, written)}}."""
    async def scenario(behaviour, options, query, give_up, count):
        async with LabServer(behaviour, *cert, h3=True, **options) as server:
            return await both_ways(server, query, give_up, count)

    async def everything():
        return dict(zip(SCENARIOS, await asyncio.gather(*(scenario(*s) for s in SCENARIOS.values()))))

    return asyncio.run(everything())


@pytest.mark.parametrize("behaviour", WITH_ENCODING)
def test_each_behaviour_with_and_without_accept_encoding_over_every_transport(seen, behaviour):
    check, coding = WITH_ENCODING[behaviour]
    for transport in TRANSPORTS:
        plain, sent = seen[behaviour][transport, False]
        # Nothing offered: no encoder wraps the response, whatever its behaviour.
        assert_at_once(plain, sent)
        assert plain.content_encoding is None and plain.content_type == "text/event-stream"
        offered, sent = seen[behaviour][transport, True]
        check(offered, sent)
        assert offered.content_encoding == coding, transport
        assert [e.data for e in offered.events] == [e.data for e in written()], transport


def test_hold_until_min_size_holds_head_and_events_until_enough_bytes_then_flushes(seen):
    n = MIN_SIZE_N
    enough = next(i for i in range(1, n + 1) if sum(len(tick(j, n, EVERY)) for j in range(1, i + 1)) >= SMALL_MIN_SIZE)
    assert enough == 3  # three events of about 50 bytes
    for transport in TRANSPORTS:
        offered, sent = seen["min-size"][transport, True]
        assert (offered.outcome, offered.status, offered.content_encoding) == ("ended", 200, "zstd")
        # The head and the first three events, at once, once the third was written; then one by one.
        assert sent[enough - 1] < at(offered, offered.head_s) < sent[enough]
        assert {e.at_s for e in offered.events[:enough]} == {offered.events[0].at_s}
        assert at(offered, offered.events[enough].at_s) < sent[enough + 1]
        assert [e.data for e in offered.events] == [e.data for e in written(n)]


def test_hold_until_min_size_never_starts_an_endless_stream_of_small_events(seen):
    """nytimes/gziphandler#74: with accept-encoding: gzip, SSE died."""
    for transport in TRANSPORTS:
        plain, sent = seen["min-size endless"][transport, False]
        assert (plain.outcome, plain.status, len(plain.events)) == ("enough", 200, 2)
        assert at(plain, plain.head_s) < sent[0]
        offered, sent = seen["min-size endless"][transport, True]
        # Several events written, under 1024 bytes: no head, no event, until the client gave up.
        assert (offered.outcome, offered.status, offered.events, offered.chunks) == ("gave up", None, [], [])
        assert len(sent) >= 3 and sum(len(tick(i, None, ENDLESS_EVERY)) for i in range(1, len(sent) + 1)) < MIN_SIZE


def test_fixed_flushes_each_event_and_buffer_events_keeps_them_in_every_coding(cert):
    codings = ("gzip", "br", "zstd")

    async def scenario():
        async with LabServer("fixed", *cert) as fixed, LabServer("buffer-events", *cert) as buffering:
            return await asyncio.gather(*(read_event_stream("h2", server.port, f"/events?{QUERY}", accept_encoding=c)
                                          for c in codings for server in (fixed, buffering)))

    results = asyncio.run(scenario())
    for coding, flushed, kept in zip(codings, results[::2], results[1::2]):
        assert flushed.content_encoding == kept.content_encoding == coding
        assert [e.data for e in flushed.events] == [e.data for e in kept.events] == [e.data for e in written()]
        # fixed: one chunk per event, each one decoded as it came
        assert [e.at_s for e in flushed.events] == [when for when, _size in flushed.chunks[:N]], coding
        assert len({e.at_s for e in flushed.events}) == N
        # buffer-events: nothing readable until the end; gzip's first chunk is its 10-byte header alone
        assert len({e.at_s for e in kept.events}) == 1 and kept.events[0].at_s >= kept.chunks[-1][0], coding
        if coding == "gzip":
            assert kept.chunks[0][1] == 10 and kept.chunks[0][0] < kept.events[0].at_s


def test_the_labs_help_describes_the_event_stream_and_cites_the_reports():
    done = subprocess.run([sys.executable, "-m", "wslab.lab", "--help"], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert "  buffer-events: " in done.stdout and "/events answers 200 text/event-stream" in done.stdout
    for report in ("caddyserver/caddy#6293", "#7905", "nytimes/gziphandler#60, #74", "Kludex/starlette#2753",
                   "expressjs/compression#17", "cloudflare/workerd#7390"):
        assert report in done.stdout, report


# -- the page, in Chromium ----------------------------------------------------------------------------

@chromium.needs_chromium
def test_the_labs_page_opens_its_event_stream_and_says_when_the_head_and_the_first_event_came(cert, home):
    """Chromium offers its codings on an EventSource request too: fixed lets the head out at once,
    hold-until-body holds `open` until the first event. The page reports /greet as before."""
    after = 1.0

    async def visit(behaviour: str):
        async with LabServer(behaviour, *cert) as server:
            browser = await chromium.start(f"{server.url}/?after={after}", home)
            try:
                events = await asyncio.wait_for(server.app.event_results.get(), 60)
                greet = await asyncio.wait_for(server.app.results.get(), 60)
            finally:
                await chromium.stop(browser)
            return events, greet, server.app.requests

    def times(report: str) -> dict[str, float]:
        fields = urllib.parse.unquote(report).removeprefix("events=").split(",")
        return {k: float(v) for k, v in (f.split(":") for f in fields)}

    async def scenario():
        return await visit("fixed"), await visit("hold-until-body")

    for (events, greet, requests), held in zip(asyncio.run(scenario()), (False, True)):
        assert urllib.parse.unquote(greet) == f"greet={GREETING}"
        seen = times(events)
        if held:  # open came with the first event (the page's clock ticks in tenths)
            assert seen["open"] >= seen["first"] - 0.1, events
        else:
            assert seen["open"] < seen["first"] - after / 2, events
        streams = [r for r in requests if r[0] == "http" and r[2] == "/events"]
        assert len(streams) == 1 and streams[0][1] == "2" and "zstd" in streams[0][3]
