"""Every command README.md shows runs as written, where a test can run it.

Each ```sh block is read as shell commands (a trailing backslash continues a
line, `#` starts a comment, `&` sends a command to the background). Every
path they name exists, scripts run directly are executable and answer
--help, every mitmdump flag and every `--set name=value` anywhere in the README
is one mitmdump knows, the options table names exactly the addon's options,
and the "Use" section's recipes run as written (on free ports and paths of
the test's own) and end in the stall they promise: the reverse-mode one with
its client, and strip opening it; the browser one on a fresh profile. The
"Install" section's commands, which need an environment of their own, are
run by tests/test_package.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import mitmproxy.version
import pytest
import ws_encode
from conftest import LISTENING, LOOPBACK_ONLY, MITMDUMP, ROOT, Mitmdump
from peers.chromium import CHROMIUM
from mitmproxy.test import taddons

README = (ROOT / "README.md").read_text()
LINE = mitmproxy.version.VERSION.split(".")[0]  # this interpreter's mitmproxy line, as scripts/test.sh names it
BROWSER_CODINGS = "gzip, deflate, br, zstd"

pytestmark = pytest.mark.timeout(60)


def sh_blocks(text: str) -> list[list[list[str]]]:
    """Each ```sh block as its commands, each command as its words (`&&`
    separates commands, `&` sends one to the background)."""
    blocks = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M):
        commands = []
        for line in block.replace("\\\n", " ").splitlines():
            words = [w for w in shlex.split(line, comments=True) if w != "&"]
            while "&&" in words:
                at = words.index("&&")
                commands.append(words[:at])
                words = words[at + 1:]
            if words:
                commands.append(words)
        blocks.append(commands)
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
        program = next(w for w in command if "=" not in w)  # (past `NAME=value` assignments)
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

    def __init__(self, argv: list[str], ready: re.Pattern, report=None, env: dict[str, str] | None = None):
        super().__init__(report=report, env=env)
        self.argv, self.ready = argv, ready

    async def __aenter__(self) -> Started:
        await self.spawn(*self.argv, cwd=ROOT, env=self.env)
        self.match = self.ready.search(await self.wait_for(self.ready, timeout=30))
        return self


def block_starting(program: str, then: str | None = None) -> list[list[str]]:
    """The "Use" section's block whose first command runs `program` (and whose second `then`)."""
    return next(b for b in sh_blocks(use_section()) if b[0][0] == program and (then is None or b[1][0] == then))


def as_written(command: list[str], ports: dict[int, int], paths: dict[str, str]) -> list[str]:
    """A README command with its ports (the README's 8443, 8081) and paths
    (/tmp, the report) replaced by this test's, and this line's mitmdump."""
    def word(w: str) -> str:
        for old, new in paths.items():
            w = w.replace(old, new)
        for old, new in ports.items():
            w = re.sub(rf"(?<=:){old}\b", str(new), w)
        return w

    argv = [word(w) for w in command]
    if is_mitmdump(argv):
        argv[0] = str(MITMDUMP)
        argv[argv.index("-p") + 1] = "0"  # (the README's 8081: a free one, read from its output)
    return argv


LAB_READY = re.compile(r"lab: hold-until-body listening on https://127\.0\.0\.1:(\d+)")


async def start_lab(argv: list[str], home: Path) -> tuple[Started, int]:
    # The README's lab takes 8443; this one takes a free port (--port 0).
    lab = Started([*argv, "--port", "0"], LAB_READY, env={"HOME": str(home)})
    await lab.__aenter__()
    await lab.wait_for("lab: ready")
    return lab, int(lab.match.group(1))


async def stop(started: Started) -> None:
    started._proc.send_signal(signal.SIGTERM)  # (`kill %1`: each ends at SIGTERM)
    assert await asyncio.wait_for(started._proc.wait(), 10) == 0, started.log


@pytest.mark.timeout(120)
def test_the_reverse_mode_recipe_ends_in_its_stall_and_strip_opens_it(tmp_path):
    """The lab, mitmdump in front of it and the client, as "Use" shows them;
    only ports and the report's path differ. The stall line mitmdump prints
    is the one the README quotes; the same proxy with strip opens the
    WebSocket at once."""
    lab_argv, proxy_argv, client_argv = block_starting("scripts/lab", then=".venv-mitmproxy12/bin/mitmdump")
    assert client_argv[0] == "scripts/wsclient", client_argv
    report = tmp_path / "handshakes.jsonl"
    quoted = re.search(r"Two seconds in, mitmdump says `(.*?)`, and", use_section(), re.S).group(1)

    async def run_client(argv: list[str]) -> tuple[int, str]:
        client = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                      stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(client.communicate(), 60)
        return client.returncode, out.decode()

    async def scenario():
        lab, lab_port = await start_lab(lab_argv, tmp_path)
        try:
            paths = {"handshakes.jsonl": str(report)}
            results = []
            for extra in ([], ["--set", "ws_encode_policy=strip"]):
                proxy_cmd = as_written(proxy_argv, {8443: lab_port}, paths) + ["-s", str(LOOPBACK_ONLY), *extra]
                async with Started(proxy_cmd, LISTENING, report=report) as proxy:
                    port = int(proxy.match.group(1))
                    code, out = await run_client(as_written(client_argv, {8081: port}, paths))
                    results.append((code, out, proxy.log))
            return results
        finally:
            await stop(lab)

    (stalled, stalled_out, log), (opened, opened_out, _) = asyncio.run(scenario())
    assert stalled == 1 and "no :status for the extended CONNECT within 5.0 s (handshake stalled)" in stalled_out
    said = next(line for line in log.splitlines() if "WebSocket handshake stall on" in line)
    expected = " ".join(quoted.split()).replace("8443", "PORT")
    assert re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", said.split("] ", 1)[1]) == expected, said
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert records[0]["event"] == "stall" and records[0]["transport"] == "h2"
    assert opened == 0 and "status 200" in opened_out and "echo: hello" in opened_out
    assert records[-1]["policy"] == "strip" and records[-1]["outcome"] == "upgraded"


@pytest.mark.browser
@pytest.mark.timeout(120)
@pytest.mark.skipif(not shutil.which("certutil") or not CHROMIUM, reason="needs chromium and certutil (libnss3-tools)")
def test_the_browser_recipe_trusts_mitmproxy_on_a_fresh_profile_and_ends_in_the_stall(tmp_path):
    """The regular-mode recipe as written, on a fresh profile: certutil makes
    the database and trusts mitmproxy's CA, Chromium goes through the proxy
    (headless and without its sandbox, as root in CI), the page's WebSocket
    goes over HTTP/2 and stalls. Its background requests stay off the
    network: the proxy refuses any non-loopback destination, and no name
    but loopback resolves."""
    block = block_starting("scripts/lab", then=".venv-mitmproxy12/bin/mitmdump")
    commands = next(b for b in sh_blocks(use_section()) if any(c[0] == "certutil" for c in b))
    lab_argv, proxy_argv, wait_argv, mkdir_argv, init_argv, trust_argv, browser_argv = commands
    assert lab_argv == block[0] and "scripts/loopback_only.py" in proxy_argv
    home, report = tmp_path / "home", tmp_path / "handshakes.jsonl"
    home.mkdir()
    paths = {"/tmp/ws-encode-profile": str(tmp_path / "profile"), "handshakes.jsonl": str(report),
             "~/": f"{home}/"}

    async def scenario():
        lab, lab_port = await start_lab(lab_argv, home)
        try:
            proxy_cmd = as_written(proxy_argv, {}, paths)
            async with Started(proxy_cmd, LISTENING, report=report, env={"HOME": str(home)}) as proxy:
                port = int(proxy.match.group(1))
                # The wait for mitmproxy's CA is a shell loop: run by a shell.
                waited = subprocess.run(["bash", "-c", " ".join(as_written(wait_argv, {}, paths))], timeout=30)
                assert waited.returncode == 0
                for argv in (mkdir_argv, init_argv, trust_argv):
                    done = subprocess.run(as_written(argv, {}, paths), capture_output=True, text=True, timeout=30)
                    assert done.returncode == 0, (argv, done.stderr)
                env_word, *browser = as_written(browser_argv, {8081: port, 8443: lab_port}, paths)
                name, value = env_word.split("=", 1)
                browser_proc = await asyncio.create_subprocess_exec(
                    CHROMIUM, "--headless=new", "--no-sandbox", *browser[1:], env={**os.environ, name: value},
                    stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
                try:
                    stall = await proxy.wait_for_record(event="stall", timeout=30)
                finally:
                    os.killpg(browser_proc.pid, signal.SIGKILL)
                    await browser_proc.wait()
                return stall, proxy.log
        finally:
            await stop(lab)

    stall, log = asyncio.run(scenario())
    assert stall["transport"] == "h2" and stall["stuck_in"] == "forwarded"
    assert stall["accept_encoding_client"] == BROWSER_CODINGS and "encoding layer" in stall["diagnosis"]
    # (A background connection Chromium drops mid-handshake makes mitmproxy
    # wonder whether it trusts the CA; what counts is the lab's address.)
    assert not re.search(r"does not trust the proxy's certificate for 127\.0\.0\.1", log), log
    assert not re.search(r"server connect (?!127\.0\.0\.1)", log), log  # nothing but loopback
