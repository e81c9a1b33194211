"""ws-encode's package: `core` (never imports mitmproxy), `mitm` (mitmproxy's
public interfaces, for the addon class), `bridge` (the one place that reaches
into mitmproxy's internals); `report` and `bundle` write what it found."""
