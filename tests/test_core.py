"""The pure core: classification, lifecycle, diagnosis, redaction, policy."""

from __future__ import annotations

import base64
import hashlib

import pytest
from conftest import extended_connect_request, handshake_request as request
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.test import tutils

import wsproto
import wsproto.events
from wsproto.frame_protocol import FrameProtocol

from wsencode.core import diagnosis
from wsencode.core.frames import client_messages, whole_messages_length
from wsencode.bridge.common import without_values
from wsencode.core.extconnect import accept_for
from wsencode.core.handshake import Transport, classify, tokens
from wsencode.core.lifecycle import TRANSITIONS, AnsweredBy, EndCause, HandshakeEnded, Phase, Progress, Stage, who_answered
from wsencode.core.policy import EncodingPolicy
from wsencode.core.streamfacts import StreamFacts
from wsencode.report import REDACTED, _redact_parsed, redact_url



# -- classification -------------------------------------------------------


def test_plain_request_is_not_a_handshake():
    assert classify(tutils.treq()) is None
    assert classify(request(upgrade="h2c")) is None
    assert classify(request(upgrade=None)) is None


@pytest.mark.parametrize(
    "upgrade,connection",
    [
        ("websocket", "Upgrade"),
        ("WebSocket", "upgrade"),
        ("websocket", ",,\t,  , ,Upgrade  ,,"),
        ("websocket", "keep-alive, Upgrade"),
        ("  websocket  ", "UPGRADE"),
        ("websocket/13", "upgrade"),
    ],
)
def test_well_formed_handshakes(upgrade, connection):
    hs = classify(request(upgrade=upgrade, connection=connection))
    assert hs is not None and hs.transport is Transport.H1
    assert hs.problems == ()


@pytest.mark.parametrize(
    "headers,problem",
    [
        (dict(sec_websocket_key=None), "Sec-WebSocket-Key is missing"),
        (dict(sec_websocket_key="c2hvcnQ="), "Sec-WebSocket-Key decodes to 5 bytes, not 16"),
        (dict(sec_websocket_key="!!not base64!!"), "Sec-WebSocket-Key is not base64"),
        (dict(sec_websocket_version="8"), "Sec-WebSocket-Version is not 13"),
        (dict(sec_websocket_version=None), "Sec-WebSocket-Version is missing"),
        (dict(upgrade="h2c, websocket"), "Upgrade offers other protocols besides websocket"),
        (dict(upgrade="http/3.0, websocket"), "Upgrade offers other protocols besides websocket"),
        (dict(connection="keep-alive"), "Connection does not list upgrade"),
    ],
)
def test_malformed_handshakes_are_still_handshakes(headers, problem):
    hs = classify(request(**headers))
    assert hs is not None and hs.malformed
    assert problem in hs.problems


def test_method_other_than_get_is_a_problem():
    hs = classify(request(method="POST"))
    assert hs is not None and "the method is POST, not GET" in hs.problems


@pytest.mark.parametrize("version,transport", [("HTTP/2.0", Transport.H2), ("HTTP/3", Transport.H3)])
def test_an_extended_connect_is_a_handshake_that_succeeds_with_any_2xx(version, transport):
    hs = classify(extended_connect_request(version))
    assert hs.transport is transport and hs.problems == ()
    assert hs.is_success(200) and hs.is_success(204) and not hs.is_success(101) and not hs.is_success(403)


def test_an_extended_connect_for_another_protocol_or_without_version_13():
    assert classify(extended_connect_request(protocol="connect-udp")) is None
    assert classify(extended_connect_request(sec_websocket_version=None)).problems == ("Sec-WebSocket-Version is missing",)
    plain = extended_connect_request()
    plain.headers.pop(":protocol")
    assert classify(plain) is None  # a tunnel


def test_http1_success_is_101_only():
    hs = classify(request())
    assert hs.is_success(101) and not hs.is_success(200)


@given(st.lists(st.text(alphabet=" ,\tUpgradewbsockt", max_size=20), max_size=4))
def test_tokens_never_contain_separators_or_blanks(values):
    for token in tokens(values):
        assert token and token == token.strip().lower() and "," not in token


@given(st.dictionaries(st.sampled_from(["upgrade", "connection", "sec-websocket-key",
                                        "sec-websocket-version", "accept-encoding"]),
                       st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)))
def test_classify_never_raises(headers):
    # Any character: a key that is not ASCII once made base64 raise (in the
    # bridge's stream, which ended the client's connection).
    req = tutils.treq()
    req.headers.clear()
    req.headers["upgrade"] = "websocket"  # (so the rest is read; drawn, it is replaced)
    for k, v in headers.items():
        req.headers[k] = v
    hs = classify(req)
    if hs is not None:
        assert all(isinstance(p, str) for p in hs.problems)


def test_accept_for_a_key_of_any_bytes():
    # mitmproxy decodes a byte that is not UTF-8 to a lone surrogate; the
    # accept is the hash of the bytes the client sent.
    assert accept_for("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 section 1.3
    assert accept_for("\udcff") == base64.b64encode(hashlib.sha1(b"\xff258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()


# -- lifecycle ------------------------------------------------------------


def progress(**headers) -> Progress:
    return Progress(classify(request(**headers)), received_at=99.5, facts=StreamFacts(forwarded_at=100.0))


def h2_progress() -> Progress:
    return Progress(classify(extended_connect_request()), received_at=99.5, facts=StreamFacts(forwarded_at=100.0))


def answer(p: Progress, status: int, now: float, with_data: bool = False, **kwargs) -> Phase:
    """The upstream answers `status` (read with its first data, or not), and the client gets it."""
    p.facts.answer_status = p.facts.upstream_status = status
    p.facts.status_with_data = with_data
    return p.status_arrived(status, now=now, **kwargs)


def test_every_transition_leaves_a_waiting_phase():
    for (phase, _event), nxt in TRANSITIONS.items():
        assert not phase.final
        assert nxt is not phase


def test_stall_then_status():
    p = progress()
    p.stall()
    assert p.phase is Phase.STALLED and not p.phase.final
    assert answer(p, 101, now=103.5) is Phase.UPGRADED
    assert p.stalled and p.waited(now=999) == 3.5


def test_final_phases_take_no_more_events():
    p = progress()
    answer(p, 403, now=101)
    assert p.phase is Phase.REJECTED
    with pytest.raises(HandshakeEnded):
        p.end(EndCause.CLIENT_GONE, now=102)
    with pytest.raises(HandshakeEnded):
        p.stall()


def test_stall_is_reported_once():
    p = progress()
    p.stall()
    with pytest.raises(HandshakeEnded):
        p.stall()


def test_waited_counts_to_now_while_waiting():
    p = progress()
    assert p.waited(now=102.25) == 2.25
    assert p.received(now=102.25) == 2.75
    p.end(EndCause.UPSTREAM_CLOSED, now=104)
    assert p.waited(now=500) == 4
    assert p.received(now=500) == 4.5


def test_a_handshake_never_forwarded_has_waited_nothing():
    p = Progress(classify(request()), received_at=10.0, facts=StreamFacts())
    assert p.waited(now=13) is None
    assert p.received(now=13) == 3


# -- diagnosis ------------------------------------------------------------


def test_stall_sentences_depend_on_the_offered_encoding():
    p = progress()
    with_enc = diagnosis.stall(p, Stage.FORWARDED, 102.0, "gzip, zstd")
    without = diagnosis.stall(p, Stage.FORWARDED, 102.0, None)
    assert "accept-encoding: gzip, zstd" in with_enc and "ws_encode_policy=strip" in with_enc
    assert "2.0 s after" in with_enc
    assert "encoder is not the cause" in without


@pytest.mark.parametrize(
    "stage,words",
    [
        (Stage.CONNECTING, "connecting to the upstream"),
        (Stage.TLS, "TLS handshake"),
        (Stage.SETTINGS, "SETTINGS"),
        (Stage.QUEUED, "queued inside the proxy"),
        (Stage.INTERCEPTED, "interception"),
    ],
)
def test_a_stall_inside_the_proxy_never_blames_the_upstream(stage, words):
    p = Progress(classify(request()), received_at=100.0, facts=StreamFacts())
    text = diagnosis.stall(p, stage, 103.0, "gzip")
    assert words in text and "3.0 s after the proxy received" in text
    assert "neither the upstream nor an encoder is the cause" in text
    assert "strip" not in text


def test_outcome_sentences_are_distinct():
    sentences = set()

    def say(p: Progress, ae="gzip", stage=Stage.FORWARDED) -> str:
        text = diagnosis.outcome(p, stage, now=110, accept_encoding=ae)
        sentences.add(text)
        return text

    clean = progress()
    answer(clean, 101, now=100.01)
    assert "nothing withheld" in say(clean)

    late = progress()
    late.stall()
    answer(late, 101, now=105)
    assert "late" in say(late) and "5.0 s" in say(late)

    coded = progress()
    answer(coded, 101, now=101, content_encoding="br")
    assert "content-encoding: br" in say(coded)

    with_data = h2_progress()
    with_data.stall()
    answer(with_data, 200, now=103, with_data=True)
    assert "together with the first response data" in say(with_data)

    bad_accept = progress()
    answer(bad_accept, 101, now=101, bad_accept=True)
    assert "the client will fail the handshake" in say(bad_accept)

    rejected = progress()
    answer(rejected, 403, now=101)
    assert "status 403" in say(rejected)

    for cause, words in [
        (EndCause.CLIENT_GONE, "client gave up"),
        (EndCause.UPSTREAM_CLOSED, "upstream closed or reset"),
        (EndCause.UPSTREAM_UNREACHABLE, "could not connect"),
        (EndCause.KILLED, "killed"),
        (EndCause.PROXY_STOPPED, "proxy stopped"),
        (EndCause.PROXY_RESET, "proxy itself reset the stream (too much early data)"),
    ]:
        p = progress()
        p.end(cause, now=103, reason="too much early data")
        assert words in say(p)

    queued = progress()
    queued.end(EndCause.CLIENT_GONE, now=103)
    assert "while the handshake was queued inside the proxy" in say(queued, stage=Stage.QUEUED)

    malformed = progress(sec_websocket_key=None)
    answer(malformed, 400, now=101)
    assert say(malformed).startswith("Malformed handshake (Sec-WebSocket-Key is missing)")
    assert len(sentences) == 14


def test_status_with_data_says_nothing_of_encoders_when_the_status_was_prompt():
    """A server that sends its 200 and first message in one write is just efficient."""
    prompt = h2_progress()
    answer(prompt, 200, now=100.001, with_data=True)
    assert "nothing withheld" in diagnosis.outcome(prompt, Stage.DONE, 110, None)
    assert "nothing withheld" in diagnosis.outcome(prompt, Stage.DONE, 110, "gzip")
    late_no_offer = h2_progress()
    late_no_offer.stall()
    answer(late_no_offer, 200, now=103, with_data=True)
    text = diagnosis.outcome(late_no_offer, Stage.DONE, 110, None)
    assert "encoder" not in text and "no encoding was offered" in text


# -- redaction ------------------------------------------------------------


def test_redact_url_keeps_names_and_drops_values():
    url = "https://user:pw@example.test:8443/chat?token=abc&room=lobby&flag#frag"
    assert redact_url(url) == (
        f"https://{REDACTED}@example.test:8443/chat?token={REDACTED}&room={REDACTED}&{REDACTED}#{REDACTED}"
    )


def test_redact_url_drops_path_parameter_values():
    url = "https://example.test/app;v=2/chat;jsessionid=SECRET;bare?token=x"
    assert redact_url(url) == f"https://example.test/app;v={REDACTED}/chat;jsessionid={REDACTED};{REDACTED}?token={REDACTED}"


@given(st.text())
def test_no_control_character_survives_redaction(path):
    redacted = redact_url("http://example.test/" + path)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in redacted)


def test_redact_url_escapes_lone_surrogates():
    url = b"http://example.test/\xff\xfe?token=x".decode("utf-8", "surrogateescape")
    redacted = redact_url(url)
    redacted.encode("utf-8")  # a flow holding it can be saved
    assert redacted == "http://example.test/\\udcff\\udcfe?token=REDACTED"


def test_redact_url_finds_userinfo_without_a_scheme():
    assert redact_url("://user:pw@example.test:443/chat?t=1") == f"://{REDACTED}@example.test:443/chat?t={REDACTED}"


def test_redact_url_escapes_control_characters():
    assert redact_url("http://example.test/a\nb\x1b[2J") == "http://example.test/a\\x0ab\\x1b[2J"


@given(
    st.lists(
        st.tuples(st.from_regex(r"[a-z]{1,8}", fullmatch=True), st.from_regex(r"[A-Za-z0-9%._~-]{4,12}", fullmatch=True)),
        min_size=1,
        max_size=5,
    )
)
def test_no_query_value_survives(pairs):
    url = "http://example.test/p?" + "&".join(f"{k}=SECRET{v}" for k, v in pairs)
    assert "SECRET" not in redact_url(url)


# URLs from the pieces that matter to a parser: delimiters, brackets, spaces,
# controls, non-ASCII (a fullwidth number sign NFKC makes "#"), surrogates.
URL_PIECES = ["a", "Z", "0", ".", "-", "_", "~", ":", "@", "%", "%2F", "/", "//", "?", "#", ";", "&", "=", "[", "]",
              "!", "+", ",", "'", " ", "\t", "\n", "\\", "\u00e9", "\uff03", "\x00", "\x85", "\udcff", "token", "80"]
url_parts = st.lists(st.sampled_from(URL_PIECES), max_size=8).map("".join)


@given(st.sampled_from(["http", "https", "ws", "HTTP", "x", "", "h2c+x"]), url_parts, url_parts, url_parts)
def test_a_plain_url_is_redacted_as_the_full_parse_does(scheme, host, path, query):
    # redact_url takes a shortcut for URLs with nothing to escape; whatever
    # it answers, the parse would have too, and neither ever raises.
    for url in (f"{scheme}://{host}/{path}?{query}", f"{scheme}://{host}{path}", f"{scheme}://example.test:8443/{path}?{query}"):
        assert redact_url(url) == _redact_parsed(url)


def test_a_host_urlsplit_refuses_is_still_redacted():
    assert redact_url("http://[abc/chat?token=x") == f"http://%5Babc/chat?token={REDACTED}"
    assert redact_url("http://a\uff03b/chat?token=x") == f"http://a%EF%BC%83b/chat?token={REDACTED}"


# -- policy ---------------------------------------------------------------


def test_policies_on_request_headers():
    for policy, before, after in [
        (EncodingPolicy.OBSERVE, "gzip", "gzip"),
        (EncodingPolicy.STRIP, "gzip", None),
        (EncodingPolicy.STRIP, None, None),
        (EncodingPolicy.INJECT, None, "zstd, br"),
        (EncodingPolicy.INJECT, "gzip", "zstd, br"),
    ]:
        req = request(accept_encoding=before)
        policy.apply_to_request(req.headers, "zstd, br")
        assert req.headers.get("accept-encoding") == after, policy


def test_only_strip_touches_a_success_response():
    for policy in EncodingPolicy:
        resp = tutils.tresp()
        resp.headers["content-encoding"] = "gzip"
        policy.apply_to_success(resp.headers)
        assert ("content-encoding" in resp.headers) == (policy is not EncodingPolicy.STRIP)


# -- frame boundaries -----------------------------------------------------


@given(
    st.lists(st.lists(st.binary(max_size=70_000), min_size=1, max_size=3), min_size=1, max_size=3),
    st.booleans(),
    st.data(),
)
def test_whole_messages_length_finds_where_no_message_is_half_sent(messages, masked, data):
    """Messages of one or more fragments, with a ping between fragments, as
    wsproto writes them; any prefix is cut back to the last message's end."""
    proto = FrameProtocol(client=masked, extensions=[])
    stream = b""
    boundaries = [0]
    for fragments in messages:
        for i, fragment in enumerate(fragments):
            stream += bytes(proto.send_data(fragment, fin=i == len(fragments) - 1))
            if i < len(fragments) - 1:
                stream += bytes(proto.ping(b"p"))  # control frames may come between fragments
        boundaries.append(len(stream))
    cut = data.draw(st.integers(0, len(stream)))
    assert whole_messages_length(stream[:cut]) == max(b for b in boundaries if b <= cut)


@given(st.lists(st.tuples(st.booleans(), st.lists(st.text(max_size=300), min_size=1, max_size=3)), max_size=4),
       st.booleans())
def test_client_messages_are_the_whole_messages_a_client_sent(messages, then_half):
    """Text or binary messages in masked fragments with pings between, as a
    client writes them, come back whole and in order; a message still half
    sent is not one yet."""
    client = wsproto.Connection(wsproto.ConnectionType.CLIENT)
    stream, expected = b"", []
    for binary, fragments in messages:
        for i, text in enumerate(fragments):
            data = text.encode() if binary else text
            last = i == len(fragments) - 1
            event = wsproto.events.BytesMessage(data, message_finished=last) if binary else \
                wsproto.events.TextMessage(data, message_finished=last)
            stream += client.send(event)
            if not last:
                stream += client.send(wsproto.events.Ping(b"p"))
        expected.append((2 if binary else 1, "".join(fragments).encode()))
    if then_half:
        stream += client.send(wsproto.events.TextMessage("unfinished", message_finished=False))
    assert [(opcode, payload) for opcode, payload, _ in client_messages(stream)] == expected


def test_a_compressed_frame_ends_what_may_go_upstream_raw():
    from wsproto.extensions import PerMessageDeflate

    plain = bytes(FrameProtocol(client=True, extensions=[]).send_data("plain", fin=True))
    deflate = PerMessageDeflate()
    deflate._enabled = True  # as if negotiated: the frame carries the compressed flag
    compressed = bytes(FrameProtocol(client=True, extensions=[deflate]).send_data("squeezed", fin=True))
    assert compressed[0] & 0x40
    assert whole_messages_length(plain + compressed + plain) == len(plain)


def test_without_values_keeps_pseudo_header_names_only():
    assert without_values("Received header value surrounded by whitespace b'Bearer s3cret '") == (
        "Received header value surrounded by whitespace <value>"
    )
    assert without_values("Header block missing mandatory b':path' header") == (
        "Header block missing mandatory b':path' header"
    )
    assert "s3cret" not in without_values("Unknown pseudo headers: {b':x': b's3cret'}")
    assert "TOPSECRET" not in without_values("""Received header value b'sid=x\\'"TOPSECRET '""")
    assert "s3cret" not in without_values("Value b':s3cret' is bad")


@pytest.mark.parametrize("facts,got,who", [
    (StreamFacts(answer_status=101), 101, AnsweredBy.UPSTREAM),
    (StreamFacts(answer_status=101), 403, AnsweredBy.CHANGED),
    (StreamFacts(), 403, AnsweredBy.BEFORE_UPSTREAM),
    (StreamFacts(answer_status=502, proxy_refused="a wrong accept"), 502, AnsweredBy.PROXY),
])
def test_who_answered_the_status_the_client_got(facts, got, who):
    assert who_answered(facts, got) is who


def test_a_status_from_the_proxy_is_never_blamed_on_the_upstream():
    before = progress()
    before.status_arrived(403, now=101)  # nothing came from upstream
    text = say_outcome(before)
    assert before.answered_by is AnsweredBy.BEFORE_UPSTREAM and "upstream never saw" in text
    changed = progress()
    changed.facts.answer_status = changed.facts.upstream_status = 101
    changed.status_arrived(403, now=101)
    assert "the upstream answered 101" in say_outcome(changed) and "changed the status" in say_outcome(changed)
    for p in (before, changed):
        assert "upstream refused" not in say_outcome(p)


def say_outcome(p: Progress) -> str:
    return diagnosis.outcome(p, Stage.DONE, 110, None)
