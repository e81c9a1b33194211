"""An HTTP/2 WebSocket's flow shown as it was on the wire, and the stream's
translated form while mitmproxy's code runs: without sockets."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.proxy import commands
from mitmproxy.proxy.layers.http import HttpResponseHook
from mitmproxy.test import tflow, tutils

from wsencode.h2bridge import translated_while_running
from wsencode.wireform import show_wire_form


def translated_flow(status: int = 101) -> http.HTTPFlow:
    """A handshake as the client's codec hands an extended CONNECT to the
    stream, answered as the upstream's codec (or an HTTP/1.1 upstream) does."""
    request = tutils.treq(method=b"GET", path=b"/chat?room=1", http_version=b"HTTP/2.0", headers=http.Headers(
        [(b"sec-websocket-version", b"13"), (b"sec-websocket-extensions", b"permessage-deflate"),
         (b"x-app", b"kept"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
         (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ==")]
    ))
    headers = [(b"x-served-by", b"app")]
    if status == 101:
        headers += [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                    (b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
                    (b"sec-websocket-extensions", b"permessage-deflate")]
    response = tutils.tresp(status_code=status, reason=b"Switching Protocols" if status == 101 else b"Forbidden",
                            http_version=b"HTTP/1.1", headers=http.Headers(headers))
    return tflow.tflow(req=request, resp=response, ws=status == 101)


def form(f: http.HTTPFlow) -> tuple[str, int]:
    return f.request.method, f.response.status_code


def test_an_upgraded_flow_shows_the_extended_connect_and_the_200_the_client_had():
    f = translated_flow()
    show_wire_form(f)
    assert (f.request.method, f.request.path, f.request.http_version) == ("CONNECT", "/chat?room=1", "HTTP/2.0")
    assert f.request.headers.fields == (
        (b":protocol", b"websocket"), (b"sec-websocket-version", b"13"),
        (b"sec-websocket-extensions", b"permessage-deflate"), (b"x-app", b"kept"),
    )
    assert (f.response.status_code, f.response.reason, f.response.http_version) == (200, "", "HTTP/2.0")
    assert f.response.headers.fields == ((b"x-served-by", b"app"), (b"sec-websocket-extensions", b"permessage-deflate"))


def test_the_stream_gets_the_get_and_101_back_and_the_views_the_wire_form_again():
    f = translated_flow()
    translation = show_wire_form(f)
    translation.translate()
    assert form(f) == ("GET", 101)
    translation.show_wire_form()
    assert form(f) == ("CONNECT", 200)


def test_a_status_an_addon_set_after_the_upgrade_is_left_as_it_is_both_ways():
    f = translated_flow()
    translation = show_wire_form(f)
    f.response.status_code = 403
    translation.translate()
    assert form(f) == ("GET", 403)
    translation.show_wire_form()
    assert form(f) == ("CONNECT", 403)


def test_a_refused_handshake_shows_the_connect_and_keeps_the_status_and_headers_it_got():
    f = translated_flow(status=403)
    translation = show_wire_form(f)
    assert form(f) == ("CONNECT", 403)
    assert (f.response.reason, f.response.headers.fields) == ("Forbidden", ((b"x-served-by", b"app"),))
    translation.translate()
    assert form(f) == ("GET", 403)


# -- the stream's code runs translated; hooks and everything after see the wire form

@dataclass
class Step:
    kind: str  # "hook": the stream starts a hook; "send": a command carried out before the stream resumes


def stream_code(f: http.HTTPFlow, steps: list[Step], seen: list[tuple[str, int]]):
    """A stream's code: notes the form it runs with before each command it yields."""
    for step in steps:
        seen.append(form(f))
        yield HttpResponseHook(f) if step.kind == "hook" else commands.Log(step.kind)
    seen.append(form(f))


@given(st.lists(st.lists(st.sampled_from(["hook", "send", "nested"]), max_size=4), min_size=1, max_size=4))
def test_the_stream_runs_translated_and_every_hook_and_the_end_see_the_wire_form(calls):
    f = translated_flow()
    translation = show_wire_form(f)
    seen: list[tuple[str, int]] = []
    at_hooks: list[tuple[str, int]] = []

    def carry_out(stream_commands, outermost: bool):
        for command in stream_commands:
            if isinstance(command, commands.StartHook):
                at_hooks.append(form(f))
            elif command.message == "nested":
                # carrying a command out calls back into the stream (a codec
                # handing the stream an event), which runs to its end first
                nested = stream_code(f, [Step("hook"), Step("send")], seen)
                carry_out(translated_while_running(nested, translation), outermost=False)
        # the outermost run's end shows the wire form; an inner one's leaves the outer running
        assert form(f) == (("CONNECT", 200) if outermost else ("GET", 101))

    for kinds in calls:
        carry_out(translated_while_running(stream_code(f, [Step(k) for k in kinds], seen), translation), outermost=True)
    assert set(seen) == {("GET", 101)} and set(at_hooks) <= {("CONNECT", 200)}


def test_a_stream_that_fails_leaves_the_wire_form():
    f = translated_flow()
    translation = show_wire_form(f)

    def failing():
        yield commands.Log("one")
        raise RuntimeError("mitmproxy's code failed")

    stream_commands = translated_while_running(failing(), translation)
    next(stream_commands)
    assert form(f) == ("GET", 101)
    try:
        next(stream_commands)
    except RuntimeError:
        pass
    assert form(f) == ("CONNECT", 200)
