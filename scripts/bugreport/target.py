"""The server under study: its URL, and whether it can be reached at all (TCP, TLS, HTTP/2 with
RFC 8441), and over HTTP/3 with RFC 9220 where it offers that (Alt-Svc: h3) or is asked to. A
WebSocket goes over HTTP/2 and HTTP/3 only where they carry WebSockets; an event stream, a plain
GET, goes over whichever the server speaks.

A failure here is not a stall, and says what to do about it: nothing listens,
the name does not resolve, the certificate is not trusted (`--insecure`).
HTTP/3 that does not come up is not tried, saying why; the rest goes on.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import sys
import urllib.parse
from dataclasses import dataclass

import h11
from aioquic.h3.connection import Setting
from aioquic.quic.configuration import QuicConfiguration
from wspeers import h2ws, h3ws

from wsencode.core.records import WEBSOCKET
from wsencode.report import redact_url

SCHEMES = {"ws": False, "wss": True, "http": False, "https": True}  # scheme -> over TLS


def parse_or_say(url: str, prog: str) -> Target | None:
    """The target of a command line, or None once the reason is printed."""
    try:
        return Target.parse(url)
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None


class Unreachable(Exception):
    """The target cannot be probed; the message says why, for a person."""


@dataclass(frozen=True)
class Target:
    scheme: str  # ws or wss (a WebSocket), http or https (an event stream)
    host: str
    port: int
    path: str  # with the query: what goes on the request line
    authorization: str | None = None  # from userinfo in the URL, as Basic

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ValueError(f"{redact_url(url)!r} is not a ws://, wss://, http:// or https:// URL")
        try:
            port = parts.port or (443 if SCHEMES[parts.scheme] else 80)
        except ValueError:
            raise ValueError(f"{redact_url(url)!r} has no valid port") from None
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        authorization = None
        if parts.username is not None:
            credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
        return cls(parts.scheme, parts.hostname, port, path, authorization)

    @property
    def tls(self) -> bool:
        return SCHEMES[self.scheme]

    @property
    def websocket(self) -> bool:
        """Its URL names a WebSocket (ws://, wss://), not an event stream (http://, https://)."""
        return self.scheme in ("ws", "wss")

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def upstream(self) -> str:
        """mitmproxy's reverse-mode spec for it."""
        return f"{'https' if self.tls else 'http'}://{self.authority}"

    def upstream_h3(self, port: int) -> str:
        """mitmproxy's reverse-mode spec for its HTTP/3 on UDP `port`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http3://{host}:{port}"

    @property
    def url(self) -> str:
        """For printing: redacted like the report's URLs."""
        return redact_url(f"{self.scheme}://{self.authority}{self.path}")


@dataclass(frozen=True)
class Http3:
    """What a direct look at the target's HTTP/3 found."""

    port: int | None  # the UDP port looked at: Alt-Svc's, or the URL's when asked; None: not looked at
    offered: bool  # its responses over TCP name it (Alt-Svc: h3)
    rfc9220: bool = False  # its SETTINGS enable extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL = 1)
    failure: str | None = None  # why no HTTP/3 connection came up

    @property
    def up(self) -> bool:
        """A QUIC connection came up and the server's SETTINGS came."""
        return self.port is not None and self.failure is None

    @property
    def how(self) -> str:
        return f"Alt-Svc: h3, UDP port {self.port}" if self.offered else f"--h3, UDP port {self.port}"

    def describe(self, kind: str = WEBSOCKET) -> str:
        if self.port is None:
            return "no HTTP/3 offered (no Alt-Svc: h3 on its responses)"
        if self.failure:
            return f"HTTP/3 ({self.how}) did not come up: {self.failure}"
        if kind != WEBSOCKET:
            return f"HTTP/3 ({self.how})"
        if not self.rfc9220:
            return (f"HTTP/3 ({self.how}), but without RFC 9220 WebSockets (browsers use HTTP/2 or HTTP/1.1 for "
                    "them there)")
        return f"HTTP/3 ({self.how}) with RFC 9220 WebSockets"

    def not_tried(self, kind: str = WEBSOCKET) -> str:
        """Why its WebSockets (or event streams) are not tried over HTTP/3 ("" when they are)."""
        if self.port is None:
            return "HTTP/3 not tried: the server offers none in Alt-Svc, and --h3 was not given"
        if self.failure:
            return f"HTTP/3 not tried: {self.failure}"
        if self.rfc9220 or kind != WEBSOCKET:
            return ""
        return "HTTP/3 not tried: the server's HTTP/3 does not offer RFC 9220 WebSockets"


@dataclass(frozen=True)
class Reach:
    """What a direct look at the target found."""

    alpn: str | None  # what TLS negotiated (None for ws://)
    rfc8441: bool  # HTTP/2 with SETTINGS_ENABLE_CONNECT_PROTOCOL = 1
    verified: bool  # the certificate was checked
    h3: Http3 = Http3(None, False)

    def describe(self, target: Target, kind: str = WEBSOCKET) -> str:
        if not target.tls:
            return f"plain TCP ({target.scheme}://): HTTP/1.1 only"
        tls = "TLS ok, certificate verified" if self.verified else "TLS ok, certificate not checked (--insecure)"
        if self.alpn != "h2":
            tcp = f"HTTP/1.1 only over TCP (ALPN {self.alpn or 'none'})"
        elif kind != WEBSOCKET:
            tcp = "HTTP/2"
        elif not self.rfc8441:
            tcp = "HTTP/2, but without RFC 8441 WebSockets (browsers use HTTP/1.1 for them there)"
        else:
            tcp = "HTTP/2 with RFC 8441 WebSockets"
        return f"{tls}; {tcp}; {self.h3.describe(kind)}"

    def carries(self, kind: str = WEBSOCKET) -> dict[str, bool]:
        """Whether HTTP/2 and HTTP/3 carry `kind` to the server: a WebSocket needs RFC 8441 and RFC 9220."""
        if kind == WEBSOCKET:
            return {"h2": self.rfc8441, "h3": self.h3.rfc9220}
        return {"h2": self.alpn == "h2", "h3": self.h3.up}

    def transports(self, kind: str = WEBSOCKET) -> list[str]:
        """What the probe tries, as browsers would: HTTP/2 and HTTP/3 where they carry `kind`."""
        carried = self.carries(kind)
        return [t for t in ("h2", "h3", "h1") if carried.get(t, True)]

    def not_tried(self, target: Target, kind: str = WEBSOCKET) -> list[str]:
        """Why a transport is not tried, one phrase each."""
        if not target.tls:
            return [f"HTTP/2 and HTTP/3 not tried: {target.scheme}:// has neither"]
        reasons = []
        if not self.carries(kind)["h2"]:
            reasons.append("HTTP/2 not tried: the server does not offer RFC 8441 WebSockets" if kind == WEBSOCKET
                           else f"HTTP/2 not tried: the server does not speak it (ALPN {self.alpn or 'none'})")
        if self.h3.not_tried(kind):
            reasons.append(self.h3.not_tried(kind))
        return reasons


def _tls_context(target: Target, insecure: bool, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(alpn)
    return context


async def reach(target: Target, insecure: bool, timeout: float, h3: bool = False) -> Reach:
    """Connect to the target directly; raise Unreachable saying why not. Its
    HTTP/3 is looked at where Alt-Svc offers it, or, with `h3`, on the URL's port."""
    where = target.authority
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(target.host, target.port), timeout)
    except ConnectionRefusedError:
        raise Unreachable(f"connection refused by {where}: nothing listens there") from None
    except socket.gaierror as e:
        raise Unreachable(f"cannot resolve {target.host!r}: {e.strerror}") from None
    except asyncio.TimeoutError:
        raise Unreachable(f"no answer from {where} in {timeout:g} s (down, or a firewall drops the packets)") from None
    except OSError as e:
        raise Unreachable(f"cannot connect to {where}: {e.strerror or e}") from None
    writer.close()
    if not target.tls:
        return Reach(None, False, False)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(
            target.host, target.port, ssl=_tls_context(target, insecure, ["h2", "http/1.1"]),
            server_hostname=target.host), timeout)
    except ssl.SSLCertVerificationError as e:
        raise Unreachable(
            f"TLS failed: the certificate of {where} is not trusted ({e.verify_message}); if you trust this "
            "server (a test server with a self-signed certificate), add --insecure") from None
    except ssl.SSLError as e:
        plain = "ws" if target.websocket else "http"
        raise Unreachable(f"TLS failed with {where}: {e.reason or e} (is it a TLS port? {plain}:// is plain)") from None
    except asyncio.TimeoutError:
        raise Unreachable(f"TLS failed: no TLS answer from {where} in {timeout:g} s (is it a TLS port?)") from None
    except (ConnectionError, OSError) as e:
        raise Unreachable(f"TLS failed: {where} closed the connection during the TLS handshake ({e})") from None
    alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
    writer.close()
    rfc8441 = False
    if alpn == "h2":
        try:
            client = await h2ws.H2WebSocketClient(target.host, target.port, server_hostname=target.host).connect(timeout)
            async with client:
                rfc8441 = client.server_enables_connect_protocol
        except (OSError, asyncio.TimeoutError):
            pass  # HTTP/2 did not come up: probe HTTP/1.1 only
    return Reach(alpn, rfc8441, not insecure, await find_h3(target, insecure, timeout, h3))


async def find_h3(target: Target, insecure: bool, timeout: float, asked: bool) -> Http3:
    """Its HTTP/3 where Alt-Svc offers it, else, if `asked`, on the URL's port."""
    port = h3_alternative(await alt_svc(target, insecure, timeout), target.host)
    if port is not None:
        return await look_at_h3(target, port, True, insecure, timeout)
    if asked:
        return await look_at_h3(target, target.port, False, insecure, timeout)
    return Http3(None, False)


async def alt_svc(target: Target, insecure: bool, timeout: float) -> list[str]:
    """The Alt-Svc fields of the origin's answer to GET / over HTTP/1.1 (none if it gives none), as a
    browser's page load finds them. Their values are the server's: never printed."""
    try:
        return await asyncio.wait_for(_alt_svc(target, insecure), timeout)
    except (OSError, asyncio.TimeoutError, h11.ProtocolError):
        return []


async def _alt_svc(target: Target, insecure: bool) -> list[str]:
    reader, writer = await asyncio.open_connection(
        target.host, target.port, ssl=_tls_context(target, insecure, ["http/1.1"]), server_hostname=target.host)
    try:
        conn = h11.Connection(h11.CLIENT)  # (it bounds a response head: 16 KiB)
        writer.write(conn.send(h11.Request(method="GET", target="/",
                                           headers=[("host", target.authority), ("connection", "close")])))
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                return [value.decode("latin-1") for name, value in event.headers if name == b"alt-svc"]
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif not isinstance(event, h11.InformationalResponse):
                return []  # closed before a response
    finally:
        writer.close()


def h3_alternative(fields: list[str], host: str) -> int | None:
    """The UDP port on which Alt-Svc fields offer HTTP/3 for `host` (RFC 7838 §3: `h3=":443"`, the host
    left out or the same), or None. An alternative on another host is not followed."""
    for field_value in fields:
        for entry in field_value.split(","):
            protocol, _, rest = entry.strip().partition("=")
            authority = rest.split(";")[0].strip().strip('"')
            alt_host, colon, port = authority.rpartition(":")
            if protocol == "h3" and colon and alt_host.strip("[]") in ("", host) and port.isdecimal() \
                    and 0 < int(port) < 65536:
                return int(port)
    return None


async def look_at_h3(target: Target, port: int, offered: bool, insecure: bool, timeout: float) -> Http3:
    """Its HTTP/3 on UDP `port`: a QUIC handshake and the server's SETTINGS (RFC 9220 §3)."""
    loop = asyncio.get_running_loop()
    try:
        addresses = await asyncio.wait_for(loop.getaddrinfo(target.host, port, type=socket.SOCK_DGRAM), timeout)
    except (OSError, asyncio.TimeoutError):
        return Http3(port, offered, failure=f"cannot resolve {target.host!r} for UDP")
    address = addresses[0][4]
    configuration = QuicConfiguration(is_client=True, alpn_protocols=h3ws.ALPN, server_name=target.host,
                                      verify_mode=ssl.CERT_NONE if insecure else ssl.CERT_REQUIRED)
    answer: asyncio.Future = loop.create_future()

    def on_event(event) -> None:
        if isinstance(event, (h3ws.SettingsReceived, h3ws.ConnectionClosed)) and not answer.done():
            answer.set_result(event)

    try:
        transport, peer = await h3ws.client_endpoint(
            lambda: h3ws.H3Peer(h3ws.HeldWindowQuic(configuration=configuration), on_event), address,
            remote_addr=True)
    except OSError as e:
        return Http3(port, offered, failure=f"cannot reach UDP port {port}: {e.strerror or e}")
    try:
        peer.connect(address)
        event = await asyncio.wait_for(answer, timeout)
    except asyncio.TimeoutError:
        return Http3(port, offered, failure=f"no QUIC answer on UDP port {port} in {timeout:g} s")
    finally:
        peer.close_connection()
        transport.close()
    if isinstance(event, h3ws.ConnectionClosed):  # (its reason is the server's words: not printed)
        return Http3(port, offered, failure=f"the QUIC connection failed ({h3ws.error_name(event.error_code)})")
    return Http3(port, offered, rfc9220=event.settings.get(Setting.ENABLE_CONNECT_PROTOCOL) == 1)


async def reach_and_say(target: Target, insecure: bool, timeout: float, say, failure: str,
                        h3: bool = False, kind: str = WEBSOCKET) -> Reach | None:
    """`reach`, with what it found said (`say`, one line), or None once `failure` and why are said."""
    try:
        found = await reach(target, insecure, timeout, h3)
    except Unreachable as e:
        say(f"{failure}: {e}")
        return None
    say(f"  target: {found.describe(target, kind)}")
    return found
