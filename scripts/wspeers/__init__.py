"""The WebSocket peers the tests, the lab, the probe and the bench talk to and with.

- `h2ws`: an RFC 8441 client and server (h2 + wsproto), and a server that
  speaks HTTP/2 and HTTP/1.1 by ALPN (`DualAlpnServer`);
- `fault_server`: an HTTP/1.1 WebSocket server with configurable faults
  (a withheld status, a wrong accept, ...);
- `messages`: wsproto's `Connection` with whole messages, which both use.

Import them as `wspeers.h2ws`, with `scripts/` on the path (pyproject.toml
puts it there for the tests); run one with `PYTHONPATH=scripts python -m
wspeers.h2ws ...`.
"""
