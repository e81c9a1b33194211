"""What never imports mitmproxy: a handshake's classification, lifecycle,
stall watch and diagnosis, the extended CONNECT model, and the core the addon
feeds (`handshakes`). tests/test_layout.py holds it to that."""
