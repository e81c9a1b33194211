"""ws-encode's protocol core: handshake classification, lifecycle, stall watch,
diagnosis, policy and report. Everything that touches mitmproxy's internals
lives in `h2bridge` alone."""
