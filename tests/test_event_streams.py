"""Event streams (SSE) through a real mitmdump: followed like handshakes,
streamed as they come, their head's stall reported, their first event timed.

The upstream here is an HTTP/1.1 event-stream server the test steers: it
holds its head, or the events its encoder buffers, until the test lets them
go, so each test waits on what it saw, not on a clock.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import zlib
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mitmproxy.version
from conftest import ROOT, STALL, Mitmdump, addon_copy, assert_clean_log, reload_script
from wsencode.core import diagnosis
from wsencode.core.handshake import Form, Transport, accepts_event_stream, classify
from wsencode.core.handshakes import Summary
from wsencode.core.lifecycle import EndCause, Phase, Progress
from wsencode.core.streamfacts import StreamFacts
from wsencode.mitm.commands import summary_lines
from mitmproxy.test import tutils

EVENT = b"id: 1\ndata: the first event\n\n"


class EventServer:
    """An HTTP/1.1 event-stream upstream. `head` is set to let the head go
    (set at once unless `hold_head`); `events` to let the events go. With
    `gzip`, as an encoder that buffers (Starlette's GZipMiddleware, Express
    compression without flush): the head and gzip's header at once, the
    compressed events only when they are let go. `content_type` is what the
    head says the body is."""

    def __init__(self, hold_head: bool = False, gzip: bool = False, end: bool = False,
                 content_type: bytes = b"text/event-stream") -> None:
        self.gzip, self.end, self.content_type = gzip, end, content_type
        self.head, self.events = asyncio.Event(), asyncio.Event()
        if not hold_head:
            self.head.set()
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> EventServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        self.head.set()
        self.events.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            await self.head.wait()
            coding = b"content-encoding: gzip\r\n" if self.gzip else b""
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: " + self.content_type + b"\r\ncache-control: no-store\r\n"
                         + coding + b"transfer-encoding: chunked\r\n\r\n")
            encoder = zlib.compressobj(wbits=31) if self.gzip else None
            if encoder is not None:
                chunk(writer, encoder.compress(EVENT))  # gzip's header alone: the event stays in the buffer
            await writer.drain()
            await self.events.wait()
            chunk(writer, encoder.flush(zlib.Z_SYNC_FLUSH) if encoder is not None else EVENT)
            if self.end:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            await reader.read()  # until the proxy goes
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))


class EventClient:
    """A client of one event stream through the proxy, over HTTP/1.1."""

    def __init__(self, port: int, path: str = "/events?token=secret", accept_encoding: str | None = "gzip, br") -> None:
        self.port, self.path, self.accept_encoding = port, path, accept_encoding
        self.head: bytes | None = None
        self.head_at: float | None = None
        self.body = bytearray()

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        coding = f"accept-encoding: {self.accept_encoding}\r\n" if self.accept_encoding else ""
        self.writer.write(f"GET {self.path} HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n"
                          f"cookie: session=secret\r\n{coding}\r\n".encode())
        await self.writer.drain()

    async def read_head(self, timeout: float = 10) -> bytes:
        self.head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        self.head_at = time.monotonic()
        return self.head

    async def read_until(self, data: bytes, timeout: float = 10) -> None:
        """Read the chunked body until `data` is in it (decoded from gzip if it is)."""
        async def more() -> None:
            while data not in self.decoded():
                got = await self.reader.read(65536)
                assert got, f"the stream ended before {data!r}: {bytes(self.body)!r}"
                self.body.extend(got)
        await asyncio.wait_for(more(), timeout)

    def decoded(self) -> bytes:
        raw, body = bytes(self.body), bytearray()
        while b"\r\n" in raw:
            size, rest = raw.split(b"\r\n", 1)
            n = int(size, 16)
            if n == 0 or len(rest) < n + 2:
                break
            body += rest[:n]
            raw = rest[n + 2:]
        if self.head and b"content-encoding: gzip" in self.head.lower():
            return zlib.decompressobj(wbits=31).decompress(bytes(body))
        return bytes(body)

    def close(self) -> None:
        self.writer.close()


def proxy(server: EventServer, report, *options: str) -> Mitmdump:
    return Mitmdump("--mode", f"reverse:http://127.0.0.1:{server.port}", "--set", f"ws_encode_stall={STALL}",
                    *options, report=report)


def records_of(md: Mitmdump, event: str) -> list[dict]:
    return [r for r in md.records() if r["event"] == event]


# -- through a real mitmdump ------------------------------------------------------


def test_a_held_head_is_one_stall_then_the_stream_opens_and_its_event_streams_through(report):
    async def scenario():
        async with EventServer(hold_head=True) as server, proxy(server, report) as md:
            client = EventClient(md.port)
            await client.open()
            stall = await md.wait_for_record(event="stall")
            assert client.head is None and not client.reader.at_eof()
            server.head.set()
            await client.read_head()
            server.events.set()
            await client.read_until(b"the first event")  # while the stream is open: streamed, not held to its end
            opened = await md.wait_for_record(event="handshake")
            client.close()
            return stall, opened, md, client
    stall, opened, md, client = asyncio.run(scenario())
    assert b"200 OK" in client.head
    assert stall["kind"] == "event-stream" and stall["stuck_in"] == "forwarded" and stall["transport"] == "h1"
    assert stall["diagnosis"].startswith("Stall: no response head") and "encoding layer" in stall["diagnosis"]
    assert opened["kind"] == "event-stream" and opened["outcome"] == "opened" and opened["stalled"] is True
    assert opened["status"] == 200 and opened["first_event_s"] is not None and opened["stuck_in"] == "done"
    ours = [line for line in md.lines if "Event stream" in line or "ws_encode" in line]  # (mitmdump's own flow lines aside)
    assert opened["url"].endswith("/events?token=REDACTED") and "secret" not in "".join(ours) + json.dumps(md.records())
    assert len(records_of(md, "stall")) == 1 and "Event stream stall on" in md.log
    assert_clean_log(md)


def test_events_an_encoder_buffers_are_timed_by_what_decodes_not_by_its_header(report):
    async def scenario():
        async with EventServer(gzip=True) as server, proxy(server, report) as md:
            client = EventClient(md.port)
            await client.open()
            await client.read_head()
            await client.read_until(b"")  # (nothing decodes yet)
            while not client.body:  # gzip's header, at once
                client.body.extend(await asyncio.wait_for(client.reader.read(65536), 10))
            assert b"the first event" not in client.decoded()
            released = time.monotonic()
            server.events.set()
            await client.read_until(b"the first event")
            record = await md.wait_for_record(event="handshake")
            client.close()
            return record, released - client.head_at
    record, held = asyncio.run(scenario())
    assert record["content_encoding"] == "gzip" and record["outcome"] == "opened" and not record["stalled"]
    assert record["first_event_s"] >= held - 0.05, (record, held)  # the header came at once; the event did not
    assert "content-encoding: gzip" in record["diagnosis"] and "flushes every event" in record["diagnosis"]


def test_strip_takes_the_offer_off_an_event_stream_request_and_leaves_the_response_as_it_is(report):
    async def scenario():
        async with EventServer(gzip=True) as server, proxy(server, report, "--set", "ws_encode_policy=strip") as md:
            client = EventClient(md.port)
            await client.open()
            await client.read_head()
            server.events.set()
            await client.read_until(b"the first event")
            record = await md.wait_for_record(event="handshake")
            client.close()
            return record, server.requests[0].lower(), client.head.lower()
    record, upstream_saw, head = asyncio.run(scenario())
    assert b"accept-encoding" not in upstream_saw and b"content-encoding: gzip" in head  # (its body is gzip)
    assert record["policy"] == "strip" and record["accept_encoding_client"] == "gzip, br"
    assert record["accept_encoding_upstream"] is None


@pytest.mark.parametrize("flt, followed", [("~websocket", False), ("~u /events", True)])
def test_the_filter_scopes_event_streams_and_inject_offers_them_encoding(report, flt, followed):
    async def scenario():
        # (one that is not followed mitmproxy holds until it ends, as without the addon: this one ends)
        async with EventServer(end=True) as server, proxy(server, report, "--set", f"ws_encode_filter={flt}",
                                                          "--set", "ws_encode_policy=inject") as md:
            server.events.set()
            client = EventClient(md.port, accept_encoding=None)
            await client.open()
            await client.read_head()
            await client.read_until(b"the first event")
            client.close()
            if followed:
                await md.wait_for_record(event="handshake")
            return md.records(), server.requests[0].lower()
    records, upstream_saw = asyncio.run(scenario())
    assert [r["outcome"] for r in records] == (["opened"] if followed else [])
    assert (b"accept-encoding: zstd, br, gzip" in upstream_saw) is followed  # (what is not followed is not touched)


def test_a_client_that_leaves_before_the_first_event_gets_an_opened_record_without_one(report):
    async def scenario():
        async with EventServer() as server, proxy(server, report) as md:
            client = EventClient(md.port)
            await client.open()
            await client.read_head()
            client.close()
            return await md.wait_for_record(event="handshake")
    record = asyncio.run(scenario())
    assert record["outcome"] == "opened" and record["first_event_s"] is None
    assert "no event came" in record["diagnosis"] and "before the client left" in record["diagnosis"]


def test_a_stream_that_ends_without_an_event_is_recorded_when_it_ends(report):
    async def scenario():
        async with EventServer(end=True) as server, proxy(server, report) as md:
            server.events.set()
            client = EventClient(md.port)
            await client.open()
            await client.read_head()
            await client.read_until(b"the first event")
            record = await md.wait_for_record(event="handshake")
            client.close()
            return record
    record = asyncio.run(scenario())
    assert record["outcome"] == "opened" and record["first_event_s"] is not None


def test_with_event_streams_off_no_event_stream_is_followed(report):
    async def scenario():
        async with EventServer(hold_head=True) as server, proxy(server, report,
                                                                "--set", "ws_encode_event_streams=false") as md:
            client = EventClient(md.port)
            await client.open()
            await md.wait_for(r"server connect")
            server.head.set()
            server.end, _ = True, server.events.set()
            await client.read_head()
            client.close()
            return md
    md = asyncio.run(scenario())
    assert md.records() == [] and "stall" not in md.log


def test_a_reload_between_head_and_first_event_still_records_the_event(report, tmp_path):
    script = addon_copy(tmp_path)

    async def scenario():
        async with EventServer() as server:
            md = Mitmdump("--mode", f"reverse:http://127.0.0.1:{server.port}", report=report, addon=script)
            async with md:
                client = EventClient(md.port)
                await client.open()
                await client.read_head()
                await reload_script(md, script)
                server.events.set()
                await client.read_until(b"the first event")
                record = await md.wait_for_record(event="handshake")
                client.close()
                return record, md
    record, md = asyncio.run(scenario())
    assert record["outcome"] == "opened" and record["first_event_s"] is not None
    assert_clean_log(md)


STREAMING_ADDON = """
def responseheaders(flow):
    flow.response.stream = lambda data: data.replace(b"first", b"FIRST")
"""


def test_another_addons_stream_function_still_runs(report, tmp_path):
    other = tmp_path / "upper.py"
    other.write_text(STREAMING_ADDON)

    async def scenario():
        async with EventServer() as server:
            # (its responseheaders runs before the addon's: -s order)
            md = Mitmdump("--mode", f"reverse:http://127.0.0.1:{server.port}", "-s", str(other), report=report)
            md.args = ["-s", str(other), *md.args[:2]]
            async with md:
                client = EventClient(md.port)
                await client.open()
                await client.read_head()
                server.events.set()
                await client.read_until(b"the FIRST event")
                record = await md.wait_for_record(event="handshake")
                client.close()
                return record
    record = asyncio.run(scenario())
    assert record["first_event_s"] is not None


# -- the pure parts ----------------------------------------------------------------


@pytest.mark.parametrize("accept, asks", [
    ("text/event-stream", True),
    ("Text/Event-Stream; charset=utf-8", True),
    ("text/html, text/event-stream;q=0.5", True),
    ("text/event-stream;q=0", False),
    ("text/event-stream;q=nope", False),
    ("*/*", False),
    ("text/*", False),
    ("", False),
])
def test_an_accept_asks_for_an_event_stream_by_name_with_a_q_above_zero(accept, asks):
    assert accepts_event_stream([accept]) is asks


@given(st.text(max_size=80))
def test_any_accept_value_is_read_without_an_error(value):
    assert accepts_event_stream([value]) in (True, False)


def test_a_websocket_handshake_that_also_accepts_an_event_stream_is_a_websocket():
    request = tutils.treq(headers=((b"upgrade", b"websocket"), (b"connection", b"upgrade"),
                                   (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                                   (b"sec-websocket-version", b"13"), (b"accept", b"text/event-stream")))
    assert classify(request, event_streams=True).form is Form.UPGRADE
    plain = tutils.treq(headers=((b"accept", b"text/event-stream"),))
    assert classify(plain) is None and classify(plain, event_streams=True).form is Form.EVENT_STREAM
    assert classify(plain, Transport.H2, event_streams=True).kind == "event-stream"


def test_an_opened_event_stream_notes_its_first_event_and_its_end_without_another_outcome():
    handshake = classify(tutils.treq(headers=((b"accept", b"text/event-stream"),)), event_streams=True)
    p = Progress(handshake, received_at=100.0, facts=StreamFacts(forwarded_at=100.0, answer_status=200))
    assert p.status_arrived(200, 100.5) is Phase.OPENED
    p.end(EndCause.CLIENT_GONE, 103.0)
    assert p.phase is Phase.OPENED and p.first_event_s is None
    text = diagnosis.outcome(p, None, 103.0, "gzip")
    assert text.startswith("Opened after 0.50 s") and "no event came in the 2.5 s after the head before the client left" in text


@pytest.mark.parametrize("first_event_after, held", [(0.0, True), (0.19, True), (0.3, False)])
def test_a_stalled_head_that_came_with_the_first_event_is_named_an_encoders_hold(first_event_after, held):
    handshake = classify(tutils.treq(headers=((b"accept", b"text/event-stream"),)), event_streams=True)
    p = Progress(handshake, received_at=100.0, facts=StreamFacts(forwarded_at=100.0, answer_status=200))
    p.stall()
    p.status_arrived(200, 102.0)
    p.first_event(102.0 + first_event_after)
    text = diagnosis.outcome(p, None, 103.0, "gzip")
    # Within a tenth of the 2 s wait for the head: they came together.
    assert ("the head only came with the first event" in text) is held, text
    assert not held or text.endswith("retry with ws_encode_policy=strip to confirm."), text


def test_a_summary_of_event_streams_alone_says_nothing_of_websockets():
    summary = Summary(event_streams=Counter({("opened", "h2"): 2}), stalls=1)
    assert summary_lines(summary, 0, None, None) == [
        "2 event streams followed: 2 opened (2 over h2)", "1 stall reported", "report: off (set ws_encode_report)"]


def test_an_event_stream_request_answered_with_a_page_is_not_called_an_event_stream(report):
    """A login or error page answering in the event stream's place: 200, but
    text/html. EventSource fails it at once; the record must not say the
    stream opened and waited for its events."""
    async def scenario():
        async with EventServer(content_type=b"text/html; charset=utf-8", end=True) as server, \
                proxy(server, report) as md:
            server.events.set()
            client = EventClient(md.port)
            await client.open()
            await client.read_head()
            record = await md.wait_for_record(event="handshake")
            client.close()
            return record, md
    record, md = asyncio.run(scenario())
    assert record["kind"] == "event-stream" and record["status"] == 200 and record["outcome"] == "opened"
    assert "the response is text/html; charset=utf-8, not text/event-stream" in record["diagnosis"], record
    assert "EventSource fails it" in record["diagnosis"] and "nothing withheld" not in record["diagnosis"]
    assert_clean_log(md)


@pytest.mark.skipif(int(mitmproxy.version.VERSION.split(".")[0]) < 12, reason="mitmproxy 11 depends on zstandard")
def test_the_addon_decodes_zstd_with_mitmproxy_12s_own_zstd_and_no_zstandard():
    """mitmproxy 12 decodes zstd with the standard library's or backports.zstd
    and does not depend on zstandard (its standalone binaries lack it): the
    addon loads, and times a zstd event stream's first event, without it."""
    code = """if True:
        import sys
        sys.modules["zstandard"] = None  # (an import of it raises ImportError)
        import ws_encode
        from wsencode.mitm import eventstream
        try:
            from compression import zstd
        except ImportError:
            from backports import zstd
        compressor = zstd.ZstdCompressor()
        frame = compressor.compress(b"data: one\\n\\n") + compressor.flush(zstd.ZstdCompressor.FLUSH_BLOCK)
        decode = eventstream.decoder("zstd")
        print(decode(frame[:4]), decode(frame[4:]))
    """
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "addon", capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "b'' b'data: one\\n\\n'", done.stdout
