"""Bug-report bundles, from the addon: of chosen flows (`wsencode.bundle`),
and of the last handshakes when mitmproxy exits (`ws_encode_bundle`)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mitmproxy import flow

from .. import bundle
from ..report import open_regular, printable
from .options import BUNDLED_AT_EXIT

logger = logging.getLogger("ws_encode")


def write(flows: Sequence[flow.Flow], folder: str, report: Path | None, options: dict[str, Any]) -> str:
    """Write a bundle; what happened, in one line (also logged)."""
    try:
        written = bundle.write_bundle(folder, flows, report_records(report), options=options)
    except (bundle.BundleError, OSError) as e:
        message = f"ws_encode_bundle: not written: {printable(str(e))}"
        logger.error("%s", message)
        return message
    message = f"bug-report bundle of {len(flows)} flow{'' if len(flows) == 1 else 's'} written to {printable(str(written))}"
    logger.info("%s", message)
    return message


def report_records(report: Path | None) -> list[dict] | None:
    """Every record the report holds (a flow keeps only its latest one)."""
    if report is None:
        return None
    try:
        with open_regular(report, os.O_RDONLY, "r", encoding="utf-8") as f:  # (a FIFO put there: refused, not waited on)
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        logger.warning("ws_encode: the report cannot be read for the bundle (%s); using the flows' records",
                       printable(str(e)))
        return None


class AtExit:
    """The last handshakes seen, for the bundle written when mitmproxy exits
    (bounded in count and in bytes: bundle.ExitBundle)."""

    def __init__(self) -> None:
        self.folder: str | None = None
        self.flows = bundle.ExitBundle(BUNDLED_AT_EXIT)
        self.addons = (self.flows,)  # (mitmproxy calls its hooks: it sees each kept flow end)

    def set_folder(self, folder: str | None) -> None:
        self.folder = folder
        if folder is None:
            self.flows.clear()

    def keep(self, f: flow.Flow) -> None:
        if self.folder is not None:
            self.flows.keep(f)

    def write(self, report: Path | None, options: dict[str, Any]) -> None:
        if self.folder is not None and self.flows:
            write(self.flows.flows(), self.folder, report, options)
