"""The report: JSON Lines, one object a line, appended and flushed as written.

A record is flushed to the operating system before `write` returns, so a
killed proxy loses no finished record. Only redacted URLs and the encoding
headers go in: cookies, authorization and query values never do.
"""

from __future__ import annotations

import datetime
import json
import urllib.parse
from pathlib import Path
from typing import IO, Any

REDACTED = "REDACTED"


def redact_url(url: str) -> str:
    """`url` with every query value (and any userinfo) replaced by REDACTED.

    Names stay, so a reader can still tell `?token=` from `?room=`.
    """
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = "&".join(
        f"{item.split('=', 1)[0]}={REDACTED}" if "=" in item else REDACTED
        for item in parts.query.split("&")
        if item
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def utc_now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class ReportWriter:
    """Appends records to one file; opened when the option is set."""

    def __init__(self, path: Path):
        self.path = path
        # Line buffering flushes each record; the file is opened here so that
        # an unwritable path is refused when the option is set, not later.
        self._file: IO[str] = open(path, "a", encoding="utf-8", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
