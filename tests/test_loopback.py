"""Test proxies reach nothing but loopback: a browser's background requests
through a regular-mode proxy are refused before any name is resolved."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Mitmdump, assert_clean_log, raw_exchange
from loopback_only import is_loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["example.com", "10.0.0.1", "8.8.8.8", "::ffff:8.8.8.8", "localhost.example.com", ""])
def test_other_hosts_are_refused(host):
    assert not is_loopback(host)


def test_a_regular_mode_test_proxy_refuses_outside_destinations():
    async def scenario():
        async with Mitmdump() as md:
            got = await raw_exchange(
                md.port, b"GET http://updates.example.com/check HTTP/1.1\r\nHost: updates.example.com\r\n\r\n", 10
            )
            tunnel = await raw_exchange(
                md.port, b"CONNECT accounts.example.com:443 HTTP/1.1\r\nHost: accounts.example.com:443\r\n\r\n", 10
            )
            await md.wait_for(r"loopback_only: refused updates\.example\.com")
        return got, tunnel, md

    got, tunnel, md = asyncio.run(scenario())
    assert got.startswith(b"HTTP/1.1 502"), got
    assert b"non-loopback" in got
    assert not tunnel.startswith(b"HTTP/1.1 200"), tunnel
    assert "accounts.example.com" in md.log
    assert_clean_log(md)
