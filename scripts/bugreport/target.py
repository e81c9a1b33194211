"""The server under study: its URL, and whether it can be reached at all (TCP, TLS, HTTP/2 with RFC 8441).

A failure here is not a stall, and says what to do about it: nothing listens,
the name does not resolve, the certificate is not trusted (`--insecure`).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import sys
import urllib.parse
from dataclasses import dataclass

from wspeers import h2ws

from wsencode.report import redact_url


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
    scheme: str  # ws or wss
    host: str
    port: int
    path: str  # with the query: what goes on the request line
    authorization: str | None = None  # from userinfo in the URL, as Basic

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"{redact_url(url)!r} is not a ws:// or wss:// URL")
        try:
            port = parts.port or (443 if parts.scheme == "wss" else 80)
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
        return self.scheme == "wss"

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def upstream(self) -> str:
        """mitmproxy's reverse-mode spec for it."""
        return f"{'https' if self.tls else 'http'}://{self.authority}"

    @property
    def url(self) -> str:
        """For printing: redacted like the report's URLs."""
        return redact_url(f"{self.scheme}://{self.authority}{self.path}")


@dataclass(frozen=True)
class Reach:
    """What a direct look at the target found."""

    alpn: str | None  # what TLS negotiated (None for ws://)
    rfc8441: bool  # HTTP/2 with SETTINGS_ENABLE_CONNECT_PROTOCOL = 1
    verified: bool  # the certificate was checked

    def describe(self, target: Target) -> str:
        if not target.tls:
            return "plain TCP (ws://): HTTP/1.1 only"
        tls = "TLS ok, certificate verified" if self.verified else "TLS ok, certificate not checked (--insecure)"
        if self.alpn != "h2":
            return f"{tls}; HTTP/1.1 only (ALPN {self.alpn or 'none'})"
        if not self.rfc8441:
            return f"{tls}; HTTP/2, but without RFC 8441 WebSockets (browsers use HTTP/1.1 for them there)"
        return f"{tls}; HTTP/2 with RFC 8441 WebSockets"


def _tls_context(target: Target, insecure: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


async def reach(target: Target, insecure: bool, timeout: float) -> Reach:
    """Connect to the target directly; raise Unreachable saying why not."""
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
            target.host, target.port, ssl=_tls_context(target, insecure), server_hostname=target.host), timeout)
    except ssl.SSLCertVerificationError as e:
        raise Unreachable(
            f"TLS failed: the certificate of {where} is not trusted ({e.verify_message}); if you trust this "
            "server (a test server with a self-signed certificate), add --insecure") from None
    except ssl.SSLError as e:
        raise Unreachable(f"TLS failed with {where}: {e.reason or e} (is it a TLS port? ws:// is plain)") from None
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
    return Reach(alpn, rfc8441, not insecure)


async def reach_and_say(target: Target, insecure: bool, timeout: float, say, failure: str) -> Reach | None:
    """`reach`, with what it found said (`say`, one line), or None once `failure` and why are said."""
    try:
        found = await reach(target, insecure, timeout)
    except Unreachable as e:
        say(f"{failure}: {e}")
        return None
    say(f"  target: {found.describe(target)}")
    return found
