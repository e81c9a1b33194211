"""A small Playbook-style harness for the bridge's HTTP stream.

mitmproxy tests its layers with a Playbook (test/mitmproxy/proxy/tutils.py
in its repository, not in its wheel): events go into a layer, and the
commands it yields are compared with the ones expected. `StreamPlay` does
that for one `WsHttpStream`, the real subclass of mitmproxy's `HttpStream`,
placed where mitmproxy's `HttpLayer.make_stream` places a stream: in a fork
of the HTTP layer's context, right after an `HttpLayer` (the stream reads
its `mode` and `connections` there). The test plays the stream's two codecs
(the events they hand it), the HTTP layer (it answers `GetHttpConnection`)
and, through an addon object, the addons.

Hooks are blocking commands. The harness answers each one itself, after
the events given in the same call (as mitmproxy's answer comes from the event
loop, after the rest of a read), and before that calls the addon's method of
the hook's name with the flow, as mitmproxy's addon manager would; it notes
how the flow looked as the hook began (`HookView`). A hook named in `hold`
stays unanswered, like any other blocking command, until the test answers it
(`StreamPlay.answer`): events given meanwhile wait in the layer's queue, as
they do in mitmproxy.

`steps` turns commands into short strings, so that a test states the
sequence it expects as a Playbook does, without building the commands.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection, http, options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from wsencode.bridge.stream import WsHttpStream

SID = 1  # the stream's id (a client's first HTTP/2 stream)
ORIGIN = ("upstream.test", 443)  # a transparent client's destination

# The HTTP layer's mode in each proxy mode (mitmproxy's addons/next_layer.py:
# reverse and transparent modes make a transparent HttpLayer).
HTTP_MODES = {"regular": http_layers.HTTPMode.regular, "transparent": http_layers.HTTPMode.transparent,
              "reverse": http_layers.HTTPMode.transparent}


def open_server(address: tuple[str, int] = ORIGIN, alpn: bytes = b"h2") -> connection.Server:
    """An established upstream connection, as the HTTP layer hands one to a stream."""
    server = connection.Server(address=address, peername=("127.0.0.1", address[1]), tls=True, alpn=alpn)
    server.state = connection.ConnectionState.OPEN
    return server


def stream_context(proxy_mode: str, alpn: bytes) -> Context:
    """A client connection in `proxy_mode` speaking `alpn`, and mitmproxy's
    options with the proxyserver's (which the stream reads). In transparent
    and reverse modes the server connection has its destination (as
    mitmproxy's TransparentProxy and ReverseProxy layers set it) and is open,
    as the default eager connection strategy leaves it."""
    opts = options.Options()
    Proxyserver().load(opts)
    client = connection.Client(
        peername=("127.0.0.1", 50000), sockname=("127.0.0.1", 8080),
        state=connection.ConnectionState.OPEN, tls=True, alpn=alpn, proxy_mode=ProxyMode.parse(proxy_mode),
    )
    context = Context(client, opts)
    if proxy_mode != "regular":
        spec = client.proxy_mode
        context.server = open_server(spec.address if isinstance(spec, ReverseMode) else ORIGIN)
    return context


@dataclass(frozen=True)
class HookView:
    """A hook, and the flow's form as an addon saw it when the hook began."""

    name: str
    method: str
    status: int | None
    first_field: tuple[bytes, bytes] | None
    websocket: bool  # whether flow.websocket was set

    @classmethod
    def of(cls, hook: commands.StartHook) -> HookView:
        flow = hook.args()[0]
        fields = flow.request.headers.fields
        return cls(
            name=hook.name, method=flow.request.method,
            status=flow.response.status_code if flow.response else None,
            first_field=fields[0] if fields else None, websocket=flow.websocket is not None,
        )


@dataclass
class StreamPlay:
    """One WsHttpStream, fed events by the test (see the module's docstring)."""

    proxy_mode: str = "regular"  # as mitmproxy's --mode takes it
    alpn: bytes = b"h2"  # the client connection's
    addon: Any = None  # an object with methods named after hooks, as a mitmproxy addon
    hold: frozenset[str] = frozenset()  # hooks the test answers itself
    hooks: list[HookView] = field(init=False, default_factory=list)
    logs: list[tuple[int, str]] = field(init=False, default_factory=list)  # (level, message)
    waiting: commands.Command | None = field(init=False, default=None)  # the blocking command unanswered

    def __post_init__(self) -> None:
        self.context = stream_context(self.proxy_mode, self.alpn)
        self.http_layer = http_layers.HttpLayer(self.context, HTTP_MODES[self.context.client.proxy_mode.type_name])
        self.stream = WsHttpStream(self.context.fork(), SID)
        # The HTTP layer's connections (their codec layers are the test's part).
        self.http_layer.connections[self.context.client] = None

    def __call__(self, *given: events.Event) -> list[commands.Command]:
        """Hand the stream `given` in order: the commands it yields, hooks
        included (Logs go to `logs`), with every hook not held answered."""
        out: list[commands.Command] = []
        queue = list(given)
        while queue:
            for command in self.stream.handle_event(queue.pop(0)):
                if isinstance(command, commands.Log):
                    self.logs.append((command.level, command.message))
                else:
                    out.append(command)
                    queue += self._answers(command)
        return out

    def _answers(self, command: commands.Command) -> list[events.Event]:
        """What the harness hands the stream for `command`, after what is
        queued already: a hook's completion, unless it is held."""
        if isinstance(command, http_layers.SendHttp):
            # mitmproxy's HttpLayer looks the connection up (event_to_child): a KeyError would crash it.
            assert command.connection in self.http_layer.connections, f"{command} to a connection it does not have"
        if isinstance(command, commands.StartHook):
            self.hooks.append(HookView.of(command))
            if command.name not in self.hold:
                self._run_addon(command)
                return [events.HookCompleted(command)]
        if command.blocking:
            self.waiting = command
        return []

    def _run_addon(self, hook: commands.StartHook) -> None:
        method = getattr(self.addon, hook.name, None)
        if method is not None:
            method(*hook.args())

    def answer(self, reply: Any = None) -> list[commands.Command]:
        """Complete the blocking command the stream waits for: a held hook
        (no reply; the addon runs now), or GetHttpConnection ((connection,
        None) or (None, error))."""
        command, self.waiting = self.waiting, None
        assert command is not None, "the stream waits for nothing"
        if isinstance(command, commands.StartHook):
            self._run_addon(command)
            return self(events.HookCompleted(command))
        if isinstance(command, http_layers.GetHttpConnection) and reply[0] is not None:
            self.http_layer.connections[reply[0]] = None  # as HttpLayer.get_connection keeps it
        # (the bridge's GetHttp1Connection has its base's reply)
        completed = next(events.command_reply_subclasses[kind] for kind in type(command).__mro__
                         if kind in events.command_reply_subclasses)
        return self(completed(command, reply))

    def connect(self, server: connection.Server | None = None) -> list[commands.Command]:
        """Answer the stream's GetHttpConnection with an open upstream connection."""
        assert isinstance(self.waiting, http_layers.GetHttpConnection), self.waiting
        return self.answer((server or open_server(self.waiting.address), None))

    @staticmethod
    def sent(out: Iterable[commands.Command], to: str) -> list[http_layers.HttpEvent]:
        """The HttpEvents among `out` sent to "client" or "server"."""
        return [c.event for c in out if isinstance(c, http_layers.SendHttp) and side(c.connection) == to]


def side(conn: connection.Connection) -> str:
    return "client" if isinstance(conn, connection.Client) else "server"


def steps(out: Iterable[commands.Command]) -> list[str]:
    """Commands as short strings ('hook request', 'RequestHeaders to
    server', 'DropStream'), for a test to compare with what it expects."""
    return [step(c) for c in out]


def step(command: commands.Command) -> str:
    if isinstance(command, commands.StartHook):
        return f"hook {command.name}"
    if isinstance(command, http_layers.SendHttp):
        return f"{type(command.event).__name__} to {side(command.connection)}"
    if isinstance(command, commands.ConnectionCommand):
        return f"{type(command).__name__} to {side(command.connection)}"
    return type(command).__name__


# -- what the codecs hand the stream ------------------------------------------------


def client_request(method: bytes, fields: list[tuple[bytes, bytes]], version: bytes = b"HTTP/2.0") -> http.Request:
    """A request as a client codec hands it to the stream: host and port
    filled in from its authority, no body."""
    return http.Request(
        host="chat.test", port=443, method=method, scheme=b"https", authority=b"chat.test:443", path=b"/chat",
        http_version=version, headers=http.Headers(fields), content=None, trailers=None,
        timestamp_start=time.time(), timestamp_end=None,
    )


def extended_connect(*fields: tuple[bytes, bytes]) -> http.Request:
    """What the bridge's HTTP/2 codec makes of a browser's extended CONNECT:
    CONNECT, with its `:protocol` as the first header field."""
    return client_request(b"CONNECT", [(b":protocol", b"websocket"), (b"sec-websocket-version", b"13"), *fields])


def from_client(request: http.Request) -> list[events.Event]:
    """A new stream's Start and what a client codec hands it for a request
    without a body: its headers, which end the stream, and its end."""
    return [events.Start(), http_layers.RequestHeaders(SID, request, end_stream=True), http_layers.RequestEndOfMessage(SID)]


def status_from_upstream(status: int, *fields: tuple[bytes, bytes], body: bytes = b"") -> list[http_layers.HttpEvent]:
    """What an upstream codec hands the stream for a status: its headers, any body, its end."""
    response = http.Response(
        http_version=b"HTTP/2.0", status_code=status, reason=b"", headers=http.Headers(list(fields)),
        content=None, trailers=None, timestamp_start=time.time(), timestamp_end=None,
    )
    given: list[http_layers.HttpEvent] = [http_layers.ResponseHeaders(SID, response, end_stream=False)]
    if body:
        given.append(http_layers.ResponseData(SID, body))
    return [*given, http_layers.ResponseEndOfMessage(SID)]
