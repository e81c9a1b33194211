"""Test peers that are not tools people run: headless Chromium (`chromium`),
and Node's HTTP/2 server (`node_h2_ws_server.js`). The Python peers the
scripts also use (the RFC 8441 client and server, the HTTP/1.1 fault server)
are in scripts/, on the tests' import path."""
