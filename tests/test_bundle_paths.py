"""Report and bundle paths that are not what they seem, through a real mitmdump: a FIFO, a device,
a link to a folder, a place where nothing can be written; set at start-up and set live."""

from __future__ import annotations

import asyncio
import os
import urllib.parse

import pytest
from conftest import Mitmdump, assert_clean_log, close_proxied, proxied, raw_exchange, upgrade_request
from wspeers.fault_server import Faults

from wsencode import bundle

pytestmark = pytest.mark.timeout(90)
# A mitmproxy script that sets an option while the proxy runs, as the console's `:set` does:
# GET /live-set/NAME=VALUE answers 200, or 400 with the refusal.
LIVE_SET = '''
import urllib.parse
from mitmproxy import ctx, exceptions, http

class LiveSet:
    def request(self, flow):
        if flow.request.path.startswith("/live-set/"):
            name, _, value = flow.request.path[len("/live-set/"):].partition("=")
            try:
                ctx.options.update(**{name: urllib.parse.unquote(value)})
            except exceptions.OptionsError as e:
                flow.response = http.Response.make(400, str(e))
            else:
                flow.response = http.Response.make(200, "set")

addons = [LiveSet()]
'''


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def live_set(tmp_path):
    script = tmp_path / "live_set.py"
    script.write_text(LIVE_SET)
    return script


async def set_live(md: Mitmdump, name: str, value: str) -> bytes:
    """The answer to setting option `name` to `value` in the running proxy (its head and body)."""
    target = f"/live-set/{name}={urllib.parse.quote(value, safe='')}"
    reader, writer = await asyncio.open_connection("127.0.0.1", md.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    try:
        return await asyncio.wait_for(reader.read(), 10)  # (until mitmproxy closes the connection)
    finally:
        writer.close()


async def refused_at_start_up(*args: str) -> tuple[int, str]:
    """Start mitmdump with the addon and `args`; it must exit by itself: (its exit status, its log)."""
    md = Mitmdump(*args)
    try:
        try:
            await md.__aenter__()  # it may print "listening" before it gives up
        except AssertionError:
            pass
        await md.wait_for("<exited>", timeout=20)
    finally:
        code = await md.stop()
    return code, md.log


# -- ws_encode_report ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_report_that_is_not_a_regular_file_is_refused_at_start_up(tmp_path, kind):
    path = tmp_path / "report.fifo"
    if kind == "fifo":
        os.mkfifo(path)  # nobody reads it: a plain open() for writing would wait for ever
    else:
        path = "/dev/null"
    code, log = run(refused_at_start_up("--set", f"ws_encode_report={path}"))
    assert code != 0, log
    what = "a FIFO" if kind == "fifo" else "a character device"
    assert f"ws_encode_report: cannot append to '{path}': not a regular file but {what}" in log, log
    assert "Traceback" not in log


def test_a_fifo_set_live_as_the_report_is_refused_and_the_proxy_goes_on(tmp_path, live_set):
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    report = tmp_path / "report.jsonl"

    async def scenario():
        server, md = await proxied(Faults(), report, "-s", str(live_set))
        refused = await set_live(md, "ws_encode_report", str(fifo))
        # The proxy still answers, and writes its records where it did.
        await raw_exchange(md.port, upgrade_request("/after"), timeout=5)
        record = await md.wait_for_record(event="handshake")
        await close_proxied(server, md)
        return refused, record, md

    refused, record, md = run(scenario())
    assert refused.startswith(b"HTTP/1.1 400"), refused
    assert b"ws_encode_report: cannot append to" in refused and b"not a regular file but a FIFO" in refused
    assert record["url"].endswith("/after")
    assert_clean_log(md)


# -- ws_encode_bundle: where ---------------------------------------------------------------------


@pytest.mark.parametrize("kind, says", [
    ("fifo", "exists and is a FIFO, not a folder"),
    ("under-a-file", "no folder can be made in"),
    ("proc", "no folder can be made in /proc"),
])
def test_a_bundle_path_that_cannot_be_written_is_refused_at_start_up(tmp_path, kind, says):
    if kind == "fifo":
        path = tmp_path / "bundle.fifo"
        os.mkfifo(path)
    elif kind == "under-a-file":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "bundle"
    else:
        path = "/proc/ws-encode-bundle"  # unwritable even to root
    code, log = run(refused_at_start_up("--set", f"ws_encode_bundle={path}"))
    assert code != 0, log
    assert "ws_encode_bundle:" in log and says in log, log
    assert "Traceback" not in log


def test_a_bundle_folder_that_is_a_link_to_an_empty_folder_gets_the_bundle(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)

    async def scenario():
        server, md = await proxied(Faults(), None, "--set", f"ws_encode_bundle={link}")
        await raw_exchange(md.port, upgrade_request("/through-a-link"), timeout=5)
        await md.wait_for("WebSocket handshake")
        await close_proxied(server, md)
        return md

    md = run(scenario())
    assert "not written" not in md.log, md.log
    assert link.is_symlink() and sorted(p.name for p in link.iterdir()) == sorted(bundle.FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # nothing left beside them
    assert "/through-a-link" in (real / bundle.SUMMARY).read_text()
    assert_clean_log(md)


def test_a_bundle_path_set_live_is_checked_then_and_the_previous_one_stays(tmp_path, live_set):
    folder = tmp_path / "bundle"

    async def scenario():
        server, md = await proxied(Faults(), None, "-s", str(live_set), "--set", f"ws_encode_bundle={folder}")
        refused = await set_live(md, "ws_encode_bundle", "/proc/ws-encode-bundle")
        await raw_exchange(md.port, upgrade_request("/kept"), timeout=5)
        await md.wait_for("WebSocket handshake")
        await close_proxied(server, md)
        return refused, md

    refused, md = run(scenario())
    assert refused.startswith(b"HTTP/1.1 400") and b"ws_encode_bundle: no folder can be made in /proc" in refused
    assert "/kept" in (folder / bundle.SUMMARY).read_text(), md.log


def test_a_report_replaced_by_a_fifo_before_exit_does_not_hold_the_exit_bundle_back(tmp_path):
    folder, report = tmp_path / "bundle", tmp_path / "report.jsonl"

    async def scenario():
        server, md = await proxied(Faults(), report, "--set", f"ws_encode_bundle={folder}")
        await raw_exchange(md.port, upgrade_request("/before-the-fifo"), timeout=5)
        await md.wait_for_record(event="handshake")
        report.unlink()
        os.mkfifo(report)  # what the bundle reads the records from, at exit
        await close_proxied(server, md)
        return md

    md = run(scenario())
    assert "the report cannot be read for the bundle (not a regular file but a FIFO)" in md.log, md.log
    assert "/before-the-fifo" in (folder / bundle.SUMMARY).read_text()
    assert_clean_log(md)
