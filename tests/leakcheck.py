"""What must never leave a client's request: secrets, and control characters.

SPEC: cookies, `authorization` and `proxy-authorization` values, query values,
path-parameter values, fragments and userinfo never appear in the report, the
addon's log lines, comments, metadata or command answers; nor does any control
character a client sent. These helpers look in all of those places (the
mitmdump output, the JSONL report, a `-w` flow file, the wsencode commands'
answers) and say where something leaked.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from conftest import ROOT, Mitmdump

# Loaded next to the addon: answers /__wsencode__/<command> (tests/command_answers.py).
COMMAND_ANSWERS = ROOT / "tests" / "command_answers.py"
COMMANDS = ("wsencode.stalls", "wsencode.waiting")

# C0 controls (tab included), DEL and C1 controls.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# A line a client tries to add to the proxy's log: it starts like one of
# mitmproxy's own lines, with a time stamp.
FAKE_LINE = "[00:00:00.000] INJECTED-LINE"
# How mitmproxy starts each line it logs (tracebacks aside, which fail a test anyway).
TIME_STAMP = re.compile(r"\[\d\d:\d\d:\d\d\.\d{3}\]")


def strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """Every string inside `value` (keys included), with where it sits."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, bytes):
        yield where, value.decode("latin-1")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k, f"{where} key")
            yield from strings(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from strings(v, f"{where}[{i}]")


def leaks(texts: Iterable[tuple[str, str]], secrets: Iterable[str]) -> list[str]:
    """What is wrong with `texts`: a secret in one, or a control character."""
    secrets = [s for s in secrets if s]
    found = []
    for where, text in texts:
        for secret in secrets:
            if secret in text:
                found.append(f"{where}: secret {secret!r} in {text[:300]!r}")
        control = CONTROL.search(text)
        if control:
            found.append(f"{where}: control character {control.group(0)!r} in {text[:300]!r}")
    return found


def log_leaks(lines: Iterable[str], secrets: Iterable[str]) -> list[str]:
    """Leaks in mitmdump's output, and lines a client managed to start."""
    lines = list(lines)
    found = leaks(((f"log line {i}", line) for i, line in enumerate(lines)), secrets)
    found += [
        f"log line {i}: a line the client started: {line[:300]!r}"
        for i, line in enumerate(lines)
        if line.lstrip(" \t\r").startswith(FAKE_LINE[:14])
    ]
    found += [
        f"log line {i}: not started by the proxy (a line break in what it logged?): {line[:300]!r}"
        for i, line in enumerate(lines)
        if not TIME_STAMP.match(line) and line != "<exited>"
    ]
    return found


def flows_in(path: Path) -> list:
    """The flows a `-w` file holds."""
    from mitmproxy import io

    if not path.exists():
        return []
    with open(path, "rb") as f:
        return list(io.FlowReader(f).stream())


def flow_texts(flows: Iterable) -> Iterator[tuple[str, str]]:
    """What the addon (or anyone) kept on each flow for the user: comment, mark, metadata."""
    for flow in flows:
        # The addon adds to a comment a line at a time; its own line breaks are no leak.
        for i, line in enumerate(flow.comment.split("\n")):
            yield from strings(line, f"flow {flow.id} comment line {i}")
        yield from strings(flow.marked, f"flow {flow.id} mark")
        yield from strings(flow.metadata, f"flow {flow.id} metadata")


async def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    """A plain HTTP/1.1 GET on a fresh connection: (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    try:
        response = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def command_answers(port: int) -> dict[str, list[str]]:
    """What the wsencode commands answer now (the proxy must load COMMAND_ANSWERS)."""
    answers = {}
    for name in COMMANDS:
        status, body = await http_get(port, f"/__wsencode__/{name}")
        assert status == 200, (name, status, body)
        answers[name] = json.loads(body)
        assert answers[name], f"{name} answered nothing"
    return answers


def everything_leaked(
    md: Mitmdump, secrets: Iterable[str], flows_file: Path | None = None, answers: dict | None = None
) -> list[str]:
    """Every leak in the log, the report, the flow file and command answers."""
    secrets = list(secrets)
    found = log_leaks(md.lines, secrets)
    if md.report:
        found += leaks(strings(md.records(), "report"), secrets)
    if flows_file is not None:
        found += leaks(flow_texts(flows_in(flows_file)), secrets)
    if answers is not None:
        found += leaks(strings(answers, "answer"), secrets)
    return found
