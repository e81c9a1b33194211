"""`scripts/probe` from the outside: the lab in every encoder behaviour is the server under study,
over HTTP/1.1, HTTP/2 and HTTP/3 (offered in Alt-Svc); the lab with its HTTP/3 unnamed, probed over
TCP alone unless --h3 asks for it; an unreachable port and TLS failures; a bundle that keeps no
secret; and `scripts/replay` of that bundle, which stalls again against hold-until-body and not
against fixed."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import SCRIPTS_ENV, flows_read_by_each_line, replay

from wslab.encoders import Behaviour

TIMEOUT = 1.5  # the probe's --timeout: its proxy reports a stall after 0.75 s
SPEC_FIELDS = {"event", "ts", "flow_id", "transport", "upstream_transport", "url", "policy",
               "accept_encoding_client", "accept_encoding_upstream", "waited_s", "status", "upstream_status",
               "client_bytes_before_status", "stuck_in", "received_s", "diagnosis"}

T = r"(?:\d+ ms|\d+\.\d s)"  # a time as the probe prints it: a busy machine can take over a second
# behaviour -> (exit status, what the verdict must say)
HELD = rf"0 of 2 attempts got a status in 1\.5 s with the offer, both got 200 in {T} without"
VERDICTS = {
    Behaviour.HOLD_UNTIL_BODY: (1, r"^verdict: this server withholds the HTTP/2 and HTTP/3 WebSocket status while "
                                   rf"accept-encoding is offered: HTTP/2: {HELD}; HTTP/3: {HELD}; over HTTP/1\.1 the "
                                   rf"status came in {T} either way$"),
    Behaviour.HOLD_UNTIL_MIN_SIZE: (1, r"^verdict: this server withholds the HTTP/2 and HTTP/3 WebSocket status "
                                       rf"while accept-encoding is offered: HTTP/2: {HELD}; HTTP/3: {HELD}; "),
    Behaviour.HOLD_1XX: (1, r"^verdict: this server withholds the HTTP/2, HTTP/3 and HTTP/1\.1 WebSocket status "
                            rf"while accept-encoding is offered: HTTP/2: {HELD}; HTTP/3: {HELD}; HTTP/1\.1: 0 of 2 "
                            r"attempts .* both got 101"),
    Behaviour.ENCODE_UPGRADE: (1, r"^verdict: this server encodes the HTTP/2, HTTP/3 and HTTP/1\.1 WebSocket "
                                  r"handshake response while accept-encoding is offered, so its messages arrive "
                                  r"compressed: 2 of 2 successful responses carried content-encoding: zstd"),
    Behaviour.FIXED: (0, rf"^verdict: no stall: status in {T} on every attempt over HTTP/2, HTTP/3 and HTTP/1\.1$"),
}


def probe(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bugreport.probe", *args], capture_output=True, text=True,
                          timeout=timeout, env=SCRIPTS_ENV)


def lab_probe(url: str, *args: str) -> subprocess.CompletedProcess:
    return probe(url, "--insecure", "--loopback-only", "--timeout", str(TIMEOUT), *args)


def start_lab(*args: str) -> tuple[subprocess.Popen, dict[str, tuple[int, int | None]]]:
    """The lab in a process of its own: {behaviour: (TCP port, UDP port of its HTTP/3 or None)}."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "wslab.lab", "--quiet", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=SCRIPTS_ENV)
    ports, seen = {}, []
    for line in proc.stdout:
        seen.append(line)
        if m := re.match(r"lab: (\S+) listening on https://127\.0\.0\.1:(\d+)", line):
            udp = re.search(r"HTTP/3 on UDP port (\d+)", line)
            ports[m.group(1)] = int(m.group(2)), int(udp.group(1)) if udp else None
        if line.startswith("lab: ready"):
            break
    else:
        stop(proc)
        raise RuntimeError("the lab did not start:\n" + "".join(seen))
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep its pipe drained
    return proc, ports


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def lab():
    """Every behaviour on its own port, HTTP/3 offered in Alt-Svc: {behaviour: TCP port}."""
    proc, ports = start_lab(*(a for b in Behaviour for a in ("--behaviour", b.value)))
    yield {b: tcp for b, (tcp, _udp) in ports.items()}
    stop(proc)


@pytest.fixture(scope="module")
def unnamed_h3():
    """hold-until-body with its HTTP/3 on the TCP port's number, but named in no Alt-Svc: its TCP port.
    (The system gives a TCP port whose UDP twin is taken now and then: the lab then starts again.)"""
    for _ in range(10):
        proc, ports = start_lab("--no-alt-svc", "--behaviour", Behaviour.HOLD_UNTIL_BODY.value)
        tcp, udp = ports[Behaviour.HOLD_UNTIL_BODY.value]
        if tcp == udp:
            yield tcp
            stop(proc)
            return
        stop(proc)
    raise RuntimeError("no TCP port whose UDP twin was free in 10 tries")


SECRETS = ("cookie-probe-c00k1e", "auth-probe-a07h", "token-probe-70ken", "jsession-probe-j5e55", "pw-probe-u5er")
BASIC = base64.b64encode(f"alice:{SECRETS[4]}".encode()).decode()  # the userinfo, as the header carries it


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tmp_path_factory.mktemp("probe") / "bundle"


@pytest.fixture(scope="module")
def verdicts(lab, bundle):
    """One probe per behaviour, three at a time: {behaviour: CompletedProcess}. The one against
    hold-until-body carries every kind of secret and writes a bundle."""
    cookie, auth, token, jsession, password = SECRETS
    secret_run = (f"wss://alice:{password}@127.0.0.1:{lab[Behaviour.HOLD_UNTIL_BODY.value]}/echo/probe"
                  f";jsessionid={jsession}?token={token}",
                  "--header", f"Cookie: sid={cookie}", "--header", f"Authorization: Bearer {auth}",
                  "--bundle", str(bundle))
    with ThreadPoolExecutor(3) as pool:
        runs = {b: pool.submit(lab_probe, *(secret_run if b == Behaviour.HOLD_UNTIL_BODY
                                             else (f"wss://127.0.0.1:{lab[b.value]}/echo",)))
                for b in VERDICTS}
        runs[REFUSED] = pool.submit(lab_probe, f"wss://127.0.0.1:{lab[Behaviour.FIXED.value]}/private")
        return {b: run.result() for b, run in runs.items()}


REFUSED = "refused"  # the lab's /private, which answers every handshake with 403


def test_a_refused_handshake_is_another_failure_not_blamed_on_encoding(verdicts):
    done = verdicts[REFUSED]
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == (
        "verdict: no stall attributable to encoding, but over HTTP/2, both attempts without accept-encoding "
        "failed too (refused with 403): not an encoding problem; over HTTP/3, both attempts without "
        "accept-encoding failed too (refused with 403): not an encoding problem; over HTTP/1.1, both attempts "
        "without accept-encoding failed too (refused with 403): not an encoding problem")


def attempt_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(r"  HTTP/(2|3|1\.1) ", line)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("behaviour", list(VERDICTS), ids=[b.value for b in VERDICTS])
def test_each_encoder_behaviour_gets_its_verdict_and_exit_status(verdicts, behaviour):
    done = verdicts[behaviour]
    out = done.stdout + done.stderr
    code, verdict = VERDICTS[behaviour]
    assert done.returncode == code, out
    assert re.search(verdict, done.stdout.splitlines()[-1]), out
    assert re.search(r"HTTP/2 with RFC 8441 WebSockets; HTTP/3 \(Alt-Svc: h3, UDP port \d+\) with RFC 9220 "
                     r"WebSockets\n  trying HTTP/2, HTTP/3 and HTTP/1\.1, each with and without accept-encoding\n",
                     done.stdout), out
    # Every attempt printed: every transport, with and without the offer, each speaker.
    lines = attempt_lines(done.stdout)
    assert len(lines) == 12, out
    for transport in ("HTTP/2  ", "HTTP/3  ", "HTTP/1.1"):
        for offer in ("with accept-encoding", "no accept-encoding"):
            for speaker in ("client-first", "server-first"):
                assert sum(transport in line and offer in line and speaker in line for line in lines) == 1, out
    # The records printed are the addon's: every field of the report, one handshake record per attempt.
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("  {")]
    assert all(SPEC_FIELDS <= set(r) for r in records), records
    ends = [r for r in records if r["event"] == "handshake"]
    assert sorted(r["transport"] for r in ends) == ["h1"] * 4 + ["h2"] * 4 + ["h3"] * 4
    assert all(r["upstream_transport"] == r["transport"] for r in ends), ends  # HTTP/3 went on over HTTP/3
    # Withheld by the upstream: a stall while forwarded (one while connecting, on a busy machine, is not).
    held = [r for r in records if r["event"] == "stall" and r["stuck_in"] == "forwarded"]
    if code == 0 or behaviour == Behaviour.ENCODE_UPGRADE:
        assert not held and all(r["outcome"] == "upgraded" for r in ends), out
    else:
        assert held and all(r["accept_encoding_client"] for r in held), out
        assert all("stall" in r["diagnosis"].lower() for r in held)
        assert all(r["stalled"] for r in ends if r["flow_id"] in {s["flow_id"] for s in held})
        held = [line for line in lines if "with accept-encoding" in line and re.match("  HTTP/[23] ", line)]
        assert len(held) == 4 and all("no status in 1.5 s" in line for line in held), out


def test_an_unreachable_port_is_another_failure_and_says_so(unused_port):
    done = probe(f"wss://127.0.0.1:{unused_port}/echo", "--timeout", "1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == (
        f"verdict: cannot probe wss://127.0.0.1:{unused_port}/echo: connection refused by "
        f"127.0.0.1:{unused_port}: nothing listens there")


def test_an_untrusted_certificate_is_a_tls_failure_that_names_insecure(lab):
    port = lab[Behaviour.FIXED.value]
    done = probe(f"wss://127.0.0.1:{port}/echo", "--timeout", "2")
    assert done.returncode == 2, done.stdout + done.stderr
    last = done.stdout.splitlines()[-1]
    assert last.startswith(f"verdict: cannot probe wss://127.0.0.1:{port}/echo: TLS failed: the certificate")
    assert "not trusted" in last and "add --insecure" in last


def test_a_port_that_does_not_speak_tls_is_a_tls_failure():
    with socket.create_server(("127.0.0.1", 0)) as server:
        def answer_plain_http():
            while True:  # the probe connects twice: TCP alone, then TLS
                try:
                    conn, _ = server.accept()
                except OSError:
                    return  # the test is over
                with conn:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

        threading.Thread(target=answer_plain_http, daemon=True).start()
        port = server.getsockname()[1]
        done = probe(f"wss://127.0.0.1:{port}/", "--timeout", "2")
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"TLS failed with 127.0.0.1:{port}" in done.stdout and "is it a TLS port?" in done.stdout


def test_a_bundle_keeps_no_secret_and_its_flows_load_in_both_lines(verdicts, bundle):
    done = verdicts[Behaviour.HOLD_UNTIL_BODY]
    out = done.stdout + done.stderr
    assert f"bundle written to {bundle}" in done.stdout, out
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle"]  # nothing half-written beside it
    files = sorted(bundle.iterdir())
    assert [p.name for p in files] == ["flows.mitm", "report.jsonl", "summary.md"]
    for secret in (*SECRETS, BASIC):
        assert secret not in out, secret
        for f in files:
            assert secret.encode() not in f.read_bytes(), (secret, f.name)
    summary = (bundle / "summary.md").read_text()
    assert "`authorization` (12), `cookie` (12)" in summary and "userinfo went as an `authorization: Basic`" in summary
    assert summary.count("/echo/probe;jsessionid=REDACTED?token=REDACTED") >= 12
    assert "12 attempts over HTTP/2, HTTP/3 and HTTP/1.1" in summary
    assert "verdict: this server withholds the HTTP/2 and HTTP/3 WebSocket status" in summary
    assert summary.count("| HTTP/3 | offered |") == 2 and summary.count("| HTTP/3 | none |") == 2
    records = [json.loads(line) for line in (bundle / "report.jsonl").read_text().splitlines()]
    ends = [r for r in records if r["event"] == "handshake"]
    assert len(ends) == 12 and sum(r["transport"] == "h3" for r in ends) == 4

    counts = flows_read_by_each_line(bundle / "flows.mitm")
    assert list(counts.values()) == ["12"] * len(counts), counts


def test_a_bundle_folder_that_is_not_empty_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    done = probe("wss://127.0.0.1:9/echo", "--bundle", str(tmp_path))
    assert done.returncode == 2 and "is not empty" in done.stderr and "--force" in done.stderr
    assert done.stdout == "" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.fixture(scope="module")
def replays(lab, verdicts, bundle):
    """The probe's bundle of hold-until-body replayed against hold-until-body and against fixed, at once."""
    assert verdicts[Behaviour.HOLD_UNTIL_BODY].returncode == 1
    with ThreadPoolExecutor(2) as pool:
        runs = {b: pool.submit(replay, str(bundle), "--target", f"wss://127.0.0.1:{lab[b]}", "--insecure",
                               "--loopback-only", "--timeout", str(TIMEOUT))
                for b in (Behaviour.HOLD_UNTIL_BODY.value, Behaviour.FIXED.value)}
        return {b: run.result() for b, run in runs.items()}


# behaviour replayed against -> (exit status, the last line, what observe says of a recorded stall)
ENDINGS = {
    Behaviour.HOLD_UNTIL_BODY.value: (1, "replay: 4 of 4 recorded stalls recur against wss://127.0.0.1:{port}/",
                                      "the recorded stall recurs"),
    Behaviour.FIXED.value: (0, "replay: no recorded stall recurs against wss://127.0.0.1:{port}/ (4 were recorded)",
                            "the recorded stall is gone"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("behaviour", list(ENDINGS))
def test_a_recorded_stall_recurs_against_its_behaviour_and_not_against_fixed(replays, lab, behaviour):
    done = replays[behaviour]
    out = done.stdout + done.stderr
    code, last, note = ENDINGS[behaviour]
    assert done.returncode == code, out
    assert done.stdout.splitlines()[-1] == last.format(port=lab[behaviour]), out
    assert "HTTP/3 handshakes reach it" not in done.stdout  # (over HTTP/3 end to end: the lab offers it)
    blocks = done.stdout.split("\n\n")[1:-1]
    assert len(blocks) == 12, out
    assert sum(". HTTP/3 " in block for block in blocks) == 4, out
    for block in blocks:
        head, was, observe, strip = block.splitlines()
        assert was.split()[0] == "recorded" and observe.split()[0] == "observe" and strip.split()[0] == "strip"
        assert "upgraded" in strip and "stall" not in strip, block  # the workaround works, always
        if re.search(r"\. HTTP/[23] +with accept-encoding", head):
            assert "no-status ⌛" in was and observe.endswith(note), block
        else:
            assert "⌛" not in was and "upgraded" in observe and "stall" not in observe, block
    assert not [secret for secret in (*SECRETS, BASIC) if secret in out]


# -- HTTP/3 where the server does not name it -------------------------------------------------------


@pytest.fixture(scope="module")
def unnamed_probes(unnamed_h3):
    """The probe of hold-until-body with its HTTP/3 unnamed, without --h3 and with it, at once."""
    url = f"wss://127.0.0.1:{unnamed_h3}/echo"
    with ThreadPoolExecutor(2) as pool:
        runs = {h3: pool.submit(lab_probe, url, *(["--h3"] if h3 else [])) for h3 in (False, True)}
        return {h3: run.result() for h3, run in runs.items()}


@pytest.mark.timeout(120)
def test_a_server_that_offers_no_http3_is_probed_over_tcp_alone_and_says_so(unnamed_probes):
    done = unnamed_probes[False]
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "HTTP/2 with RFC 8441 WebSockets; no HTTP/3 offered (no Alt-Svc: h3 on its responses)\n" in done.stdout
    not_tried = "HTTP/3 not tried: the server offers none in Alt-Svc, and --h3 was not given"
    assert f"  trying HTTP/2 and HTTP/1.1, each with and without accept-encoding; {not_tried}\n" in done.stdout
    lines = attempt_lines(done.stdout)
    assert len(lines) == 8 and not [line for line in lines if "HTTP/3" in line], out
    last = done.stdout.splitlines()[-1]
    assert last.startswith("verdict: this server withholds the HTTP/2 WebSocket status while") and \
        last.endswith(f" either way ({not_tried})"), out


@pytest.mark.timeout(120)
def test_h3_asks_for_http3_on_the_urls_port_and_finds_the_held_status_there(unnamed_probes, unnamed_h3):
    done = unnamed_probes[True]
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert f"; HTTP/3 (--h3, UDP port {unnamed_h3}) with RFC 9220 WebSockets\n" in done.stdout, out
    assert "  trying HTTP/2, HTTP/3 and HTTP/1.1, each with and without accept-encoding\n" in done.stdout, out
    held = [line for line in attempt_lines(done.stdout) if line.startswith("  HTTP/3   with accept-encoding")]
    assert len(held) == 2 and all("no status in 1.5 s" in line and "no-status ⌛" in line for line in held), out
    assert re.search(rf"^verdict: this server withholds the HTTP/2 and HTTP/3 WebSocket status .*HTTP/3: {HELD};",
                     done.stdout.splitlines()[-1]), out


def test_http3_that_never_answers_is_not_tried_and_says_why():
    """An offered UDP port where nothing answers (a firewall dropping QUIC): said, and the probe goes on."""
    from bugreport.target import Target, look_at_h3

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        found = asyncio.run(look_at_h3(Target.parse(f"wss://127.0.0.1:{port}/"), port, True, True, 0.3))
    assert not found.rfc9220
    assert found.describe() == f"HTTP/3 (Alt-Svc: h3, UDP port {port}) did not come up: no QUIC answer on UDP port " \
                               f"{port} in 0.3 s"
    assert found.not_tried() == f"HTTP/3 not tried: no QUIC answer on UDP port {port} in 0.3 s"


@pytest.mark.parametrize("fields, port", [
    (['h3=":8443"; ma=86400, h3-29=":8443"'], 8443),
    (['h3-29=":443", h3=":4433"'], 4433),
    (['h2=":443"', 'h3="127.0.0.1:4433"; persist=1'], 4433),  # the same host, named
    (['h3="other.example:443"'], None),  # another host: not followed
    (['h3-29=":443"'], None),  # a draft: no RFC 9220
    (["clear"], None),
    (['h3=":0"', 'h3=":99999"', 'h3=":https"'], None),
    ([], None),
])
def test_alt_svc_offers_http3_on_a_port_of_the_same_host(fields, port):
    from bugreport.target import h3_alternative

    assert h3_alternative(fields, "127.0.0.1") == port


TOKEN_ECHOED = "h3-70ken-echoed"


def test_a_quic_close_that_quotes_the_request_is_never_printed(cert):
    """A peer that closes the whole QUIC connection with a reason quoting a header the user gave:
    the attempt's failure names the error code, not the reason."""
    from aioquic.h3.events import HeadersReceived
    from wspeers import h3ws

    from bugreport import attempt

    def peer(quic, listener):
        def on_event(event):
            if isinstance(event, HeadersReceived):
                token = dict(event.headers).get(b"x-token", b"").decode()
                h3peer.close_connection(h3ws.ErrorCode.H3_MESSAGE_ERROR, f"refused x-token {token}")

        h3peer = h3ws.H3Peer(quic, on_event, router=listener)
        return h3peer

    async def scenario():
        listener = await h3ws.listen(h3ws.server_configuration(*cert), peer)
        try:
            shake = attempt.Handshake("h3", None, "client", "/", "localhost", (("x-token", TOKEN_ECHOED),))
            return await attempt.run(listener.transport.get_extra_info("sockname")[1], shake, 5)
        finally:
            await listener.close(1)

    seen = asyncio.run(scenario())
    assert seen.status is None and seen.error is not None
    assert "connection closed by peer with H3_MESSAGE_ERROR (0x10e)" in seen.error, seen.error
    assert TOKEN_ECHOED not in seen.error and "refused" not in seen.error


# -- hostile servers, odd paths and bad arguments -------------------------------------------------

TOKEN = "k8s-bearer-70ken-5ecret"


async def probe_against(handler, *args: str) -> subprocess.CompletedProcess:
    """The probe of a ws:// server on 127.0.0.1 that answers each connection with `handler`."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bugreport.probe", f"ws://127.0.0.1:{port}/socket", "--loopback-only", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=SCRIPTS_ENV)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.close()
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def handshake_head(reader: asyncio.StreamReader) -> dict[str, str] | None:
    """The request's header fields (lowercase names), or None for the probe's bare TCP look at the port."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}


async def echo_subprotocols_whole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A 101 that echoes Sec-WebSocket-Protocol back whole, not one of the offered ones: a common bug."""
    from wsproto.utilities import generate_accept_token

    fields = await handshake_head(reader)
    if fields is not None:
        accept = generate_accept_token(fields["sec-websocket-key"].encode())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                     b"sec-websocket-accept: %s\r\nsec-websocket-protocol: %s\r\n\r\n"
                     % (accept, fields["sec-websocket-protocol"].encode()))
        await reader.read()  # until the client gives up
    writer.close()


@pytest.mark.timeout(120)
def test_a_subprotocol_the_server_echoes_back_whole_is_never_printed(tmp_path):
    bundle = tmp_path / "bundle"
    done = asyncio.run(probe_against(
        echo_subprotocols_whole, "--subprotocol", f"base64url.bearer.authorization.k8s.io.{TOKEN}",
        "--subprotocol", "base64.binary.k8s.io", "--timeout", "2", "--bundle", str(bundle)))
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert TOKEN not in out
    shown = "RemoteProtocolError: unrecognized subprotocol (value not shown)"
    assert sum(shown in line for line in attempt_lines(done.stdout)) == 4
    assert shown in done.stdout.splitlines()[-1]
    for name in ("summary.md", "report.jsonl"):
        assert TOKEN not in (bundle / name).read_text(), name
    assert "Traceback" not in out


ENDLESS = 64 * 1024 * 1024  # what the server sends of its head at the most


@pytest.mark.timeout(120)
def test_a_response_head_that_never_ends_is_cut_off_by_the_probes_proxy():
    cut, endless = [], []

    async def endless_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await handshake_head(reader) is None:
            writer.close()
            return
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nx-endless: ")
        sent = 0
        try:
            while sent < ENDLESS:
                writer.write(b"a" * 65536)
                sent += 65536
                await writer.drain()
        except ConnectionError:
            cut.append(sent)
            return
        endless.append(sent)
        writer.close()

    done = asyncio.run(probe_against(endless_head, "--timeout", "3"))
    out = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in out, out
    assert not endless and len(cut) == 4, (cut, endless)  # every head cut off, long before the server's end
    assert all("refused with 502" in line or "502 in" in line for line in attempt_lines(done.stdout)), out


@pytest.mark.parametrize("tool", ["probe", "replay"])
@pytest.mark.parametrize("value", ["-1", "0", "nan", "soon"])
def test_a_timeout_that_is_not_a_positive_number_is_refused_by_the_arguments(tmp_path, tool, value):
    if tool == "probe":
        done = probe("wss://127.0.0.1:9/echo", "--timeout", value)
    else:
        done = replay(str(tmp_path), "--target", "wss://127.0.0.1:9", "--timeout", value)
    assert done.returncode == 2 and done.stdout == ""
    assert f"argument --timeout: {value!r} " in done.stderr and "seconds" in done.stderr, done.stderr


def test_a_bundle_folder_that_is_a_link_to_an_empty_folder_gets_the_probes_bundle(lab, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    done = lab_probe(f"wss://127.0.0.1:{lab[Behaviour.FIXED.value]}/echo", "--bundle", str(link))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"bundle written to {link}" in done.stdout and "Traceback" not in done.stderr
    assert sorted(p.name for p in real.iterdir()) == ["flows.mitm", "report.jsonl", "summary.md"]


def test_a_bundle_folder_nothing_can_be_written_in_is_refused_before_anything_runs():
    done = probe("wss://127.0.0.1:9/echo", "--bundle", "/proc/ws-encode-bundle")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("probe: --bundle: no folder can be made in /proc:") and "--force" not in done.stderr
