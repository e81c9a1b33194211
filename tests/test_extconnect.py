"""The extended CONNECT model's translations, as pure functions of header fields."""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from wsencode.core.extconnect import (
    HTTP1_ONLY, PROTOCOL, accept_for, answer_problem, new_key, protocol_of, stream_fields, success_fields,
    switching_fields, upgrade_fields, with_protocol,
)

names = st.sampled_from([
    b"origin", b"Cookie", b"sec-websocket-version", b"Sec-WebSocket-Protocol", b"sec-websocket-extensions",
    b"connection", b"Upgrade", b"host", b"content-length", b"keep-alive", b"transfer-encoding",
    b"sec-websocket-key", b"sec-websocket-accept", b"x-custom", b":protocol",
])
fields = st.lists(st.tuples(names, st.binary(max_size=8)), max_size=12)


def test_the_flow_of_an_extended_connect_keeps_protocol_first():
    assert with_protocol(b"websocket", [(b"origin", b"x")]) == [(PROTOCOL, b"websocket"), (b"origin", b"x")]
    assert protocol_of(b"CONNECT", [(PROTOCOL, b"websocket")]) == b"websocket"
    assert protocol_of(b"GET", [(PROTOCOL, b"websocket")]) is None  # only a CONNECT is extended
    assert protocol_of(b"CONNECT", [(b"origin", b"x")]) is None  # a tunnel


@given(fields)
def test_what_goes_on_an_http2_or_http3_stream_has_nothing_of_http1(given_fields):
    sent = stream_fields(given_fields)
    assert all(name == name.lower() and name not in HTTP1_ONLY and name != PROTOCOL for name, _ in sent)
    assert len(sent) == len([n for n, _ in given_fields if n != PROTOCOL and n.lower() not in HTTP1_ONLY])


@given(fields)
def test_the_upgrade_for_an_http1_upstream_asks_once_with_the_proxys_key(given_fields):
    key = new_key()
    sent = upgrade_fields(given_fields, key)
    lowered = [name.lower() for name, _ in sent]
    assert PROTOCOL not in lowered and b"host" not in lowered  # (mitmproxy's HTTP/1.1 codec adds Host)
    for name in (b"upgrade", b"connection", b"sec-websocket-key"):
        assert lowered.count(name) == 1
    assert dict(sent)[b"sec-websocket-key"] == key.encode() and len(base64.b64decode(key)) == 16


@given(fields)
def test_an_http1_clients_101_and_an_extended_connects_2xx_carry_the_same_fields(given_fields):
    lowercase = [(n.lower(), v) for n, v in given_fields if n != PROTOCOL]
    key = new_key()
    switching = switching_fields(lowercase, key)
    assert dict((n.lower(), v) for n, v in switching)[b"sec-websocket-accept"] == accept_for(key).encode()
    assert success_fields(switching) == stream_fields(lowercase)


def test_only_a_101_that_answers_the_key_opens_the_websocket():
    key = new_key()
    right = [(b"Upgrade", b"WebSocket"), (b"Sec-WebSocket-Accept", accept_for(key).encode())]
    assert answer_problem(101, right, key) is None
    assert "wrong Sec-WebSocket-Accept" in answer_problem(101, [(b"upgrade", b"websocket")], key)
    assert "other than websocket" in answer_problem(101, [(b"upgrade", b"h2c"), *right[1:]], key)
    assert "instead of switching protocols" in answer_problem(204, right, key)
    # Any other answer is a refusal the client gets as it is.
    assert answer_problem(403, [], key) is None and answer_problem(503, right, key) is None
