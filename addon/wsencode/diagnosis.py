"""Sentences that tell a person what happened to a handshake and what to try.

Pure functions of a handshake's `Progress` and the encoding it was sent with.
They name headers and the `accept-encoding`/`content-encoding` values (which
are not secret), never other header values or the query.
"""

from __future__ import annotations

from .lifecycle import EndCause, Phase, Progress

STRIP_HINT = "retry with ws_encode_policy=strip to confirm"


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


def stall(progress: Progress, waited: float, accept_encoding: str | None) -> str:
    """Why the status is still missing, said while the client waits."""
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


def _upgraded(progress: Progress, waited: float, accept_encoding: str | None) -> str:
    if progress.content_encoding:
        return (
            f"Upgraded, but the success response carries content-encoding: "
            f"{progress.content_encoding}: an encoding layer upstream treated the "
            "WebSocket handshake as a compressible response; it should pass upgrades "
            "through untouched (ws_encode_policy=strip removes it)."
        )
    if progress.status_with_data:
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


def _rejected(progress: Progress) -> str:
    if progress.bad_accept:
        return (
            f"The upstream switched protocols with a Sec-WebSocket-Accept that does not "
            f"match the key the proxy sent, so the proxy failed the handshake (the client "
            f"got {progress.status}): the upstream, or something in front of it, mangles "
            "WebSocket handshakes."
        )
    if progress.handshake.malformed:
        return (
            f"The upstream refused the handshake with status {progress.status}, "
            "probably because the request is malformed."
        )
    return (
        f"The upstream refused the upgrade with status {progress.status}: the "
        "endpoint does not accept WebSockets here, or refused this client."
    )


def _no_status(progress: Progress, waited: float, accept_encoding: str | None) -> str:
    stalled = " (reported as a stall)" if progress.stalled else ""
    match progress.end_cause:
        case EndCause.CLIENT_GONE:
            why = (
                "the client gave up"
                + (f" after {waited:.1f} s" if waited >= 0.05 else "")
                + f" without a status{stalled}"
            )
            hint = (
                f"; the request {_offered(accept_encoding)}, so an encoder holding "
                f"the status is a likely cause — {STRIP_HINT}"
                if accept_encoding and progress.stalled
                else ""
            )
            return f"No status: {why}{hint}."
        case EndCause.UPSTREAM_CLOSED:
            return (
                f"No status: the upstream closed or reset the connection {waited:.1f} s "
                f"after the handshake was forwarded, without answering it{stalled}."
            )
        case EndCause.UPSTREAM_UNREACHABLE:
            return "No status: the proxy could not connect to the upstream."
        case EndCause.KILLED:
            return f"No status: the flow was killed in the proxy after {waited:.1f} s{stalled}."
        case _:
            return f"No status: the proxy stopped after {waited:.1f} s of waiting{stalled}."


def outcome(progress: Progress, now: float, accept_encoding: str | None) -> str:
    """The sentence for a handshake's final record."""
    waited = progress.waited(now)
    match progress.phase:
        case Phase.UPGRADED:
            text = _upgraded(progress, waited, accept_encoding)
        case Phase.REJECTED:
            text = _rejected(progress)
        case _:
            text = _no_status(progress, waited, accept_encoding)
    return _malformed_prefix(progress) + text
