"""The suite's mitmdumps without mitmdump's start-up: a process that has imported
mitmproxy once forks each of them.

A mitmdump spends about a second of CPU importing mitmproxy (flask, ldap3,
aioquic...) before it reads its arguments; the suite starts a few hundred per
mitmproxy line. Forked from a process that has done the imports, each is the
same program (`mitmproxy.tools.main.mitmdump`, this line's, with the addon
given by `-s` and imported by mitmproxy as always) in a process of its own,
started in about a seventh of the time. `WSENCODE_TEST_FORK=0` starts every
one the ordinary way instead.

    python forkserver.py SOCKET     # serves until its parent dies

One connection on the Unix socket per mitmdump: the client sends its request
(a 4-byte length, then JSON: argv, cwd, env) with one file descriptor (where its
output goes: stdout and stderr), and reads two lines back: the mitmdump's pid,
then, once it has exited, its returncode as asyncio gives one (-N: killed by
signal N). A monitor process between the server and each mitmdump waits for its
exit and leaves it unreaped until the client closes the connection, so the pid
cannot name another process while the client may still signal it.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

from lifeline import die_with_parent

READY = "ready"
PR_SET_NAME = 15
LENGTH = struct.Struct("!I")
# Each of the chain test run -> server -> monitor -> mitmdump ends with the one before it.
ORPHANED = signal.SIGKILL


# -- the server --

def serve(path: str) -> None:
    from mitmproxy.tools.main import mitmdump  # the start-up each fork is spared

    die_with_parent(ORPHANED)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the system
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print(READY, flush=True)
    while True:
        conn, _ = listener.accept()
        try:
            request, out = receive(conn)
        except (OSError, ValueError) as e:  # a client that went away mid-request
            print(f"forkserver: a request failed: {e!r}", file=sys.stderr, flush=True)
            conn.close()
            continue
        if os.fork() == 0:
            listener.close()
            monitor(conn, request, out, mitmdump)  # never returns
        conn.close()
        os.close(out)


def receive(conn: socket.socket) -> tuple[dict, int]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 1)
    if len(fds) != 1 or len(data) < LENGTH.size:
        for fd in fds:
            os.close(fd)
        raise ValueError("a request without its output's descriptor")
    (size,) = LENGTH.unpack_from(data)
    data = data[LENGTH.size:]
    while len(data) < size:
        more = conn.recv(size - len(data))
        if not more:
            os.close(fds[0])
            raise ValueError("a request cut short")
        data += more
    return json.loads(data), fds[0]


def monitor(conn: socket.socket, request: dict, out: int, mitmdump) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # (ignored, it would leave nothing to wait for)
    die_with_parent(ORPHANED)
    pid = os.fork()
    if pid == 0:
        conn.close()
        run(request, out, mitmdump)  # never returns
    os.close(out)
    try:
        conn.sendall(f"{pid}\n".encode())
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        code = -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status
        conn.sendall(f"{code}\n".encode())
        conn.recv(1)  # until the client closes
    except OSError:
        pass  # the client has gone: nobody will signal the pid (it ends with the server, if not before)
    os.waitpid(pid, 0)
    os._exit(0)


def run(request: dict, out: int, mitmdump) -> None:
    """Become mitmdump with the request's arguments, directory and environment.
    It ends as the `mitmdump` command does, by SystemExit (raised here, or an
    exception's traceback): through the frames of serve and monitor, which hold
    nothing to clean up, to the interpreter's own exit."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    die_with_parent(ORPHANED)
    # Its name as ps and top show it (its command line stays the server's).
    ctypes.CDLL(None).prctl(PR_SET_NAME, Path(request["argv"][0]).name.encode()[:15])
    devnull = os.open(os.devnull, os.O_RDONLY)
    for target, fd in ((0, devnull), (1, out), (2, out)):
        os.dup2(fd, target)
    os.close(devnull)
    os.close(out)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    sys.exit(mitmdump())


# -- the client --

class Forked:
    """A forked mitmdump, as much of asyncio's Process as mitmdump_proc.Process uses."""

    def __init__(self, pid: int, stdout: asyncio.StreamReader, replies: asyncio.StreamReader,
                 connection: asyncio.StreamWriter) -> None:
        self.pid = pid
        self.stdout = stdout
        self._connection = connection
        self._exit = asyncio.ensure_future(self._exit_status(replies))

    async def _exit_status(self, replies: asyncio.StreamReader) -> int:
        line = await replies.readline()
        self._connection.close()  # the monitor may reap it now
        if not line:  # the server or the monitor died: so did the mitmdump (die_with_parent)
            return -signal.SIGKILL
        return int(line)

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)  # (unreaped until the exit status is read: never another's)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)


class ForkServer:
    """The server process, started on first use and stopped at the end of the session."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = str(folder / "forkserver.sock")
        self._proc = None

    def _start(self) -> None:
        Path(self.path).unlink(missing_ok=True)
        self._proc = subprocess.Popen([sys.executable, __file__, self.path], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, text=True)
        line = self._proc.stdout.readline().strip()
        if line != READY:
            self.stop()
            raise RuntimeError(f"the fork server did not start: {line!r}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()  # (its own process, by its pid: its children die with it)
            self._proc.wait()
            self._proc.stdout.close()
            self._proc = None

    async def start(self, argv: list[str], cwd: str, env: dict[str, str]) -> Forked:
        if self._proc is None or self._proc.poll() is not None:
            self.stop()  # (one that died: its socket's file is left behind)
            self._start()
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
            body = json.dumps({"argv": argv, "cwd": cwd, "env": env}).encode()
            socket.send_fds(sock, [LENGTH.pack(len(body)) + body], [write_end])
        except BaseException:
            sock.close()
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        replies, connection = await asyncio.open_unix_connection(sock=sock)
        stdout = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdout), os.fdopen(read_end, "rb", 0))
        line = await replies.readline()
        if not line:
            connection.close()
            raise RuntimeError("the fork server started no mitmdump")
        return Forked(int(line), stdout, replies, connection)


if __name__ == "__main__":
    serve(sys.argv[1])
