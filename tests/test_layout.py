"""The package's folders say what touches mitmproxy, and the code keeps to it:
`core` never imports mitmproxy; only `bridge` reaches into its internals."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "addon" / "wsencode"


def modules(folder: str) -> list[str]:
    return sorted(f"wsencode.{folder}.{p.stem}" for p in (PACKAGE / folder).glob("*.py") if p.stem != "__init__")


def test_the_core_never_imports_mitmproxy():
    """Imported alone, in a fresh interpreter: nothing of mitmproxy comes
    with any core module, whatever it imports in turn."""
    core = modules("core")
    assert len(core) >= 10
    code = (
        "import sys\n"
        f"for name in {core!r}: __import__(name)\n"
        "print(sorted(m for m in sys.modules if m == 'mitmproxy' or m.startswith('mitmproxy.')))\n"
    )
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "addon", capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


def imported_names(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_only_the_bridge_reaches_into_mitmproxys_internals():
    """mitmproxy's proxy layers (its HTTP, HTTP/2 and HTTP/3 codecs and
    stream) are its internals: the bridge's alone."""
    outside = [p for p in [ROOT / "addon" / "ws_encode.py", *PACKAGE.rglob("*.py")] if "bridge" not in p.parts]
    reaching = {
        str(p.relative_to(ROOT)): sorted(n for n in imported_names(p) if n.startswith("mitmproxy.proxy.layers"))
        for p in outside
    }
    assert {p: names for p, names in reaching.items() if names} == {}
    assert any(n.startswith("mitmproxy.proxy.layers") for p in (PACKAGE / "bridge").glob("*.py") for n in imported_names(p))
