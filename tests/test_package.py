"""ws-encode installed the way mitmproxy addons are shared: the wheel built
from this checkout, installed with pip into a fresh virtual environment (no
site packages but its own, nothing of this checkout on its path), and then
used from a folder that has nothing to do with the project, by the README's
"Install" commands:

    pip install ws_encode-*.whl
    mitmdump -s "$(python -m wsencode)" ...

The environment gets the same mitmproxy as this suite's line, from PyPI (or
pip's cache)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ADDON, EVENT_TIMEOUT, LISTENING, ROOT, STARTUP_TIMEOUT, upgrade_request, whole_records
from mitmdump_proc import Process
from mitmproxy.version import VERSION
from wspeers.fault_server import FaultServer, Faults

# Building the wheel and installing mitmproxy with it takes a minute or more on a busy machine.
pytestmark = pytest.mark.timeout(900)

CONSOLE_SCRIPTS = ["ws-encode-probe", "ws-encode-replay", "ws-encode-lab", "ws-encode-repro", "ws-encode-bench"]
# The README's mitmdump command for an installed addon: a shell line, "$(...)" and all.
[README_MITMDUMP] = [line for line in (ROOT / "README.md").read_text().splitlines()
                     if line.startswith('mitmdump -s "$(python -m wsencode)" ')]


def run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel of this checkout (and the
    lab extra, which two of the console scripts need) installed by pip."""
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dist, ROOT], timeout=300)
    [wheel] = dist.glob("ws_encode-*.whl")
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", venv], timeout=120)
    run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", f"{wheel}[lab]", f"mitmproxy=={VERSION}"],
        env=environment(venv), timeout=600)
    return venv


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A folder with nothing of the project in it, to run commands from."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    return folder


def environment(venv: Path) -> dict[str, str]:
    """A shell's environment with `venv` first on PATH, as after `. venv/bin/activate`,
    and without the PYTHONPATH that puts this checkout on every path of the suite."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def site_packages(venv: Path) -> Path:
    [folder] = venv.glob("lib/python3.*/site-packages")
    return folder


def test_python_m_wsencode_prints_the_installed_addon_script(installed, elsewhere):
    printed = run(["python", "-m", "wsencode"], cwd=elsewhere, env=environment(installed), timeout=60).stdout
    assert printed == f"{site_packages(installed) / 'ws_encode.py'}\n"
    assert Path(printed.strip()).read_bytes() == ADDON.read_bytes()


def test_in_a_checkout_python_m_wsencode_prints_the_checkouts_script(elsewhere):
    """The suite's Pythons have the checkout's addon/ on their path (conftest),
    as a checkout set up by scripts/venv.sh has by its editable install."""
    printed = run([sys.executable, "-m", "wsencode"], cwd=elsewhere, timeout=60).stdout
    assert printed == f"{ROOT / 'addon' / 'ws_encode.py'}\n"


@pytest.mark.parametrize("command", CONSOLE_SCRIPTS)
def test_each_console_script_is_installed_and_answers_help(installed, elsewhere, command):
    done = run([installed / "bin" / command, "--help"], cwd=elsewhere, env=environment(installed), timeout=120)
    assert done.stdout.startswith("usage: "), done.stdout


def as_written(port: int, report: Path) -> str:
    """README_MITMDUMP on a free port, in front of `port`, writing `report`."""
    command = (README_MITMDUMP.replace(" -p 8081 ", " -p 0 ")
               .replace(" --mode reverse:https://127.0.0.1:8443", f" --mode reverse:http://127.0.0.1:{port}"))
    assert command.count(" -p 0 ") == command.count(f":{port}") == 1, README_MITMDUMP
    return f"{command} --set ws_encode_report={report}"


def test_a_handshake_through_mitmdump_with_the_installed_addon(installed, elsewhere, report):
    """The README's command, typed in an unrelated folder: the addon loads
    from site-packages, follows an HTTP/1.1 handshake and reports it."""

    async def scenario() -> tuple[bytes, dict, str]:
        server = FaultServer(Faults())
        await server.start()
        proxy = Process()  # bash's exec makes mitmdump the process started, so it stops by its own pid
        await proxy.spawn("bash", "-c", "exec " + as_written(server.port, report), cwd=elsewhere,
                          env=environment(installed))
        try:
            assert await proxy.until(lambda: LISTENING.search(proxy.log), STARTUP_TIMEOUT), proxy.log
            port = int(LISTENING.search(proxy.log).group(1))
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(upgrade_request("/chat", accept_encoding="gzip"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), EVENT_TIMEOUT)
            assert await proxy.until(lambda: whole_records(report), EVENT_TIMEOUT), proxy.log
            writer.close()
            return head, whole_records(report)[0], proxy.log
        finally:
            await proxy.stop()
            await server.stop()

    head, record, log = asyncio.run(scenario())
    assert head.startswith(b"HTTP/1.1 101 ")
    assert f"Loading script {site_packages(installed) / 'ws_encode.py'}" in log
    assert "Traceback" not in log, log
    assert record["event"] == "handshake" and record["outcome"] == "upgraded" and record["status"] == 101
    assert record["transport"] == record["upstream_transport"] == "h1"
    assert record["accept_encoding_client"] == "gzip" and record["policy"] == "observe"
