"""The report: JSON Lines, one object a line, appended and flushed as written.

A record is flushed to the operating system before `write` returns, so a
killed proxy loses no finished record. Only redacted URLs and the encoding
headers go in, with any control character escaped: cookies, authorization,
query and path-parameter values never do.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import stat
import time
import urllib.parse
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger("ws_encode")

REDACTED = "REDACTED"

# C0 controls, DEL and C1 controls: a client could otherwise start a new log
# line, or move the cursor of the terminal that shows it.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with every control character written as a visible escape, and
    every lone surrogate too (what bytes that are not UTF-8 decode to in
    mitmproxy): a flow whose metadata holds one cannot be saved."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


def _redact_items(text: str, separator: str) -> str:
    """`name=value` items joined by `separator`: names stay, values go."""
    return separator.join(
        f"{item.split('=', 1)[0]}={REDACTED}" if "=" in item else REDACTED for item in text.split(separator) if item
    )


def _redact_path(path: str) -> str:
    # Path parameters (`/chat;jsessionid=...`, RFC 3986 section 3.3) carry
    # session ids as often as the query does.
    segments = []
    for segment in path.split("/"):
        name, semicolon, params = segment.partition(";")
        segments.append(f"{name};{_redact_items(params, ';')}" if semicolon else name)
    return "/".join(segments)


# A URL with nothing to escape or redact but its query values (a lowercase
# scheme, a host and port, a path of printable ASCII without path parameters,
# no fragment): what every handshake's URL is, and what the parse below gives
# back as it was, query aside (tests/test_core.py checks both ways agree).
_PLAIN_URL = re.compile(
    r"(?P<base>[a-z][a-z0-9+.-]*://[A-Za-z0-9._~:-]+(?:/[A-Za-z0-9._~!$&'()*+,=:@%/-]*)?)"
    r"(?:\?(?P<query>[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*))?"
)


def redact_url(url: str) -> str:
    """`url` with every query value, path-parameter value, fragment and any
    userinfo replaced by REDACTED, and control characters escaped.

    Names stay, so a reader can still tell `?token=` from `?room=`.
    """
    plain = _PLAIN_URL.fullmatch(url)
    if plain is None:
        return _redact_parsed(url)
    query = _redact_items(plain["query"] or "", "&")
    return f"{plain['base']}?{query}" if query else plain["base"]


def _redact_parsed(url: str) -> str:
    # Escaped first: urlsplit would silently drop a tab or line feed.
    url = printable(url)
    # A request mitmproxy refused before it knew the scheme reads
    # "://user:pw@host/...": parse it as scheme-relative, so userinfo is found.
    prefix = ""
    if url.startswith("://"):
        prefix, url = ":", url[1:]
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        # A host urlsplit refuses ("Invalid IPv6 URL" for an unbalanced
        # bracket, a non-ASCII one NFKC turns into a delimiter): a client's
        # Host header can be anything. Percent-encoded, nothing is refused.
        parts = urllib.parse.urlsplit(urllib.parse.quote(url, safe=_ASCII_BUT_BRACKETS))
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    fragment = REDACTED if parts.fragment else ""
    return prefix + urllib.parse.urlunsplit(
        (parts.scheme, netloc, _redact_path(parts.path), _redact_items(parts.query, "&"), fragment)
    )


_ASCII_BUT_BRACKETS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "[]")


def redact_path(target: str) -> str:
    """A request target (path and query) redacted as `redact_url` does."""
    return redact_url(_SOME_ORIGIN + target)[len(_SOME_ORIGIN):]


_SOME_ORIGIN = "x://h"


def utc_now_iso() -> str:
    """Now in UTC, ISO 8601 to the millisecond: `2026-12-02T04:42:43.498+00:00`."""
    now = time.time()
    second = int(now)
    return f"{_utc_second(second)}.{int((now - second) * 1000):03d}+00:00"


@functools.lru_cache(maxsize=2)
def _utc_second(second: int) -> str:
    # Every record has a time: the date and time of day are formatted once a second.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


_JSON_LINE = json.JSONEncoder(separators=(",", ":"))  # (json.dumps makes an encoder a call)


class NotARegularFile(OSError):
    """The path names a FIFO, a device, a socket or a folder: nothing a
    report or a bundle can be (its strerror says which, for a person)."""

    def __str__(self) -> str:
        return self.strerror  # (no "[Errno 22]": the errno is this module's choice, not the system's word)


_KINDS = ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind_of(mode: int) -> str:
    """What a file of this `st_mode` is, for a person: "a FIFO", "a folder", ..."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def open_regular(path: str | os.PathLike[str], flags: int, mode: str, **fdopen_args: Any) -> IO:
    """`path` opened with os.open `flags`, then as os.fdopen(mode,
    **fdopen_args); NotARegularFile if it is anything but a regular file.

    Never blocks: a plain open() of a FIFO waits until its other end is
    opened (fifo(7)), which on mitmproxy's event loop freezes every
    connection. O_NONBLOCK makes that open return at once (or fail with
    ENXIO: a FIFO nobody reads), and the type is checked on the open file
    itself, so nothing can be swapped in between.
    """
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise NotARegularFile(errno.ENXIO, f"not a regular file but {kind_of(os.stat(path).st_mode)}") from None
        raise
    try:
        kind = os.fstat(fd).st_mode
        if not stat.S_ISREG(kind):
            raise NotARegularFile(errno.EINVAL, f"not a regular file but {kind_of(kind)}")
        os.set_blocking(fd, True)  # as a regular file's reads and writes are anyway
        return os.fdopen(fd, mode, **fdopen_args)
    except BaseException:
        os.close(fd)
        raise


class ReportWriter:
    """Appends records to one file; opened when the option is set.

    Like logging's WatchedFileHandler, it notices when the file is removed
    or replaced (rotated, cleaned up) and opens the path again, so later
    records are not written to a file nobody can see. If the path cannot be
    opened any more, it says so once, loudly, and tries again at each record.
    """

    def __init__(self, path: Path):
        self.path = path
        self._lost = 0  # records not written since the path became unwritable
        # Opened here so that an unwritable path is refused when the option
        # is set, not later.
        self._file: IO[str] | None = self._open()

    def _open(self) -> IO[str]:
        # Line buffering flushes each record.
        f = open_regular(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "a", encoding="utf-8", buffering=1)
        self._identity = os.fstat(f.fileno())[1:3]  # (inode, device)
        return f

    def _still_ours(self) -> bool:
        try:
            return os.stat(self.path)[1:3] == self._identity
        except OSError:
            return False

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None or not self._still_ours():
            self._reopen()
        if self._file is None:
            self._lost += 1
            return
        self._file.write(_JSON_LINE.encode(record) + "\n")
        self._file.flush()

    def _reopen(self) -> None:
        replaced = self._file is not None
        if replaced:
            self._file.close()
            self._file = None
        try:
            self._file = self._open()
        except OSError as e:
            if not self._lost:
                logger.error(
                    "ws_encode_report: %s vanished and cannot be created again (%s): records are being lost "
                    "until it can",
                    printable(str(self.path)), e.strerror,
                )
            return
        if self._lost:
            logger.warning(
                "ws_encode_report: writing to %s again; %d records were lost", printable(str(self.path)), self._lost
            )
            self._lost = 0
        elif replaced:
            logger.warning("ws_encode_report: %s was removed or replaced; writing to a new file there",
                           printable(str(self.path)))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
