"""The bridge: what makes mitmproxy carry WebSockets over HTTP/2 (and, with
them, translate to and from an HTTP/1.1 upstream), the one package of the
addon that reaches into mitmproxy's internals.

`Bridge` is how the addon sees it: loaded only when asked for, its needs
probed before anything is replaced (`internals`), and whatever fails — an
internal that was renamed, moved or changed its parameters — said in one log
line while HTTP/1.1 WebSocket diagnosis goes on as before.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType


logger = logging.getLogger("ws_encode")


class Bridge:
    """The bridge as the addon sees it: on, off, or refused (once, said why).
    A child addon of ws-encode's: its hook is the bridge's."""

    def __init__(self) -> None:
        self.installed = False
        self.quiet = False  # only mitmproxy's HTTP/3 server replaced, by one that does not advertise RFC 9220
        self.refused: str | None = None  # why this mitmproxy cannot take it
        self.h3_refused: str | None = None  # why it cannot carry HTTP/3 WebSockets (the rest may be fine)
        self._module: ModuleType | None = None

    def install(self, h2: bool, h3: bool) -> None:
        """What `ws_encode_h2` and `ws_encode_h3` ask. Nothing of mitmproxy's
        HTTP/2 is replaced until one is on; over HTTP/3 mitmproxy advertises
        RFC 9220 and then closes the whole QUIC connection for it, so off (or
        refused) there means a client codec that does not advertise it.
        Turned off, new client connections are as asked; those opened before
        keep what they were promised."""
        if self.refused:
            return
        if not (h2 or h3) and not self.installed:
            self._quiet_h3()
            return
        module = self._load()
        if module and not self.installed and self._carries_rfc8441(module):
            self.refused = "this mitmproxy carries HTTP/2 WebSockets itself"
            logger.info("ws_encode_h2: this mitmproxy carries HTTP/2 WebSockets (RFC 8441) itself; "
                        "ws-encode follows them as they are, without its bridge.")
            return
        problem = self._probe(module, "incompatibility") if module else self.refused
        if not problem and self.h3_refused is None and (h3_problem := self._probe(module, "h3_incompatibility")):
            self.h3_refused = h3_problem
            logger.warning("ws_encode_h3: %s; the proxy does not advertise WebSockets over HTTP/3 (RFC 9220), "
                           "HTTP/2 and HTTP/1.1 WebSockets are carried.", h3_problem)
        if not problem:
            problem = module.install(h2, h3 and self.h3_refused is None)
        if problem:
            self._refuse(problem)
            self._quiet_h3()
            return
        self.installed = True
        if not h3:
            logger.info("ws_encode_h3 is off: the proxy does not advertise WebSockets over HTTP/3 (RFC 9220) "
                        "to new connections, so HTTP/3 clients open them another way.")

    def _quiet_h3(self) -> None:
        """Only what keeps an HTTP/3 client from being cut off (no RFC 9220
        advertised, an extended CONNECT refused on its stream), if even that
        can be had here."""
        if self.quiet:
            return
        module = self._module or self._load()
        try:
            problem = module.install_quiet_h3() if module else self.refused
        except Exception as e:  # (as in _load: a mitmproxy it does not fit)
            problem = f"{type(e).__name__}: {e}"
        if problem:
            logger.warning("ws_encode_h3: %s; mitmproxy's HTTP/3 advertises RFC 9220 and closes a client's whole QUIC "
                           "connection for it.", problem)
            return
        self.quiet = True

    def uninstall(self) -> None:
        if (self.installed or self.quiet) and self._module:
            self._module.uninstall()
        self.installed = self.quiet = False

    def tls_start_server(self, tls_start) -> None:
        # Just before mitmproxy's tlsconfig makes the TLS connection from
        # `alpn_offers`: a WebSocket's own TCP connection offers what its
        # address says (the HTTP/1.1 fallback, an HTTP/3 client's over TCP).
        if self.installed and self._module:
            self._module.offer_alpn(tls_start.conn)

    # Whatever goes wrong in loading or probing the bridge is a mitmproxy it
    # does not fit, not a reason to fail the addon: so any exception, said in
    # the one line, with HTTP/1.1 diagnosis left working.
    def _load(self) -> ModuleType | None:
        if self._module is None:
            try:
                self._module = importlib.import_module(".internals", __package__)
            except Exception as e:  # e.g. a name the bridge takes from mitmproxy at import is gone
                self.refused = f"cannot load the bridge ({type(e).__name__}: {e})"
        return self._module

    @staticmethod
    def _probe(module: ModuleType, check: str) -> str | None:
        try:
            return getattr(module, check)()
        except Exception as e:  # an internal changed in a way the probe did not foresee
            return f"cannot check what the bridge needs ({type(e).__name__}: {e})"

    @staticmethod
    def _carries_rfc8441(module: ModuleType) -> bool:
        try:
            return module.carries_rfc8441()
        except Exception:  # (the probe's own failure: then the bridge's checks decide)
            return False

    def _refuse(self, problem: str) -> None:
        self.refused = problem
        logger.warning(
            "ws_encode_h2: %s; HTTP/2 stays as stock mitmproxy has it (no HTTP/2 or HTTP/3 "
            "WebSockets), HTTP/1.1 WebSocket diagnosis keeps working.", problem
        )
