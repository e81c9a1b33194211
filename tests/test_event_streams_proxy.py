"""Event streams through a real mitmdump over every transport, against the
lab's /events behind the encoder behaviours of the public reports: HTTP/1.1
and HTTP/2 in `reverse:https://`, HTTP/3 in `reverse:http3://` (QUIC end to
end). What the client sees is compared with when the application wrote each
event (the lab records it, on the same clock), never with an idle machine's
slack. tests/test_event_streams.py has the HTTP/1.1 details against an
upstream the test steers; this file is the same promises on each transport."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from conftest import STALL, Mitmdump, assert_clean_log

from wslab.clients import EventStreamSeen, read_event_stream
from wslab.server import LabServer

pytestmark = pytest.mark.timeout(120)
BROWSER = "gzip, deflate, br, zstd"  # what Chromium offers; the lab picks zstd
EVERY, N = 0.3, 3
HELD = 4 * STALL  # the first event of a held head comes this long after the request


@dataclass
class Passage:
    """One event stream through the proxy: what the client saw, the proxy's
    records of it, when the application wrote each event, what reached it."""

    seen: EventStreamSeen
    records: list[dict]
    sent: list[float]
    offered_upstream: str | None
    md: Mitmdump

    def at(self, seconds: float) -> float:
        return self.seen.sent_at + seconds

    @property
    def end(self) -> dict:
        return next(r for r in self.records if r["event"] == "handshake")


async def passage(cert, tmp_path, name: str, transport: str, behaviour: str, after: float, *options: str) -> Passage:
    async with LabServer(behaviour, *cert, h3=transport == "h3") as server:
        upstream = f"http3://127.0.0.1:{server.h3.port}" if transport == "h3" else server.url
        async with Mitmdump("--mode", f"reverse:{upstream}", "--ssl-insecure",
                            "--set", f"ws_encode_stall={STALL}", *options, report=tmp_path / f"{name}.jsonl") as md:
            path = f"/events/{name}"
            seen = await read_event_stream(transport, md.port, f"{path}?after={after}&every={EVERY}&n={N}",
                                           accept_encoding=BROWSER, give_up=HELD + 10)
            await md.wait_for_record(event="handshake")
        offered = next(r[3] for r in server.app.requests if r[2] == path)
        sent = [t for p, _i, t in server.app.events_sent if p == path]
        return Passage(seen, md.records(), sent, offered, md)


def assert_streamed_as_written(p: Passage) -> None:
    """Never worse than no proxy: every event readable before the next was written."""
    assert p.seen.outcome == "ended" and [e.id for e in p.seen.events] == [str(i) for i in range(1, N + 1)]
    assert all(p.at(e.at_s) < p.sent[i + 1] for i, e in enumerate(p.seen.events[:-1])), (p.seen, p.sent)


@pytest.mark.parametrize("transport", ["h1", "h2", "h3"])
def test_each_encoder_behaviour_through_the_proxy(cert, tmp_path, transport):
    scenarios = {  # name: (behaviour, after, options)
        "held": ("hold-until-body", HELD, ()),
        "stripped": ("hold-until-body", HELD, ("--set", "ws_encode_policy=strip")),
        "buffered": ("buffer-events", 0, ()),
        "fixed": ("fixed", 2 * STALL, ()),
    }

    async def everything():
        return await asyncio.gather(*(passage(cert, tmp_path, name, transport, behaviour, after, *options)
                                      for name, (behaviour, after, options) in scenarios.items()))

    held, stripped, buffered, fixed = asyncio.run(everything())

    # Caddy before #7905: the head held until the first event, reported as one stall
    # while the client waited, then the stream opened and streamed through.
    assert_held_head_diagnosed(held)
    assert_streamed_as_written(held)

    # strip: the offer never reaches the encoder, so the head comes at once, unencoded.
    assert stripped.offered_upstream is None and stripped.seen.content_encoding is None
    assert stripped.at(stripped.seen.head_s) < stripped.sent[0]
    assert_streamed_as_written(stripped)
    assert [r["event"] for r in stripped.records] == ["handshake"]
    assert (stripped.end["outcome"], stripped.end["stalled"], stripped.end["policy"]) == ("opened", False, "strip")
    assert stripped.end["accept_encoding_upstream"] is None and stripped.end["first_event_s"] is not None

    # Starlette's GZip, Express's compression: the head at once, the events kept in the
    # compressor to the end; the record says the stream is encoded and when an event decoded.
    assert buffered.seen.content_encoding == "zstd" and buffered.at(buffered.seen.first_event_s) > buffered.sent[-1]
    assert [r["event"] for r in buffered.records] == ["handshake"]
    end = buffered.end
    assert (end["outcome"], end["stalled"], end["content_encoding"]) == ("opened", False, "zstd")
    assert end["first_event_s"] > 0 and "carries content-encoding: zstd" in end["diagnosis"]

    # Caddy 2.9 with #7905: the head at once, each event flushed; nothing held, nothing worse.
    assert fixed.at(fixed.seen.head_s) < fixed.sent[0]
    assert_streamed_as_written(fixed)
    assert [r["event"] for r in fixed.records] == ["handshake"] and fixed.end["outcome"] == "opened"

    for p in (held, stripped, buffered, fixed):
        assert {(r["kind"], r["transport"], r["upstream_transport"]) for r in p.records} == {
            ("event-stream", transport, transport)}
        assert p.end["url"].endswith("?after=REDACTED&every=REDACTED&n=REDACTED")
        assert_clean_log(p.md)


def assert_held_head_diagnosed(held: Passage) -> None:
    assert held.seen.content_encoding == "zstd" and held.sent[0] < held.at(held.seen.head_s)
    stall, end = held.records
    assert (stall["event"], stall["stuck_in"], stall["status"]) == ("stall", "forwarded", None), stall
    assert stall["diagnosis"].startswith("Stall: no response head"), stall
    assert any("Event stream stall on " in line and "/events/held" in line for line in held.md.lines)
    assert (end["outcome"], end["stalled"], end["status"]) == ("opened", True, 200), end
    assert "the head only came with the first event" in end["diagnosis"], end
