"""A mitmproxy script with one addon that has no hooks.

scripts/bench measures with it what one more script costs mitmdump whatever
the script does (mitmproxy offers every hook of every flow to every addon),
against which the addon's own cost is read.
"""


class NoHooks:
    pass


addons = [NoHooks()]
