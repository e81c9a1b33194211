"""The test helpers' processes, ports and files: starting and stopping a
mitmdump is free of races, ports are chosen where nothing else is handed
them, and a report is read whole while it is written."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import types
from pathlib import Path

from conftest import (CLIENT_CONNECT, EVENT_TIMEOUT, ROOT, Mitmdump, make_mitmproxy_ca, on_one_port_number,
                      whole_records)
from forkserver import ForkServer
from mitmdump_proc import MITMDUMP, free_ports
from mitmproxy.certs import CertStore


def wait_until_exited(pid: int) -> None:
    """Block until process `pid` (a child of this one) has exited, leaving it
    for asyncio to reap: the event loop learns of the exit only later."""
    with contextlib.suppress(ChildProcessError):  # asyncio's watcher thread (Python 3.11) reaped it: exited
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def test_stopping_a_mitmdump_that_exits_meanwhile_is_not_an_error():
    """stop() lets a connected client's close finish first; a mitmdump that
    exits during that wait (as one refusing a bad option does) is already
    gone when stop() would signal it, which is not an error."""

    async def scenario():
        md = await Mitmdump().__aenter__()
        _, client = await asyncio.open_connection("127.0.0.1", md.port)
        await md.wait_for(CLIENT_CONNECT)
        os.kill(md._proc.pid, signal.SIGKILL)  # this test started it
        wait_until_exited(md._proc.pid)
        code = await md.stop()
        client.close()
        return code, md

    code, md = asyncio.run(scenario())
    # (Not -9 for sure: on Python 3.11 asyncio's watcher thread and Popen may
    # both reap it, and the loser reports 255.)
    assert code is not None and md.lines[-1] == "<exited>", md.log


def test_the_mitmproxy_ca_is_made_whole_once_and_an_existing_one_is_kept(tmp_path):
    confdir = tmp_path / "conf"
    start = threading.Barrier(2)

    def session() -> None:
        start.wait()
        make_mitmproxy_ca(confdir)

    sessions = [threading.Thread(target=session) for _ in range(2)]
    for thread in sessions:
        thread.start()
    for thread in sessions:
        thread.join()
    key_and_cert = (confdir / "mitmproxy-ca.pem").read_bytes()
    # One authority: the certificate a browser is given is the one beside the key.
    assert (confdir / "mitmproxy-ca-cert.pem").read_bytes() in key_and_cert
    assert CertStore.from_store(confdir, "mitmproxy", 2048).default_ca.cn == "mitmproxy"
    assert sorted(p.name for p in confdir.iterdir()) == [
        "mitmproxy-ca-cert.cer", "mitmproxy-ca-cert.p12", "mitmproxy-ca-cert.pem",
        "mitmproxy-ca.p12", "mitmproxy-ca.pem", "mitmproxy-dhparam.pem"]  # no folder left behind

    make_mitmproxy_ca(confdir)  # one that exists is kept
    assert (confdir / "mitmproxy-ca.pem").read_bytes() == key_and_cert


def test_free_ports_are_distinct_free_and_never_ones_the_kernel_hands_out():
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = free_ports(5)
    assert len(set(ports)) == 5
    assert all(port < low or port > high for port in ports), (ports, low, high)
    for port in ports:
        with socket.create_server(("127.0.0.1", port)):  # nothing listens there
            pass


def test_a_report_being_written_is_read_up_to_its_last_whole_record(tmp_path):
    report = tmp_path / "report.jsonl"
    assert whole_records(report) == []  # not written yet
    report.write_bytes(b'{"event": "stall"}\n{"event": "handshake", "url": "https://\xc3')  # cut inside a character
    assert whole_records(report) == [{"event": "stall"}]


def test_venv_sh_never_clears_an_environment_it_reaches_by_a_link(tmp_path):
    """A git worktree shares another checkout's environments by links; a
    checkout whose pyproject differs must not rebuild through one (`venv
    --clear` empties the folder a link points to, then fails)."""
    shared = tmp_path / "shared-venv"
    (shared / "bin").mkdir(parents=True)
    (shared / "bin" / "keep").write_text("another checkout's")
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "venv.sh", checkout / "scripts")
    (checkout / "pyproject.toml").write_text("[project]\nname = 'other'\n")
    (checkout / ".venv-mitmproxy11").symlink_to(shared)
    done = subprocess.run(["bash", str(checkout / "scripts" / "venv.sh"), "11"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 4 and "is a link to" in done.stderr, done.stderr
    assert (shared / "bin" / "keep").read_text() == "another checkout's"


def test_a_forked_mitmdump_has_its_own_arguments_directory_and_environment_and_ends_with_the_server(tmp_path):
    """tests/forkserver.py: each mitmdump is started with what the test gave it,
    and none outlives the server it was forked from (nor the server the test run)."""
    (tmp_path / "says.py").write_text(
        "import logging, os\n"
        "def running():\n"
        "    logging.warning('says: ' + os.environ['WSENCODE_SAYS'] + ' in ' + os.getcwd())\n")
    server = ForkServer(tmp_path)

    async def says() -> Mitmdump:
        md = Mitmdump()
        md.adopt(await server.start([str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", "0", "-s", "says.py"],
                                    str(tmp_path), {**os.environ, "WSENCODE_SAYS": "hello"}))
        await md.wait_for("says: ")
        return md

    async def scenario():
        md = await says()
        pid = md._proc.pid
        server.stop()
        code = await md._proc.wait()
        await md.stop()
        again = await says()  # from a server started anew on the same socket's path
        await again.stop()
        return pid, code, md, again

    try:
        pid, code, md, again = asyncio.run(scenario())
    finally:
        server.stop()
    for each in (md, again):
        assert any(line.endswith(f"says: hello in {tmp_path}") for line in each.lines), each.log
    assert code == -signal.SIGKILL and md.exited
    # Its output ends as it exits, a moment before it has: its pidfd says when it has.
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # gone, and reaped
    try:
        assert select.select([pidfd], [], [], EVENT_TIMEOUT)[0], f"mitmdump {pid} outlived its fork server"
    finally:
        os.close(pidfd)


def test_a_udp_and_tcp_pair_on_one_port_number_tries_again_where_the_number_is_taken_on_tcp():
    """conftest.on_one_port_number: the first UDP port's number is taken on TCP here
    (as any outgoing connection may take it), so the pair comes on another try."""
    taken = socket.create_server(("127.0.0.1", 0))
    numbers = [taken.getsockname()[1], 0]  # the first try's UDP port, then any

    @contextlib.asynccontextmanager
    async def udp_server():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", numbers.pop(0)))
            yield types.SimpleNamespace(port=sock.getsockname()[1])

    @contextlib.asynccontextmanager
    async def tcp_server(port: int):
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
        async with server:
            yield server

    async def scenario():
        async with on_one_port_number(udp_server, tcp_server) as (udp, tcp):
            return udp.port, tcp.sockets[0].getsockname()[1]

    with taken:
        udp_port, tcp_port = asyncio.run(scenario())
        assert udp_port == tcp_port != taken.getsockname()[1] and numbers == []
