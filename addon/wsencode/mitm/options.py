"""The addon's options: declared for mitmproxy, and each value parsed into
what the addon uses, a bad one refused with an error that names the option.

Every option is declared as a string and parsed here. mitmproxy defers a
script's options given at start-up until the script declares them, and then
takes a value its own type or choices refuse without a word: a bool option
set to `maybe` leaves the whole script out, a choice outside its list is
kept. Parsed here, every bad value reaches `configure` and is refused there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import exceptions, flowfilter

from .. import bundle
from ..core.policy import EncodingPolicy
from ..report import printable

BUNDLED_AT_EXIT = 1000  # with ws_encode_bundle set, the last handshakes kept for the bundle written at exit


def parse_policy(value: str) -> EncodingPolicy:
    try:
        return EncodingPolicy(value)
    except ValueError:
        raise ValueError(f"unknown policy {value!r}; use observe, strip or inject") from None


def parse_codings(value: str) -> str:
    # A CR or LF would end the header line and start another one upstream.
    if not value.strip() or printable(value) != value:
        raise ValueError("must be a non-empty accept-encoding value on one line, without control characters")
    return value.strip()


def parse_stall_seconds(value: str) -> float:
    """The ws_encode_stall option as seconds; ValueError names what is wrong."""
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number of seconds") from None
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{value!r} must be a finite number of seconds > 0")
    return seconds


def parse_filter(value: str) -> flowfilter.TFilter | None:
    return flowfilter.parse(value) if value else None


_TRUE, _FALSE = frozenset({"true", "yes", "on", "1"}), frozenset({"false", "no", "off", "0"})


def parse_bool(value: str) -> bool:
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{value!r} is not true or false")


def parse_choice(value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
    return value


def parse_path(value: str) -> Path | None:
    return Path(value).expanduser() if value else None


def parse_bundle_folder(value: str) -> str | None:
    if value:
        try:
            bundle.check_folder(value)
        except bundle.BundleError as e:
            raise ValueError(str(e)) from None
    return value or None


@dataclass(frozen=True)
class Option:
    name: str
    default: str
    help: str
    parse: Callable[[str], Any]


OPTIONS = (
    Option("ws_encode_policy", EncodingPolicy.OBSERVE.value,
           "What to do with encoding on WebSocket handshakes and event-stream requests: observe (forward as is), "
           "strip (remove accept-encoding from the request, and content-encoding from a successful WebSocket "
           "handshake's response), inject (set accept-encoding to ws_encode_codings).", parse_policy),
    Option("ws_encode_codings", "zstd, br, gzip",
           "The accept-encoding value that ws_encode_policy=inject sets on handshakes.", parse_codings),
    Option("ws_encode_stall", "2",
           "Seconds (> 0, e.g. 1.5) a WebSocket handshake may wait for its status, from when the proxy "
           "received it, before a stall is reported.", parse_stall_seconds),
    Option("ws_encode_report", "",
           "Append one JSON object per line for every handshake event to this file (empty: no report).",
           parse_path),
    Option("ws_encode_filter", "",
           "Only handle WebSocket handshakes matching this mitmproxy filter expression (empty: all). "
           "~websocket matches handshakes too.", parse_filter),
    Option("ws_encode_bundle", "",
           f"Write a redacted bug-report bundle of the handshakes seen (the last {BUNDLED_AT_EXIT}, at most "
           f"{bundle.KEPT_BYTES >> 20} MiB in all; of each WebSocket its first {bundle.MESSAGE_BYTES >> 10} KiB of "
           "messages) into this empty folder when mitmproxy exits (empty: none). In the console or mitmweb, the "
           "wsencode.bundle command does it for chosen flows.", parse_bundle_folder),
    Option("ws_encode_h2", "true",
           "Let HTTP/2 clients open WebSockets through the proxy (RFC 8441 extended CONNECT): true or false. "
           "Takes effect for new connections.", parse_bool),
    Option("ws_encode_h3", "true",
           "Let HTTP/3 clients open WebSockets through the proxy (RFC 9220 extended CONNECT): true or false. "
           "false: the proxy does not advertise it, so clients use another way. Takes effect for new connections.",
           parse_bool),
    Option("ws_encode_event_streams", "true",
           "Follow event-stream requests (accept: text/event-stream, as EventSource sends) as well as WebSocket "
           "handshakes: their response head timed and a stall reported, the stream passed through as it comes, "
           "the time to its first event recorded: true or false.", parse_bool),
    Option("ws_encode_h3_upstream", "quic",
           "Where an HTTP/3 client's WebSocket goes: quic (as mitmproxy connects, HTTP/3, falling back to "
           "HTTP/1.1 over TCP when the upstream cannot take it) or tcp (HTTP/2 or HTTP/1.1 over TCP, for origins "
           "behind an HTTP/3 front).", lambda value: parse_choice(value, ("quic", "tcp"))),
)
NAMES = tuple(option.name for option in OPTIONS)


def declare(loader) -> None:
    for option in OPTIONS:
        loader.add_option(option.name, str, option.default, option.help)


def parsed(options, updated: set[str]) -> dict[str, Any]:
    """The updated options' values as the addon uses them; a bad one is an
    OptionsError naming the option (and nothing of the update is taken)."""
    values = {}
    for option in OPTIONS:
        if option.name in updated:
            try:
                values[option.name] = option.parse(getattr(options, option.name))
            except ValueError as e:
                raise exceptions.OptionsError(f"{option.name}: {printable(str(e))}") from None
    return values
