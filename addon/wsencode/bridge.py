"""Loads the HTTP/2 bridge when this mitmproxy can take it, and keeps the
addon whole when it cannot.

`h2bridge` reaches into mitmproxy's HTTP layer (the one module that does).
It is imported only when HTTP/2 WebSockets are asked for, its needs are
probed before anything is replaced, and whatever fails — an internal that
was renamed, moved or changed its parameters — is said in one log line while
HTTP/1.1 WebSocket diagnosis goes on as before.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from mitmproxy import connection, http

from .streamfacts import NO_FACTS, StreamFacts, facts_of

logger = logging.getLogger("ws_encode")


class Bridge:
    """The HTTP/2 bridge as the addon sees it: on, off, or refused (once, said why)."""

    def __init__(self) -> None:
        self.installed = False
        self.refused: str | None = None  # why this mitmproxy cannot take it
        self._module: ModuleType | None = None

    def install(self, h2: bool) -> None:
        if self.refused:
            return
        module = self._load()
        problem = self._probe(module) if module else self.refused
        if not problem:
            problem = module.install(h2)
        if problem:
            self._refuse(problem)
            return
        self.installed = True

    def uninstall(self) -> None:
        if self.installed and self._module:
            self._module.uninstall()
        self.installed = False

    @staticmethod
    def facts(request: http.Request) -> StreamFacts:
        """What the bridge noted of this flow's handshake (also one carried
        before a reload or before it was turned off), else NO_FACTS."""
        return facts_of(request) or NO_FACTS

    def offer_http1_only(self, server: connection.Server) -> None:
        if self.installed and self._module:
            self._module.offer_http1_only(server)

    # Whatever goes wrong in loading or probing the bridge is a mitmproxy it
    # does not fit, not a reason to fail the addon: so any exception, said in
    # the one line, with HTTP/1.1 diagnosis left working.
    def _load(self) -> ModuleType | None:
        if self._module is None:
            try:
                self._module = importlib.import_module(".h2bridge", __package__)
            except Exception as e:  # e.g. a name h2bridge takes from mitmproxy at import is gone
                self.refused = f"cannot load the bridge ({type(e).__name__}: {e})"
        return self._module

    @staticmethod
    def _probe(module: ModuleType) -> str | None:
        try:
            return module.incompatibility()
        except Exception as e:  # an internal changed in a way the probe did not foresee
            return f"cannot check what the bridge needs ({type(e).__name__}: {e})"

    def _refuse(self, problem: str) -> None:
        self.refused = problem
        logger.warning(
            "ws_encode_h2: %s; HTTP/2 stays as stock mitmproxy has it (no HTTP/2 "
            "WebSockets), HTTP/1.1 WebSocket diagnosis keeps working.", problem
        )
