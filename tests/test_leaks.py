"""Issue 6, leaks: what a client sends must not reach what the proxy shows or keeps.

Through a real mitmdump (reverse mode, flow_detail=0 because mitmproxy's own
flow lines print URLs whole): secrets planted in credentials, cookies, query
and path-parameter values, fragments and userinfo, and control characters
(which let a client start log lines of its own, or drive the terminal that
shows them), are looked for in every log line, report record, flow comment,
flow metadata in a `-w` file, and the wsencode commands' answers
(tests/leakcheck.py).

Each HTTP/1.1 case is a handshake the upstream withholds its 101 from, so
every place the addon writes to gets written: the stall line, comment and
record, the `wsencode.waiting` and `wsencode.stalls` answers, the final record.
"""

from __future__ import annotations

import asyncio
import re

import h2.exceptions
import h2.utilities
import pytest
from conftest import Mitmdump, assert_clean_log
from wspeers.fault_server import Faults, FaultServer
from leakcheck import COMMAND_ANSWERS, FAKE_LINE, command_answers, everything_leaked, flows_in
from rawh2 import RawH2, extended_connect
from wspeers import h2ws

pytestmark = pytest.mark.timeout(60)

STALL = 0.3
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
CREDENTIALS = [
    (b"Authorization", b"Bearer AUTH-SECRET"),
    (b"Cookie", b"sid=COOKIE-SECRET; theme=dark"),
    (b"Proxy-Authorization", b"Basic PROXY-SECRET"),
]
SECRETS = ["AUTH-SECRET", "COOKIE-SECRET", "PROXY-SECRET", "QUERY-SECRET"]


def h2_checks_field_characters() -> bool:
    """h2 4.2 and later (mitmproxy 12's) reject NUL, CR and LF in field values,
    with a message that quotes the value; h2 4.1 (mitmproxy 11's) lets them pass."""
    flags = h2.utilities.HeaderValidationFlags(False, False, False, False)
    block = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"a"), (b"x", b"a\nb")]
    try:
        list(h2.utilities.validate_headers(block, flags))
    except h2.exceptions.ProtocolError:
        return True
    return False


H2_CHECKS_FIELD_CHARACTERS = h2_checks_field_characters()

def run(coro):
    return asyncio.run(coro)


def handshake(target: bytes, *headers: tuple[bytes, bytes], method: bytes = b"GET") -> bytes:
    """Raw bytes of an HTTP/1.1 WebSocket handshake that offers encoding."""
    lines = [
        method + b" " + target + b" HTTP/1.1",
        b"Host: example.test",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + KEY,
        b"Sec-WebSocket-Version: 13",
        *(name + b": " + value for name, value in headers),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def stalled_h1(request: bytes, report, flows_file, *options: str):
    """Send `request` to a withholding upstream through mitmdump; return once
    the handshake stalled, the commands were asked, and the client gave up."""
    server = FaultServer(Faults(withhold_when_encoded=True))
    await server.start()
    md = Mitmdump(
        "--mode", f"reverse:http://127.0.0.1:{server.port}", "--set", f"ws_encode_stall={STALL}",
        "--set", "flow_detail=0", "-w", str(flows_file), "-s", str(COMMAND_ANSWERS), *options,
        report=report,
    )
    async with md:
        _, writer = await asyncio.open_connection("127.0.0.1", md.port)
        writer.write(request)
        await writer.drain()
        stall = await md.wait_for_record(event="stall")
        answers = await command_answers(md.port)
        writer.close()
        end = await md.wait_for_record(event="handshake")
    await server.stop()
    return stall, end, answers, md, server


def assert_nothing_leaked(md, flows_file, answers, end, secrets=SECRETS):
    found = everything_leaked(md, secrets, flows_file, answers)
    assert not found, "\n".join(found)
    assert_clean_log(md)
    # The stalled handshake is in the flow file, with the diagnosis as its comment.
    [flow] = [f for f in flows_in(flows_file) if f.id == end["flow_id"]]
    assert flow.comment and flow.metadata["ws_encode"]["outcome"] == "no-status"


H1_CASES = {
    "credentials folded over two lines": (
        handshake(
            b"/chat?token=QUERY-SECRET",
            (b"Accept-Encoding", b"gzip"),
            (b"Authorization", b"Bearer AUTH-SECRET\r\n FOLDED-AUTH-SECRET"),
            (b"Cookie", b"sid=COOKIE-SECRET\r\n\tFOLDED-COOKIE-SECRET"),
            (b"Proxy-Authorization", b"Basic PROXY-SECRET"),
        ),
        None,
    ),
    "accept-encoding folded into a log line of its own": (
        handshake(b"/chat?token=QUERY-SECRET", (b"Accept-Encoding", b"gzip\r\n " + FAKE_LINE.encode()), *CREDENTIALS),
        None,
    ),
    "accept-encoding with terminal escapes": (
        handshake(b"/chat", (b"Accept-Encoding", b"gzip\x1b[2K\x1b[1G, br\x7f\xc2\x85"), *CREDENTIALS),
        None,
    ),
    "control characters in the path": (
        handshake(b"/chat\x1b[2J\x7f\x00x\x01?token=QUERY-SECRET", (b"Accept-Encoding", b"gzip"), *CREDENTIALS),
        None,
    ),
    "control characters in the method": (
        handshake(b"/chat", (b"Accept-Encoding", b"gzip"), *CREDENTIALS, method=b"\x1b[31mGET"),
        None,
    ),
    "bytes that are not UTF-8 in the path": (
        handshake(b"/chat\xff\xfe\xc3?token=QUERY-SECRET", (b"Accept-Encoding", b"gzip"), *CREDENTIALS),
        None,
    ),
}


def _h1_params():
    for name, (request, defect) in H1_CASES.items():
        marks = [pytest.mark.xfail(strict=True, reason=defect)] if defect else []
        yield pytest.param(request, id=name, marks=marks)


@pytest.mark.parametrize("request_bytes", list(_h1_params()))
def test_h1_nothing_a_client_sent_leaks(report, tmp_path, request_bytes):
    flows_file = tmp_path / "flows.mitm"
    stall, end, answers, md, server = run(stalled_h1(request_bytes, report, flows_file))
    assert server.received and "accept-encoding" in server.received[0].headers  # the upstream withheld its 101
    assert stall["flow_id"] == end["flow_id"] and end["outcome"] == "no-status" and end["stalled"]
    assert any("stall" in a.lower() for a in answers["wsencode.stalls"])
    assert_nothing_leaked(md, flows_file, answers, end, SECRETS + ["FOLDED-AUTH-SECRET", "FOLDED-COOKIE-SECRET"])


PATH_SECRETS = ["PATH-SECRET", "PARAM-SECRET", "SEGMENT-SECRET", "QUERY-SECRET", "FRAGMENT-SECRET"]


def test_h1_path_parameters_and_fragments_are_redacted(report, tmp_path):
    flows_file = tmp_path / "flows.mitm"
    request = handshake(
        b"/chat;jsessionid=PATH-SECRET;lang=PARAM-SECRET/room;v=SEGMENT-SECRET;flag"
        b"?token=QUERY-SECRET&room=QUERY-SECRET#FRAGMENT-SECRET",
        (b"Accept-Encoding", b"gzip"),
    )
    stall, end, answers, md, server = run(stalled_h1(request, report, flows_file))
    # The upstream got the target as the client sent it; only what the proxy shows is redacted.
    assert "PATH-SECRET" in server.received[0].target
    assert re.fullmatch(
        rf"http://127\.0\.0\.1:{server.port}/chat;jsessionid=REDACTED;lang=REDACTED/room;v=REDACTED;REDACTED"
        r"\?token=REDACTED&room=REDACTED(#REDACTED)?",
        end["url"],
    ), end["url"]
    assert_nothing_leaked(md, flows_file, answers, end, PATH_SECRETS)


def test_h1_userinfo_in_a_kept_host_header_is_redacted(report, tmp_path):
    """With keep_host_header, the URL the addon shows takes its host from the
    client's Host header, userinfo and all."""
    flows_file = tmp_path / "flows.mitm"
    request = handshake(b"/chat", (b"Accept-Encoding", b"gzip")).replace(
        b"Host: example.test", b"Host: user:USERINFO-SECRET@127.0.0.1"
    )
    stall, end, answers, md, server = run(
        stalled_h1(request, report, flows_file, "--set", "keep_host_header=true")
    )
    assert end["url"] == "http://REDACTED@127.0.0.1/chat"
    assert_nothing_leaked(md, flows_file, answers, end, ["USERINFO-SECRET", "user:"])


# -- HTTP/2 -----------------------------------------------------------------


def reverse_h2(port: int, report, flows_file, *options: str) -> Mitmdump:
    return Mitmdump(
        "--mode", f"reverse:https://127.0.0.1:{port}", "--ssl-insecure", "--set", f"ws_encode_stall={STALL}",
        "--set", "flow_detail=0", "-w", str(flows_file), "-s", str(COMMAND_ANSWERS), *options,
        report=report,
    )


H2_SECRET_STREAMS = [
    # (header block, end_stream)
    (extended_connect(b"/a", b"localhost", (b"authorization", b"Bearer H2-AUTH-SECRET\n" + FAKE_LINE.encode())), False),
    ([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/b"), (b":authority", b"localhost"),
      (b"cookie", b"sid=H2-COOKIE-SECRET\rX")], True),
    (extended_connect(b"/c", b"localhost", (b"proxy-authorization", b"Basic H2-PROXY-SECRET\x00x")), False),
    (extended_connect(b"/d?token=H2-QUERY-SECRET", b"localhost", (b"authorization", b" H2-SPACED-SECRET ")), False),
    (extended_connect(b"/e?token=H2-QUERY-SECRET", b"localhost", (b"authorization", b"Bearer H2-PLAIN-SECRET")), False),
]
H2_SECRETS = ["H2-AUTH-SECRET", "H2-COOKIE-SECRET", "H2-PROXY-SECRET", "H2-QUERY-SECRET", "H2-SPACED-SECRET",
              "H2-PLAIN-SECRET"]


async def h2_streams(cert, report, flows_file, streams, **server_options):
    """Open a sibling WebSocket, send `streams` beside it on the same
    connection, wait until each has its answer, and check the sibling."""
    async with h2ws.H2WebSocketServer(*cert, **server_options) as upstream:
        async with reverse_h2(upstream.port, report, flows_file) as md:
            client = await RawH2(md.port).connect()
            sibling = await client.open_websocket(b"/sibling")
            assert await sibling.echo("before") == "before"
            sids = [client.send(headers, end_stream) for headers, end_stream in streams]
            await client.wait_until(lambda: all(client.settled(s) for s in sids))
            after = await sibling.echo("after")
            answers = await command_answers_h2(md)
            outcomes = {s: client.status.get(s, f"reset:{client.reset.get(s)}") for s in sids}
            await client.close()
            await md.wait_for_record(event="handshake", url=f"https://127.0.0.1:{upstream.port}/sibling")
        return outcomes, after, answers, md


async def command_answers_h2(md: Mitmdump) -> dict:
    # The proxy answers these itself; over HTTP/1.1 on a second connection.
    return await command_answers(md.port)


def test_h2_header_values_with_control_characters_stay_out_of_the_log(cert, report, tmp_path):
    flows_file = tmp_path / "flows.mitm"
    outcomes, after, answers, md = run(h2_streams(cert, report, flows_file, H2_SECRET_STREAMS))
    assert after == "after"  # the sibling WebSocket outlived its hostile neighbours
    sids = sorted(outcomes)
    if H2_CHECKS_FIELD_CHARACTERS:
        # NUL, CR, LF and surrounding whitespace reset their stream only.
        assert [outcomes[s] for s in sids] == ["reset:1"] * 4 + [200]
    else:
        assert outcomes[sids[-1]] == 200
    found = everything_leaked(md, H2_SECRETS, flows_file, answers)
    assert not found, "\n".join(found)
    assert_clean_log(md)


def test_h2_accept_encoding_cannot_start_a_log_line(cert, report, tmp_path):
    """On h2 4.1 the value reaches the stall diagnosis (which must escape
    it); on 4.4 the bridge resets the stream and its log line quotes h2's
    message, raw line feed included."""
    flows_file = tmp_path / "flows.mitm"
    streams = [(extended_connect(b"/ae", b"localhost", (b"accept-encoding", b"gzip\n" + FAKE_LINE.encode())), False)]

    async def scenario():
        async with h2ws.H2WebSocketServer(*cert, withhold_status_when_encoding=True) as upstream:
            async with reverse_h2(upstream.port, report, flows_file) as md:
                client = await RawH2(md.port).connect()
                sibling = await client.open_websocket(b"/sibling")
                [sid] = [client.send(headers, end_stream) for headers, end_stream in streams]
                if H2_CHECKS_FIELD_CHARACTERS:
                    await client.wait_until(lambda: client.settled(sid))
                else:
                    await md.wait_for_record(event="stall")
                answers = await command_answers(md.port)
                after = await sibling.echo("after")
                await client.close()
                await md.wait_for_record(event="handshake", url=f"https://127.0.0.1:{upstream.port}/sibling")
            return after, answers, md

    after, answers, md = run(scenario())
    assert after == "after"
    found = everything_leaked(md, [], flows_file, answers)
    assert not found, "\n".join(found)
    assert_clean_log(md)


def test_h2_path_parameters_and_fragments_are_redacted(cert, report, tmp_path):
    flows_file = tmp_path / "flows.mitm"
    streams = [(extended_connect(b"/chat;jsessionid=PATH-SECRET;v=PARAM-SECRET?token=QUERY-SECRET#FRAGMENT-SECRET"), False)]
    outcomes, after, answers, md = run(h2_streams(cert, report, flows_file, streams))
    assert list(outcomes.values()) == [200] and after == "after"
    [record] = [r for r in md.records() if r["event"] == "handshake" and "/chat" in r["url"]]
    assert re.fullmatch(
        r"https://127\.0\.0\.1:\d+/chat;jsessionid=REDACTED;v=REDACTED\?token=REDACTED(#REDACTED)?", record["url"]
    ), record["url"]
    found = everything_leaked(md, PATH_SECRETS, flows_file, answers)
    assert not found, "\n".join(found)


def test_h1_userinfo_of_a_refused_handshake_is_redacted(report, tmp_path):
    flows_file = tmp_path / "flows.mitm"

    async def scenario():
        server = FaultServer(Faults())
        await server.start()
        async with Mitmdump(
            "--mode", f"reverse:http://127.0.0.1:{server.port}", "--set", "flow_detail=0", "-w", str(flows_file),
            report=report,
        ) as md:
            request = handshake(b"/chat#FRAGMENT-SECRET", (b"Bad Name", b"x")).replace(
                b"Host: example.test", b"Host: user:USERINFO-SECRET@example.test"
            )
            reader, writer = await asyncio.open_connection("127.0.0.1", md.port)
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.close()
            await md.wait_for_record(event="handshake")
        await server.stop()
        return head, md

    head, md = run(scenario())
    assert head.startswith(b"HTTP/1.1 400")  # mitmproxy's own refusal: invalid header name
    found = everything_leaked(md, ["USERINFO-SECRET", "FRAGMENT-SECRET"], flows_file)
    assert not found, "\n".join(found)
