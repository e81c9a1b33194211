"""A mitmproxy script for test and lab proxies: connect to loopback only.

    mitmdump -s addon/ws_encode.py -s scripts/loopback_only.py ...

Browsers behind a proxy in regular mode make background requests (updates,
account checks) through it. This refuses every upstream connection whose
address is not a loopback literal or `localhost`, before mitmproxy resolves
the name, so nothing a test or the lab runs reaches another machine.
"""

from __future__ import annotations

import ipaddress
import logging

from mitmproxy.proxy import server_hooks

logger = logging.getLogger("loopback_only")

LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost: never resolved


class LoopbackOnly:
    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        address = data.server.address
        if address is not None and not is_loopback(str(address[0])):
            # Setting an error stops mitmproxy before it resolves or connects.
            data.server.error = "loopback_only: refused a connection to a non-loopback destination"
            logger.info("loopback_only: refused %s", str(address[0])[:64].encode("unicode_escape").decode())


addons = [LoopbackOnly()]
