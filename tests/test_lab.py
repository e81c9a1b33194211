"""The encoder lab: its middleware really compresses, negotiates as real encoders do, keeps
`fixed` honest, runs on its own, and serves a browser directly and through the proxy."""

from __future__ import annotations

import asyncio
import re
import subprocess
import urllib.parse

import h2.events
from wspeers import h2ws
import pytest
from conftest import ROOT, LabAlone, Mitmdump, assert_clean_log
from peers import chromium

from wslab import haproxy
from wslab.app import ERROR_PAGE, GREETING
from wslab.clients import h1_client, h2_client
from wslab.codings import Decoder, NotAcceptable, choose, decode
from wslab.encoders import Behaviour
from wslab.haproxy import Front
from wslab.server import LabServer

CODINGS = ("zstd", "br", "gzip")
BROWSER = "gzip, deflate, br, zstd"


@pytest.mark.parametrize("offer, chosen", [
    (BROWSER, "zstd"),  # all q=1: the server's order decides
    ("gzip;q=1.0, br;q=0.9, zstd;q=0.8", "gzip"),
    ("br;q=0.5, gzip;q=0.4", "br"),
    ("ZSTD;Q=0.3, gzip;q=0.2", "zstd"),
    ("*", "zstd"),
    ("*;q=0.1, gzip;q=0.5", "gzip"),
    ("gzip;q=nonsense, br", "br"),
    ("identity;q=0, gzip;q=0.2", "gzip"),
    ("gzip;q=0, br;q=0, zstd;q=0", None),
    ("deflate", None),
    ("", None),
    (None, None),
])
def test_the_coding_follows_q_values(offer, chosen):
    assert choose(offer) == chosen


@pytest.mark.parametrize("offer", ["identity;q=0", "*;q=0", "identity;q=0, gzip;q=0", "deflate, identity;q=0"])
def test_identity_refused_and_nothing_else_acceptable_is_not_acceptable(offer):
    with pytest.raises(NotAcceptable):
        choose(offer)


async def h2_get(port: int, path: str, accept_encoding: str | None):
    """(status, response fields, body, the DATA chunks as they came) over HTTP/2."""
    async with h2ws.H2WebSocketClient("127.0.0.1", port, server_hostname="localhost") as client:
        headers = [("accept-encoding", accept_encoding)] if accept_encoding is not None else []
        status, body = await client.get(path, "localhost", headers=headers)
        response = next(e for e in client.events if isinstance(e, h2.events.ResponseReceived))
        fields = {k.decode(): v.decode() for k, v in response.headers}
        chunks = [e.data for e in client.events
                  if isinstance(e, h2.events.DataReceived) and e.stream_id == response.stream_id and e.data]
        return status, fields, body, chunks


def lab(behaviour: str, cert, **kwargs) -> LabServer:
    return LabServer(behaviour, *cert, **kwargs)


@pytest.mark.parametrize("behaviour", [b.value for b in Behaviour])
def test_every_behaviour_really_compresses_the_page_in_every_coding(cert, behaviour):
    async def scenario():
        async with lab(behaviour, cert) as server:
            plain = await h2_get(server.port, "/", None)
            return plain, [await h2_get(server.port, "/", coding) for coding in CODINGS]

    (status, fields, page, _), encoded = asyncio.run(scenario())
    assert status == 200 and "content-encoding" not in fields and b"ws-encode lab" in page
    for coding, (status, fields, body, _) in zip(CODINGS, encoded):
        assert status == 200 and fields["content-encoding"] == coding
        assert "accept-encoding" in fields["vary"].lower() and "content-length" not in fields
        assert decode(coding, body) == page and len(body) < len(page) * 0.7


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("behaviour", ["hold-until-body", "encode-upgrade", "fixed"])
def test_a_streamed_response_is_flushed_chunk_by_chunk_without_ending_the_stream(cert, behaviour, coding):
    n = 4

    async def scenario():
        async with lab(behaviour, cert) as server:
            return await h2_get(server.port, f"/stream?n={n}&every=0.05", coding)

    status, fields, body, chunks = asyncio.run(scenario())
    assert status == 200 and fields["content-encoding"] == coding
    decoder, text = Decoder(coding), ""
    for i, chunk in enumerate(chunks[:n], start=1):
        text += decoder.decode(chunk).decode()
        # Each flush already decodes to every line sent so far, and no more.
        line = f"chunk {i} of {n}: " + "streamed through the encoder " * 3 + "\n"
        assert text.count("\n") == i and text.endswith(line)
    text += "".join(decoder.decode(chunk).decode() for chunk in chunks[n:])
    assert text.count("\n") == n and decode(coding, body).decode() == text


def test_min_size_holds_a_small_stream_to_the_end_and_encodes_a_large_one(cert):
    async def scenario():
        async with lab("hold-until-min-size", cert) as server:
            small = await h2_get(server.port, "/stream?n=3&every=0.05", "gzip")
            large = await h2_get(server.port, "/stream?n=20&every=0.01", "gzip")
            return small, large

    (status, fields, body, chunks), (_, large_fields, large_body, large_chunks) = asyncio.run(scenario())
    # 3 lines < 1024 bytes: the flushes were ignored, and the end came uncompressed, at once.
    assert status == 200 and "content-encoding" not in fields and len(chunks) == 1
    assert body.decode().count("\n") == 3
    # 20 lines: held until 1024 bytes, then compressed and flushed chunk by chunk.
    assert large_fields["content-encoding"] == "gzip" and decode("gzip", large_body).decode().count("\n") == 20
    assert 1 < len(large_chunks) < 20


def test_identity_refused_gets_406_and_identity_excluded_still_gets_a_coding(cert):
    async def scenario():
        async with lab("fixed", cert) as server:
            return (await h2_get(server.port, "/", "identity;q=0"),
                    await h2_get(server.port, "/", "identity;q=0, gzip;q=0.5"),
                    await h2_get(server.port, "/", "gzip;q=0"))

    refused, gzipped, plain = asyncio.run(scenario())
    assert refused[0] == 406 and "content-encoding" not in refused[1]
    assert gzipped[0] == 200 and gzipped[1]["content-encoding"] == "gzip"
    assert plain[0] == 200 and "content-encoding" not in plain[1] and b"ws-encode lab" in plain[2]


def test_fixed_passes_upgrades_at_once_and_still_encodes_a_failed_upgrades_error_page(cert):
    async def scenario():
        async with lab("fixed", cert) as server:
            async with h2ws.H2WebSocketClient("127.0.0.1", server.port, server_hostname="localhost") as client:
                refused = await client.open_websocket("/private", "localhost",
                                                      headers=[("accept-encoding", "gzip, br")])
                assert await refused.wait_status() == 403
                await refused.wait_ended()
            h2_seen = await h2_client(server.port, "/echo/x", "client", BROWSER, 2, asyncio.Semaphore(1))
            h1_seen = await h1_client(server.port, "/greet/x", "server", BROWSER, 2, asyncio.Semaphore(1))
            return refused, h2_seen, h1_seen

    refused, h2_seen, h1_seen = asyncio.run(scenario())
    fields = dict(refused.response_headers)
    assert fields["content-encoding"] == "br" and "accept-encoding" in fields["vary"]
    assert decode("br", bytes(refused.response_body)).decode() == ERROR_PAGE
    assert (h2_seen.outcome, h2_seen.status, h2_seen.content_encoding) == ("echoed", 200, None)
    assert (h1_seen.outcome, h1_seen.status, h1_seen.content_encoding) == ("greeted", 101, None)


def test_hold_until_body_releases_the_http2_status_with_the_servers_first_message(cert):
    async def scenario():
        async with lab("hold-until-body", cert) as server:
            gate = asyncio.Semaphore(2)
            return await asyncio.gather(
                h2_client(server.port, "/greet/x?after=0.4", "server", BROWSER, 2, gate),
                h2_client(server.port, "/echo/x", "client", BROWSER, 0.6, gate),
                h1_client(server.port, "/echo/x", "client", BROWSER, 2, gate),  # a 101 goes out at once
                h2_client(server.port, "/echo/x", "client", None, 2, gate),  # nothing offered: not wrapped
            )

    greet, held, h1_echo, plain = asyncio.run(scenario())
    assert greet.outcome == "greeted" and greet.status_s >= 0.4
    assert held.outcome == "gave up"
    assert h1_echo.outcome == "echoed" and plain.outcome == "echoed"


def test_the_lab_runs_alone_and_prints_its_urls(tmp_path):
    with LabAlone(tmp_path, "--behaviour", "fixed", "--port", "0") as alone:
        text = alone.printed
        port = int(re.search(r"lab: fixed listening on https://127\.0\.0\.1:(\d+)", text).group(1))
        assert f"wss://127.0.0.1:{port}/greet" in text and f"--mode reverse:https://127.0.0.1:{port}" in text

        async def clients():
            gate = asyncio.Semaphore(1)
            return (await h2_client(port, "/echo", "client", BROWSER, 2, gate),
                    await h1_client(port, "/greet", "server", BROWSER, 2, gate))

        h2_seen, h1_seen = asyncio.run(clients())
        assert h2_seen.outcome == "echoed" and h1_seen.outcome == "greeted"
    assert alone.returncode == 0, alone.rest
    assert f"HTTP/2 websocket /echo accept-encoding: {BROWSER}" in alone.rest
    assert "HTTP/1.1 websocket /greet" in alone.rest


def test_the_lab_script_sets_itself_up_and_lists_the_behaviours():
    done = subprocess.run([str(ROOT / "scripts" / "lab"), "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for behaviour in Behaviour:
        assert f"  {behaviour.value}: " in done.stdout
    assert "caddyserver/caddy#6733" in done.stdout and "envoyproxy/envoy#14405" in done.stdout


# -- a browser ----------------------------------------------------------------

@chromium.needs_chromium
def test_chromium_opens_greet_directly_and_through_the_proxy(cert, home, tmp_path_factory, report):
    async def browse(server: LabServer, url: str, home) -> str:
        browser = await chromium.start(url, home)
        try:
            return await asyncio.wait_for(server.app.results.get(), 60)
        finally:
            await chromium.stop(browser)

    async def scenario():
        async with lab("hold-until-body", cert) as server:
            direct = await browse(server, f"{server.url}/", home)
            async with Mitmdump("--mode", f"reverse:{server.url}", "--ssl-insecure", report=report) as md:
                proxied = await browse(server, f"https://127.0.0.1:{md.port}/", tmp_path_factory.mktemp("c"))
                # (the page's event stream has its record too)
                record = await md.wait_for_record(event="handshake", kind="websocket")
            return direct, proxied, record, server.app.requests, md

    direct, proxied, record, requests, md = asyncio.run(scenario())
    assert urllib.parse.unquote(direct) == f"greet={GREETING}" == urllib.parse.unquote(proxied)
    greets = [r for r in requests if r[0] == "websocket" and r[2] == "/greet"]
    # Chromium took RFC 8441 both times and offered its codings on the handshake.
    assert len(greets) == 2 and all(r[1] == "2" and "gzip" in r[3] for r in greets)
    assert record["transport"] == "h2" and record["outcome"] == "upgraded"
    assert record["url"].endswith("/greet?after=REDACTED")
    assert_clean_log(md)


# -- HAProxy ------------------------------------------------------------------

@pytest.mark.skipif(not haproxy.available(), reason="HAProxy is not installed (Debian package haproxy)")
def test_haproxy_compresses_the_page_and_passes_the_handshake_through_the_proxy_at_once(cert, tmp_path, report):
    async def scenario():
        async with lab("none", cert) as server:
            front = await Front(server.port, cert, tmp_path).start()
            try:
                async with Mitmdump("--mode", f"reverse:{front.url}", "--ssl-insecure", report=report) as md:
                    page = await h2_get(md.port, "/", "gzip")
                    plain = await h2_get(md.port, "/", None)
                    seen = await h2_client(md.port, "/echo/haproxy", "client", BROWSER, 2, asyncio.Semaphore(1))
                    record = await md.wait_for_record(event="handshake", kind="websocket")
            finally:
                await front.stop()
            return page, plain, seen, record, server.app.requests

    (status, fields, body, _), plain, seen, record, requests = asyncio.run(scenario())
    assert status == 200 and fields["content-encoding"] == "gzip" and decode("gzip", body) == plain[2]
    assert seen.outcome == "echoed" and seen.status == 200 and seen.content_encoding is None
    assert record["upstream_transport"] == "h2" and record["outcome"] == "upgraded" and not record["stalled"]
    # HAProxy made an HTTP/1.1 upgrade of the extended CONNECT, offer unchanged.
    assert ("websocket", "1.1", "/echo/haproxy", BROWSER) in requests
