"""Reproduce every encoder behaviour through mitmdump with the addon, and check the diagnosis:
WebSocket handshakes and event streams.

    scripts/repro [--stall SECONDS] [--bundle DIR [--force]]

Starts the lab (hypercorn with the project's compression middleware, one
server per behaviour, on 127.0.0.1), mitmdump with the addon in front of it
(observe, strip, inject), and HAProxy's compression where it is installed;
runs one real client handshake (or event stream) per cell, prints the table in the grid's order
as cells finish, then exits non-zero naming every cell whose result disagrees
with what its behaviour must produce.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from wsencode import bundle

from .encoders import MIN_SIZE
from .matrix import failures, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/repro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stall", type=float, default=2.0,
                        help="ws_encode_stall, seconds (default 2, the addon's default)")
    parser.add_argument("--bundle", type=Path, metavar="DIR",
                        help="write report.jsonl, flows.mitm and summary.md there, redacted")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --bundle folder")
    parser.add_argument("--only", default="", metavar="TEXT",
                        help='only the cells whose name contains TEXT, e.g. "h2 hold-until-body"')
    parser.add_argument("--min-size", type=int, default=MIN_SIZE,
                        help=f"bytes hold-until-min-size waits for (default {MIN_SIZE}; the checks assume "
                             "more than /greet's greeting)")
    args = parser.parse_args(argv)
    if args.bundle:
        try:
            bundle.check_folder(args.bundle, args.force)
        except bundle.BundleError as e:
            hint = " (--force)" if isinstance(e, bundle.FolderNotEmpty) else ""
            print(f"repro: --bundle: {e}{hint}", file=sys.stderr)
            return 2
    state = asyncio.run(run(args.stall, args.bundle, only=args.only, min_size=args.min_size, force=args.force))
    if not state.results:
        print(f"no cell's name contains {args.only!r}")
        return 2
    bad = failures(state)
    print()
    for result in bad:
        print(f"FAIL {result.cell.name}: " + "; ".join(result.problems))
    if bad:
        print(f"{len(bad)} of {len(state.results)} cells disagree with what their behaviour must produce")
        return 1
    n = len(state.results)
    print(f"all {n} cell{'s' if n != 1 else ''} as expected" + (f"; bundle in {args.bundle}" if args.bundle else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
