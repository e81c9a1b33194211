"""The README's main job: `scripts/repro`'s matrix (HTTP/2, HTTP/3 and HTTP/1.1), its checks and its
bundle, from the outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from wslab import haproxy
from wslab.clients import Seen
from wslab.matrix import Cell, Result, cells, check, expect

STALL = 1.0


def repro(*args: str, cwd, timeout: float = 100) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="220")
    return subprocess.run([sys.executable, "-m", "wslab.repro", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


@pytest.mark.timeout(150)
def test_the_matrix_matches_every_behaviour_and_the_bundle_holds_the_run(tmp_path):
    bundle = tmp_path / "bundle"
    done = repro("--stall", str(STALL), "--bundle", str(bundle), cwd=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    grid = cells(haproxy.available())
    assert f"all {len(grid)} cells as expected" in done.stdout, out
    if not haproxy.available():
        assert "HAProxy is not installed" in done.stdout
    assert "aioquic 1." in done.stdout  # the HTTP/3 side's library, in the environment line
    # The table, printed as it went: every cell has a row, and the addon's live
    # stall line follows each deadlocked cell whose success is a 200 (HTTP/2, HTTP/3).
    for cell in grid:
        assert cell.name in done.stdout, cell.name
    # every behaviour, speaker and policy, and inject; and the event streams' four behaviours and two policies
    assert sum(c.transport == "h3" for c in grid) == 21 + 8
    lines = done.stdout.splitlines()
    for transport in ("h2", "h3"):
        row = next(i for i, line in enumerate(lines)
                   if line.startswith(f"{transport} hold-until-body client-first observe "))
        assert "gave up" in lines[row] and "no-status" in lines[row]
        after = next(line for line in lines[row + 1:] if not line.startswith(" " * 40))  # (past its wrapped diagnosis)
        assert "mitmdump |" in after and "stall on" in after and f"/echo/{transport}-hold-until-body" in after

    records = [json.loads(line) for line in (bundle / "report.jsonl").read_text().splitlines()]
    for transport in ("h2", "h3"):
        mine = [r for r in records if r["url"].split("?")[0].endswith(f"/echo/{transport}-hold-until-body-observe")]
        assert [r["event"] for r in mine] == ["stall", "handshake"]
        assert all((r["transport"], r["upstream_transport"]) == (transport, transport) for r in mine)
        assert STALL <= mine[0]["received_s"] and "stall" in mine[0]["diagnosis"].lower()  # (how late: the bench's goal 4)
        assert mine[1]["outcome"] == "no-status" and mine[1]["stalled"] is True
    assert "REDACTED" in next(r["url"] for r in records if "/greet/" in r["url"])  # ?after= is a query value
    # An event stream whose head an encoder held: one stall, then opened with the first event.
    for transport in ("h1", "h2", "h3"):
        mine = [r for r in records if r["url"].split("?")[0].endswith(f"/events/{transport}-hold-until-body-observe")]
        assert [(r["event"], r["kind"]) for r in mine] == [("stall", "event-stream"), ("handshake", "event-stream")]
        assert mine[1]["outcome"] == "opened" and mine[1]["first_event_s"] is not None

    from mitmproxy import io

    with open(bundle / "flows.mitm", "rb") as f:
        flows = list(io.FlowReader(f).stream())
    assert len(flows) == len(grid)
    assert sum(f.request.http_version == "HTTP/3" for f in flows) == 21 + 8
    for transport in ("h2", "h3"):
        held = next(f for f in flows if f.request.path == f"/echo/{transport}-hold-until-body-observe")
        assert "stall" in held.comment.lower()

    summary = (bundle / "summary.md").read_text()
    from mitmproxy.version import VERSION

    assert f"mitmproxy: {VERSION}" in summary and f"Python: {sys.version.split()[0]}" in summary
    assert "| h2 hold-until-body client-first observe | gave up |" in summary
    assert "| h3 hold-until-body client-first observe | gave up |" in summary
    assert "| h3 hold-1xx server-first observe | greeted |" in summary  # released with the greeting, late
    assert "| h3 buffer-events event-stream observe | head only |" in summary
    assert summary.count("| ok |") == len(grid)


@pytest.mark.timeout(60)
def test_a_cell_that_disagrees_is_named_and_fails_the_run(tmp_path):
    """A gziphandler whose minimum is smaller than the greeting lets a
    server-first socket through late: not what hold-until-min-size must do."""
    cell = "h2 hold-until-min-size server-first observe"
    done = repro("--only", cell, "--min-size", "8", "--stall", "0.4", cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"FAIL {cell}: client 'greeted', expected 'gave up'" in done.stdout
    assert "1 of 1 cells disagree" in done.stdout


def result(cell: Cell, seen: Seen, **record) -> Result:
    base = {"outcome": "upgraded", "stalled": False, "content_encoding": None, "diagnosis": "Upgraded.",
            "accept_encoding_upstream": cell.accept_encoding, "waited_s": 0.01, "transport": cell.transport,
            "upstream_transport": cell.transport}
    return Result(cell, seen, {**base, **record}, None, [])


def test_checks_catch_a_held_status_that_came_at_once_and_an_encoded_upgrade_not_named():
    held = Cell("h2", "hold-until-body", "client", "observe")
    problems = check(result(held, Seen("echoed", 200, 0.01)), expect(held), 1.0)
    assert "client 'echoed', expected 'gave up'" in problems
    assert "stalled False, expected True" in problems and "no stall record" in problems

    encoded = Cell("h1", "encode-upgrade", "server", "observe")
    problems = check(result(encoded, Seen("unreadable", 101, 0.01)), expect(encoded), 1.0)
    assert problems[0] == "content-encoding None, expected 'zstd'"
    assert any("diagnosis lacks 'content-encoding'" in p for p in problems)

    healthy = Cell("h2", "fixed", "server", "strip")
    assert check(result(healthy, Seen("greeted", 200, 0.01), accept_encoding_upstream=None),
                 expect(healthy), 1.0) == []


def test_checks_catch_a_cell_carried_over_another_transport():
    """An HTTP/3 handshake the addon saw as HTTP/2, or sent on over HTTP/1.1 (a fallback), is named."""
    cell = Cell("h3", "fixed", "client", "observe")
    problems = check(result(cell, Seen("echoed", 200, 0.01), transport="h3", upstream_transport="h1"),
                     expect(cell), 1.0)
    assert problems == ["upstream_transport 'h1', expected 'h3'"]
    problems = check(result(cell, Seen("echoed", 200, 0.01), transport="h2", upstream_transport="h3"),
                     expect(cell), 1.0)
    assert problems == ["transport 'h2', expected 'h3'"]


def test_http3_holds_the_status_where_http2_does():
    """Over HTTP/3 the success is a 200 as over HTTP/2: the same behaviours hold it, and a server that
    speaks first releases it with its first message, diagnosed by that."""
    for behaviour in ("hold-until-body", "hold-until-min-size", "hold-1xx", "encode-upgrade", "fixed"):
        for speaker in ("client", "server"):
            h2, h3 = (expect(Cell(t, behaviour, speaker, "observe")) for t in ("h2", "h3"))
            assert h3 == h2, (behaviour, speaker)
    assert expect(Cell("h3", "hold-1xx", "server", "observe")).words == ("first response data",)
    assert expect(Cell("h1", "hold-until-body", "client", "observe")).stalled is False


@pytest.mark.timeout(60)
def test_rows_come_in_the_grids_order_with_a_legend_and_whole_diagnoses(tmp_path):
    """The strip cells finish first and the deadlocked observe cell last: the table still reads in
    the grid's order, and the long diagnoses are wrapped, never cut."""
    done = repro("--only", "h2 hold-until-body", "--stall", "0.4", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    names = [c.name for c in cells(haproxy.available()) if "h2 hold-until-body" in c.name]
    rows = [next(i for i, line in enumerate(lines) if line.startswith(name + " ")) for name in names]
    assert rows == sorted(rows), done.stdout
    assert "…" not in done.stdout
    held = lines[rows[0]:rows[1]]
    diagnosis = " ".join(line.strip() for line in held if not line.lstrip().startswith("mitmdump |"))
    assert len(held) > 1 and "retry with ws_encode_policy=strip to confirm." in diagnosis, held
    legend = next(line for line in lines if line.startswith("client: "))
    assert "unreadable = frames came back but not that message" in done.stdout.replace("\n  ", " "), legend


def test_a_diagnosis_wraps_under_its_column_or_below_the_row_in_a_narrow_terminal():
    from wslab.matrix import row_lines

    cells_ = ["h2 fixed client-first observe", "echoed", "0.01 s", "upgraded", "word " * 40]
    wide = row_lines(cells_, 160)
    assert len(wide) == 3 and all(line.startswith(" " * 85) for line in wide[1:])
    assert " ".join(line[85:] for line in wide).split() == ["word"] * 40
    narrow = row_lines(cells_, 100)
    assert narrow[0] == "h2 fixed client-first observe               echoed     0.01 s  upgraded"
    assert all(line.startswith("    word") for line in narrow[1:])
