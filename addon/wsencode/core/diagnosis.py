"""Sentences that tell a person what happened to a handshake (or an event
stream's opening) and what to try.

Pure functions of a handshake's `Progress`, where it is (`Stage`) and the
encoding it was sent with. They name headers and the `accept-encoding`/
`content-encoding` values (which are not secret, and reach here with control
characters escaped), never other header values or the query.
"""

from __future__ import annotations

from .handshake import is_event_stream_type
from .lifecycle import AnsweredBy, EndCause, Phase, Progress, Stage

STRIP_HINT = "retry with ws_encode_policy=strip to confirm"
# A stalled event stream whose first event came this soon after its head (or
# within a tenth of the wait for the head) came with it: an encoder that held
# the head for the body (Caddy's encode before caddyserver/caddy#7905). A
# server that is only slow flushes its head, and its events come in their time.
HEAD_WITH_FIRST_EVENT_S = 0.05

# Where a handshake that never reached the upstream is held, and why.
HELD_IN_PROXY = {
    Stage.CONNECTING: "still connecting to the upstream",
    Stage.TLS: "still in the TLS handshake with the upstream (for an HTTP/3 upstream, its QUIC handshake)",
    Stage.SETTINGS: (
        "waiting for the HTTP/2 or HTTP/3 upstream's first SETTINGS, which must come before an "
        "extended CONNECT (RFC 8441 section 3, RFC 9220 section 3)"
    ),
    Stage.QUEUED: (
        "queued inside the proxy (behind the upstream connection's MAX_CONCURRENT_STREAMS, "
        "or waiting for an upstream connection)"
    ),
    Stage.INTERCEPTED: "held by interception in the proxy (resume the flow to let it go on)",
}


def _offered(accept_encoding: str | None) -> str:
    if accept_encoding:
        return f"offered accept-encoding: {accept_encoding}"
    return "carried no accept-encoding"


def _client_activity(client_bytes: int) -> str:
    if client_bytes:
        return f"the client sent {client_bytes} bytes on the handshake stream before any status"
    return "the client has sent nothing since"


def _malformed_prefix(progress: Progress) -> str:
    if not progress.handshake.malformed:
        return ""
    return "Malformed handshake (" + "; ".join(progress.handshake.problems) + "). "


def _held(progress: Progress, stage: Stage) -> str:
    if stage is Stage.INTERCEPTED and progress.upstream_status is not None:
        return f"the upstream answered {progress.upstream_status}, but interception in the proxy holds the response"
    return HELD_IN_PROXY[stage]


def _noun(progress: Progress) -> str:
    return "WebSocket handshake" if progress.handshake.is_websocket else "event-stream request"


def _status(progress: Progress) -> str:
    """What the client waits for: a status, or an event stream's response head."""
    return "status" if progress.handshake.is_websocket else "response head"


def stall(progress: Progress, stage: Stage, now: float, accept_encoding: str | None) -> str:
    """Why the status is still missing, said while the client waits."""
    received = progress.received(now)
    waited = progress.waited(now)
    if stage is not Stage.FORWARDED or waited is None:
        return (
            f"{_malformed_prefix(progress)}Stall: no {_status(progress)} {received:.1f} s after the proxy received "
            f"the {_noun(progress)}, which is {_held(progress, stage)}: the upstream has not had it "
            "yet, so neither the upstream nor an encoder is the cause."
        )
    if not progress.handshake.is_websocket:
        head = f"Stall: no response head {waited:.1f} s after an event-stream request that {_offered(accept_encoding)} was forwarded"
        if accept_encoding:
            return (
                f"{head}: an encoding layer upstream is probably holding the head until enough of "
                f"the stream's body has come to compress; {STRIP_HINT}."
            )
        return f"{head}: the upstream is slow to open the stream; the request offered no encoding, so an encoder is not the cause."
    head = (
        f"{_malformed_prefix(progress)}Stall: no status {waited:.1f} s after a WebSocket "
        f"handshake that {_offered(accept_encoding)} was forwarded, and "
        f"{_client_activity(progress.client_bytes_before_status)}"
    )
    if accept_encoding:
        return (
            f"{head}: an encoding layer upstream is probably holding the response "
            f"status until the body starts; {STRIP_HINT}."
        )
    return (
        f"{head}: the upstream is slow or waits for the client to speak first; "
        "the request offered no encoding, so an encoder is not the cause."
    )


def _seconds(progress: Progress, now: float) -> float:
    """Seconds from forwarding when known, else from receipt."""
    waited = progress.waited(now)
    return progress.received(now) if waited is None else waited


def _answered_in_proxy(progress: Progress, outcome: str) -> str | None:
    """The status came from another addon or the user, not the upstream."""
    if progress.answered_by is AnsweredBy.BEFORE_UPSTREAM:
        return (
            f"{outcome} in the proxy: another addon or the user answered {progress.status} before the "
            "upstream had the request, so the upstream never saw this handshake."
        )
    if progress.answered_by is AnsweredBy.CHANGED:
        return (
            f"{outcome} in the proxy: the upstream answered {progress.upstream_status}, and another addon "
            f"or the user changed the status the client got to {progress.status}."
        )
    return None


def _upgraded(progress: Progress, now: float, accept_encoding: str | None) -> str:
    waited = _seconds(progress, now)
    if (in_proxy := _answered_in_proxy(progress, "Upgraded")) is not None:
        return in_proxy
    if progress.bad_accept:
        return (
            "Switched protocols, but the upstream's Sec-WebSocket-Accept does not answer the "
            "client's Sec-WebSocket-Key, so the client will fail the handshake: the upstream, "
            "or something in front of it, mangles WebSocket handshakes."
        )
    if progress.content_encoding:
        return (
            f"Upgraded, but the success response carries content-encoding: "
            f"{progress.content_encoding}: an encoding layer upstream treated the "
            "WebSocket handshake as a compressible response; it should pass upgrades "
            "through untouched (ws_encode_policy=strip removes it)."
        )
    if progress.stalled and accept_encoding and progress.status_with_data:
        # Only a late status that encoding could explain says anything about
        # an encoder; a prompt 200 with its first message in one write is
        # just an efficient server.
        return (
            f"Upgraded after {waited:.1f} s, but the status only arrived together with "
            "the first response data: the fingerprint of an encoder that buffers the "
            f"status until the body starts (the request {_offered(accept_encoding)})."
        )
    if progress.stalled:
        cause = (
            f"an encoding layer holding the status is likely since the request "
            f"{_offered(accept_encoding)}; {STRIP_HINT}"
            if accept_encoding
            else "the upstream was slow; no encoding was offered"
        )
        return f"Upgraded late: the status came {waited:.1f} s after forwarding, {cause}."
    return f"Upgraded after {waited:.2f} s; nothing withheld the status."


def _first_event(progress: Progress, now: float) -> str:
    if progress.first_event_s is not None:
        return f"the first event came {progress.first_event_s:.2f} s after the head"
    head_at = progress.status_at if progress.status_at is not None else now
    until = progress.ended_at if progress.ended_at is not None else now
    ended = "" if progress.end_cause is None else f" before {_ENDED_BY.get(progress.end_cause, 'it ended')}"
    return f"no event came in the {max(0.0, until - head_at):.1f} s after the head{ended}"


_ENDED_BY = {
    EndCause.CLIENT_GONE: "the client left",
    EndCause.UPSTREAM_CLOSED: "the upstream ended it",
    EndCause.PROXY_STOPPED: "the proxy stopped",
    EndCause.KILLED: "it was killed in the proxy",
    EndCause.PROXY_RESET: "the proxy reset it",
}


def _opened(progress: Progress, now: float, accept_encoding: str | None) -> str:
    """An event stream's record: its head came; when did its first event?"""
    waited = _seconds(progress, now)
    if (in_proxy := _answered_in_proxy(progress, "Opened")) is not None:
        return in_proxy
    if progress.content_type is not None and not is_event_stream_type(progress.content_type):
        what = progress.content_type or "without a content-type"
        return (
            f"Opened with status {progress.status} after {waited:.2f} s, but the response is {what}, not "
            "text/event-stream: EventSource fails it at once. Something answered in the event stream's "
            "place (a login or error page, a proxy's), or the endpoint does not serve one."
        )
    first = _first_event(progress, now)
    if (progress.stalled and accept_encoding and progress.first_event_s is not None
            and progress.first_event_s <= max(HEAD_WITH_FIRST_EVENT_S, waited / 10)):
        coded = f", with content-encoding: {progress.content_encoding}" if progress.content_encoding else ""
        return (
            f"Opened after {waited:.1f} s, but the head only came with the first event "
            f"({progress.first_event_s:.2f} s apart{coded}): the fingerprint of an encoding layer that "
            f"holds the head until the body starts (the request {_offered(accept_encoding)}); {STRIP_HINT}."
        )
    if progress.content_encoding:
        return (
            f"Opened after {waited:.2f} s{' (reported as a stall)' if progress.stalled else ''}, "
            f"but the event stream carries content-encoding: "
            f"{progress.content_encoding}, and {first}: an encoding layer upstream compresses it, and "
            "unless it flushes every event the client gets them late or in bursts "
            "(ws_encode_policy=strip stops the offer, to confirm)."
        )
    if progress.stalled:
        cause = (
            f"an encoding layer holding the head is likely since the request "
            f"{_offered(accept_encoding)}; {STRIP_HINT}"
            if accept_encoding
            else "the upstream was slow; no encoding was offered"
        )
        return f"Opened late: the head came {waited:.1f} s after forwarding, {cause}; {first}."
    return f"Opened after {waited:.2f} s, and {first}; nothing withheld the head."


def _rejected(progress: Progress) -> str:
    if progress.answered_by is AnsweredBy.PROXY:
        return (
            f"The proxy failed the handshake (the client got {progress.status}): "
            f"{progress.facts.proxy_refused} for the key the proxy sent (it answered "
            f"{progress.upstream_status}): the upstream, or something in front of it, mangles "
            "WebSocket handshakes."
        )
    if (in_proxy := _answered_in_proxy(progress, "Refused")) is not None:
        return in_proxy
    if progress.handshake.malformed:
        return (
            f"The upstream refused the handshake with status {progress.status}, "
            "probably because the request is malformed."
        )
    if not progress.handshake.is_websocket:
        return f"The upstream answered the event-stream request with status {progress.status}: no stream opened."
    return (
        f"The upstream refused the upgrade with status {progress.status}: the "
        "endpoint does not accept WebSockets here, or refused this client."
    )


def _no_status(progress: Progress, stage: Stage, now: float, accept_encoding: str | None) -> str:
    stalled = " (reported as a stall)" if progress.stalled else ""
    waited = progress.waited(now)
    received = progress.received(now)
    no, it = f"No {_status(progress)}", "handshake" if progress.handshake.is_websocket else "request"
    match progress.end_cause:
        case EndCause.CLIENT_GONE:
            why = (
                "the client gave up"
                + (f" after {received:.1f} s" if received >= 0.05 else "")
                + f" without a {_status(progress)}{stalled}"
            )
            if stage in HELD_IN_PROXY:
                return f"{no}: {why}, while the {it} was {_held(progress, stage)}."
            hint = (
                f"; the request {_offered(accept_encoding)}, so an encoder holding "
                f"the {_status(progress)} is a likely cause — {STRIP_HINT}"
                if accept_encoding and progress.stalled
                else ""
            )
            return f"{no}: {why}{hint}."
        case EndCause.UPSTREAM_CLOSED if waited is not None:
            return (
                f"{no}: the upstream closed or reset the connection {waited:.1f} s "
                f"after the {it} was forwarded, without answering it{stalled}."
            )
        case EndCause.UPSTREAM_CLOSED:
            return f"{no}: the upstream connection failed before the {it} was sent{stalled}."
        case EndCause.UPSTREAM_UNREACHABLE:
            return f"{no}: the proxy could not connect to the upstream."
        case EndCause.PROXY_RESET:
            return f"{no}: the proxy itself reset the stream ({progress.end_reason}){stalled}."
        case EndCause.KILLED:
            answer = (
                "" if progress.upstream_status is None
                else f", after the upstream had answered {progress.upstream_status}"
            )
            return (
                f"{no}: the flow was killed in the proxy (by another addon or the user) "
                f"{received:.1f} s after it arrived{answer}{stalled}."
            )
        case _:
            return f"{no}: the proxy stopped after {received:.1f} s of waiting{stalled}."


def outcome(progress: Progress, stage: Stage, now: float, accept_encoding: str | None) -> str:
    """The sentence for a handshake's final record; `stage` is where it was
    when it ended without a status."""
    match progress.phase:
        case Phase.UPGRADED:
            text = _upgraded(progress, now, accept_encoding)
        case Phase.OPENED:
            text = _opened(progress, now, accept_encoding)
        case Phase.REJECTED:
            text = _rejected(progress)
        case _:
            text = _no_status(progress, stage, now, accept_encoding)
    return _malformed_prefix(progress) + text
