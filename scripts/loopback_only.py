"""A mitmproxy script for test and lab proxies: connect to loopback only.

    mitmdump -s addon/ws_encode.py -s scripts/loopback_only.py ...

Browsers behind a proxy in regular mode make background requests (updates,
account checks) through it. This refuses every upstream connection whose
address is not a loopback literal or `localhost`, before mitmproxy resolves
the name, so nothing a test or the lab runs reaches another machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from mitmproxy.proxy import server_hooks

logger = logging.getLogger("loopback_only")

LOOPBACK_NAMES = frozenset({"localhost", "localhost."})
# Said once every addon's running hook has run. mitmproxy listens before its
# tlsconfig addon has run its own (which makes the certificate store): a
# client that connects in between fails mitmdump's start-up ("Addon error:
# 'NoneType' object has no attribute 'get_cert'"), so the tools and tests
# wait for this line, not for "listening at", before they connect.
STARTED = "loopback_only: every addon has started"


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost: never resolved


class LoopbackOnly:
    def running(self) -> None:
        # Scripts run theirs before tlsconfig's, and every running hook is
        # synchronous: a callback scheduled now runs after the last of them.
        asyncio.get_running_loop().call_soon(logger.info, STARTED)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        address = data.server.address
        if address is not None and not is_loopback(str(address[0])):
            # Setting an error stops mitmproxy before it resolves or connects.
            data.server.error = "loopback_only: refused a connection to a non-loopback destination"
            logger.info("loopback_only: refused %s", str(address[0])[:64].encode("unicode_escape").decode())


addons = [LoopbackOnly()]
