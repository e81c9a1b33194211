"""A child process that ends when the process that started it does, however
that one ends (a benchmark interrupted, a test run killed): Linux's
PR_SET_PDEATHSIG. Standard library only: the tests' fork server imports it
before it has imported anything else of this project."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """In the child: `signum` when its parent ends (not on Linux: nothing)."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the call above
        os.kill(os.getpid(), signum)
