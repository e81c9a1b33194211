"""The WebSocket peers the tests, the lab, the probe and the bench talk to and with.

- `h2ws`: an RFC 8441 client and server (h2 + wsproto), and a server that
  speaks HTTP/2 and HTTP/1.1 by ALPN (`DualAlpnServer`);
- `h3ws`: an RFC 9220 client and server (aioquic + wsproto) with h2ws's API,
  on UDP 127.0.0.1, and the QUIC and HTTP/3 plumbing the lab's HTTP/3 side
  runs on;
- `streams`: what h2ws and h3ws share (a client's WebSocket on a request
  stream, the command line);
- `fault_server`: an HTTP/1.1 WebSocket server with configurable faults
  (a withheld status, a wrong accept, ...);
- `messages`: wsproto's `Connection` with whole messages, which both use.

Import them as `wspeers.h2ws` (installed with ws-encode; pyproject.toml
puts `scripts/` on the tests' path); run one with `python -m wspeers.h2ws
...` (or `wspeers.h3ws`) in an environment that has ws-encode installed,
such as `.venv-mitmproxy12`.
"""
