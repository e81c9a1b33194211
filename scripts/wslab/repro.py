"""Reproduce every encoder behaviour through mitmdump with the addon, and check the diagnosis.

    scripts/repro [--stall SECONDS] [--bundle DIR]

Starts the lab (hypercorn with the project's compression middleware, one
server per behaviour, on 127.0.0.1), mitmdump with the addon in front of it
(observe, strip, inject), and HAProxy's compression where it is installed;
runs one real client handshake per cell, prints the table as cells finish,
then exits non-zero naming every cell whose result disagrees with what its
behaviour must produce.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from .matrix import failures, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/repro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stall", type=float, default=1.0, help="ws_encode_stall, seconds (default 1)")
    parser.add_argument("--bundle", type=Path, help="write report.jsonl, flows.mitm and summary.md here")
    args = parser.parse_args(argv)
    state = asyncio.run(run(args.stall, args.bundle))
    bad = failures(state)
    print()
    for result in bad:
        print(f"FAIL {result.cell.name}: " + "; ".join(result.problems))
    if bad:
        print(f"{len(bad)} of {len(state.results)} cells disagree with what their behaviour must produce")
        return 1
    print(f"all {len(state.results)} cells as expected" + (f"; bundle in {args.bundle}" if args.bundle else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
