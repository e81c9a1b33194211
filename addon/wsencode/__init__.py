"""ws-encode's package: `core` (never imports mitmproxy), `mitm` (mitmproxy's
public interfaces, for the addon class), `bridge` (the one place that reaches
into mitmproxy's internals); `report` and `bundle` write what it found."""

from pathlib import Path

# The mitmproxy script that loads this package (`mitmdump -s SCRIPT`). It sits
# beside the package both in a checkout (addon/) and installed (site-packages),
# so the script found is always the one that imports this very package.
SCRIPT = Path(__file__).resolve().parent.parent / "ws_encode.py"
