"""`python -m wsencode` prints the path of the addon script, for

    mitmdump -s "$(python -m wsencode)"

from any folder, with the addon installed (`pip install ws-encode`) or not."""

import sys

from wsencode import SCRIPT

if not SCRIPT.is_file():  # a broken install: say so rather than print a path mitmdump cannot load
    sys.exit(f"wsencode: the addon script is missing: {SCRIPT}")
print(SCRIPT)
