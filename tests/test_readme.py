"""Every command README.md shows runs as written, where a test can run it.

Each ```sh block is read as shell commands (a trailing backslash continues a
line, `#` starts a comment, `&` sends a command to the background). Every
path they name exists, scripts run directly are executable and answer
--help, every mitmdump flag and every `--set name=value` anywhere in the README
is one mitmdump knows, the options table names exactly the addon's options,
and the "Use" section's reverse-mode pair (the lab, then mitmdump in front of
it) really starts and reports a stalled handshake, on free ports.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess

from wspeers import h2ws
import mitmproxy.version
import pytest
import ws_encode
from conftest import LISTENING, LOOPBACK_ONLY, MITMDUMP, ROOT, Mitmdump, assert_clean_log
from mitmproxy.test import taddons

README = (ROOT / "README.md").read_text()
LINE = mitmproxy.version.VERSION.split(".")[0]  # this interpreter's mitmproxy line, as scripts/test.sh names it
BROWSER_CODINGS = "gzip, deflate, br, zstd"

pytestmark = pytest.mark.timeout(60)


def sh_blocks(text: str) -> list[list[list[str]]]:
    """Each ```sh block as its commands, each command as its words."""
    blocks = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M):
        words_of = [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
        blocks.append([[w for w in words if w != "&"] for words in words_of if words])
    return blocks


BLOCKS = sh_blocks(README)
COMMANDS = [command for block in BLOCKS for command in block]


def use_section() -> str:
    return README.split("\n## Use\n", 1)[1].split("\n## ", 1)[0]


def is_mitmdump(command: list[str]) -> bool:
    return os.path.basename(command[0]) == "mitmdump"


def test_the_readme_shows_commands():
    # The parsing itself: a README without blocks would pass everything below.
    assert len(BLOCKS) >= 3 and any(c[0] == "scripts/lab" for c in COMMANDS), BLOCKS
    assert sum(is_mitmdump(c) for c in COMMANDS) >= 2, COMMANDS


def test_every_path_named_exists_and_what_runs_directly_is_executable():
    named = set(re.findall(r"(?<![\w./-])((?:scripts|addon|tests)/[\w./-]*[\w/])", README))
    assert {"addon/ws_encode.py", "scripts/lab", "scripts/repro"} <= named
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"README.md names paths that do not exist: {missing}"
    for command in COMMANDS:
        program = command[0]
        if program.startswith("scripts/"):
            assert os.access(ROOT / program, os.X_OK), f"{program} is run directly but is not executable"
        elif program.startswith(".venv-mitmproxy") and (ROOT / program.split("/")[0]).exists():
            assert os.access(ROOT / program, os.X_OK), program


def test_every_script_shown_answers_help():
    scripts = sorted({c[0] for c in COMMANDS if c[0].startswith("scripts/")})
    assert "scripts/lab" in scripts and "scripts/test.sh" in scripts

    def argv(script: str) -> list[str]:
        # test.sh runs pytest once per mitmproxy line; this line's is set up already.
        return [script, LINE, "--help"] if script == "scripts/test.sh" else [script, "--help"]

    procs = {s: subprocess.Popen(argv(s), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for s in scripts}
    for script, proc in procs.items():
        out, _ = proc.communicate(timeout=50)
        assert proc.returncode == 0, f"{' '.join(argv(script))} exited {proc.returncode}:\n{out}"
        assert "usage" in out.lower(), out


@pytest.fixture(scope="module")
def mitmdump_knows():
    """mitmdump's flags (its --help), its own options (its --options) and the
    addon's options with their defaults, from the addon loaded in mitmproxy's
    test context (mitmproxy 11's --options leaves out a script's options)."""
    help_ = subprocess.Popen([MITMDUMP, "--help"], stdout=subprocess.PIPE, text=True)
    options = subprocess.Popen([MITMDUMP, "--options"], stdout=subprocess.PIPE, text=True)
    with taddons.context(ws_encode.WsEncode()) as tctx:
        defaults = {name: tctx.options.default(name) for name in tctx.options.keys()}
        commands = set(tctx.master.commands.commands)
    help_text, options_text = help_.communicate(timeout=50)[0], options.communicate(timeout=50)[0]
    # (mitmdump --help exits 1 on mitmproxy 12: its text is what counts.)
    assert "usage: mitmdump" in help_text and options.returncode == 0, help_text
    flags = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", help_text))
    names = set(re.findall(r"^(\w+):", options_text, re.M)) | set(defaults)
    assert {"ws_encode_policy", "view_filter"} - names == {"view_filter"} and "--mode" in flags, (flags, names)
    return flags, names, defaults, commands


def test_every_set_names_a_real_option(mitmdump_knows):
    _, names, _, _ = mitmdump_knows
    # mitmweb's own options (web_columns) are shown for mitmweb.
    web = subprocess.run([MITMDUMP.with_name("mitmweb"), "--options"], capture_output=True, text=True, timeout=50)
    web_names = set(re.findall(r"^(web_\w+):", web.stdout, re.M))
    assert "web_columns" in web_names, web.stdout[-2000:]
    used = re.findall(r"--set[ =](\w+)=", README)
    assert "ws_encode_report" in used and "ws_encode_policy" in used
    unknown = sorted(set(used) - names - web_names)
    assert not unknown, f"README.md sets options neither mitmdump nor mitmweb has: {unknown}"


def test_every_mitmdump_flag_shown_is_one_mitmdump_has(mitmdump_knows):
    flags, _, _, _ = mitmdump_knows
    shown = {w.split("=", 1)[0] for c in COMMANDS if is_mitmdump(c) for w in c[1:] if w.startswith("-")}
    assert {"-s", "-p", "--mode", "--set"} <= shown
    assert not shown - flags, f"mitmdump has no {sorted(shown - flags)}"


def test_the_options_table_names_exactly_the_addons_options(mitmdump_knows):
    _, _, defaults, _ = mitmdump_knows
    table = dict(re.findall(r"^\| `(ws_encode_\w+)` \| (.*?) \|", use_section(), re.M))
    assert set(table) == {n for n in defaults if n.startswith("ws_encode_")}, table
    for name, shown in table.items():
        default = defaults[name]
        default = str(default).lower() if isinstance(default, bool) else default
        assert ("" if shown == "empty" else shown.strip("`")) == default, f"{name}: README {shown}, addon {default!r}"


def test_every_wsencode_command_named_is_one_the_addon_has(mitmdump_knows):
    *_, commands = mitmdump_knows
    named = set(re.findall(r"\bwsencode\.[a-z.]*[a-z]", README))
    assert {"wsencode.stalls", "wsencode.summary"} <= named
    assert not named - commands, f"README.md names commands the addon does not have: {sorted(named - commands)}"


class Started(Mitmdump):
    """A README command run as a process of this test: conftest's Mitmdump
    (its log, its records, its stop by pid), with the argv given, waiting
    for the line `ready` before it counts as started."""

    def __init__(self, argv: list[str], ready: re.Pattern, report=None):
        super().__init__(report=report)
        self.argv, self.ready = argv, ready

    async def __aenter__(self) -> Started:
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv, cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        self.match = self.ready.search(await self.wait_for(self.ready, timeout=30))
        return self


def test_the_use_sections_reverse_pair_reports_a_stall(tmp_path):
    """The lab, then mitmdump in front of it, as "Use" shows them; only the
    ports (free ones), the report's path (in tmp) and this line's mitmdump
    differ, and the proxy connects to loopback only."""
    block = next(b for b in sh_blocks(use_section()) if b[0][0] == "scripts/lab")
    lab_argv, proxy_argv = block
    assert lab_argv == ["scripts/lab", "--behaviour", "hold-until-body", "--quiet"], lab_argv
    assert is_mitmdump(proxy_argv) and "--mode" in proxy_argv, proxy_argv
    report = tmp_path / "handshakes.jsonl"

    def proxy_command(lab_port: int) -> list[str]:
        argv = [str(MITMDUMP)]
        words = iter(proxy_argv[1:])
        for word in words:
            if word == "-p":
                argv += ["--listen-host", "127.0.0.1", "-p", "0", "-s", str(LOOPBACK_ONLY)]
                next(words)
            elif word.startswith("reverse:"):
                argv.append(re.sub(r":8443\b", f":{lab_port}", word))
            elif word.startswith("ws_encode_report="):
                argv.append(f"ws_encode_report={report}")
            else:
                argv.append(word)
        return argv

    async def scenario():
        lab_ready = re.compile(r"lab: hold-until-body listening on https://127\.0\.0\.1:(\d+)")
        async with Started([*lab_argv, "--port", "0"], lab_ready) as lab:
            await lab.wait_for("lab: ready")
            lab_port = int(lab.match.group(1))
            async with Started(proxy_command(lab_port), LISTENING, report=report) as proxy:
                port = int(proxy.match.group(1))
                # "Point a client at wss://127.0.0.1:8081/echo": an HTTP/2 one, as a browser is.
                async with h2ws.H2WebSocketClient("127.0.0.1", port, server_hostname="localhost") as client:
                    ws = await client.open_websocket("/echo", f"127.0.0.1:{port}",
                                                     headers=[("accept-encoding", BROWSER_CODINGS)])
                    stall = await proxy.wait_for_record(event="stall", timeout=15)
                    await ws.reset()
                end = await proxy.wait_for_record(event="handshake", timeout=15)
            # "Stop the lab with kill %1": the lab ends at SIGTERM.
            lab._proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(lab._proc.wait(), 10) == 0, lab.log
        return stall, end, proxy

    stall, end, proxy = asyncio.run(scenario())
    assert stall["transport"] == "h2" and stall["stuck_in"] == "forwarded" and stall["status"] is None
    assert stall["accept_encoding_upstream"] == BROWSER_CODINGS and "encoding layer" in stall["diagnosis"]
    assert end["outcome"] == "no-status" and end["stalled"] is True
    assert_clean_log(proxy)
