"""The three tools of a WebSocket bug report: `scripts/probe` (does this server withhold the
status?), bundles (a redacted record of it) and `scripts/replay` (is it fixed?).

The bundle itself is written by the addon's own module, `addon/wsencode/bundle.py`, which
runs inside mitmproxy too; it is imported from there.
"""
