"""The README's main job: the local reproduction diagnoses the stall and shows the fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.timeout(120)
def test_reproduce_shows_a_diagnosed_stall_and_the_fix(tmp_path):
    report = tmp_path / "repro.jsonl"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--stall", "0.5", "--report", str(report)],
        capture_output=True, text=True, timeout=100, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "h2: observe: stall diagnosed live: yes; strip: handshake completes: yes" in done.stdout
    assert "h1: observe: stall diagnosed live: yes; strip: handshake completes: yes" in done.stdout
    records = [json.loads(line) for line in report.read_text().splitlines()]
    assert [(r["transport"], r["policy"], r["event"]) for r in records] == [
        ("h2", "observe", "stall"), ("h2", "observe", "handshake"), ("h2", "strip", "handshake"),
        ("h1", "observe", "stall"), ("h1", "observe", "handshake"), ("h1", "strip", "handshake"),
    ]
    assert "secret-value" not in report.read_text() and "secret-value" not in done.stdout
