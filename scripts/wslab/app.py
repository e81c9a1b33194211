"""The lab's WebSocket and event-stream application (ASGI), healthy on its own.

    /          a page (a few KB, so it is compressed) that opens /greet and /events and shows what they say
    /stream    a streamed response: ?n= chunks, one every ?every= seconds
    /events    an event stream (text/event-stream): its head at once, then an event
               after ?after= seconds and one every ?every= seconds, ?n= of them (else until the client goes)
    /echo      WebSocket, the client speaks first: every message comes back
    /greet     WebSocket, the server speaks first (after ?after= seconds), then echoes
    /private   WebSocket refused with 403 and an HTML error page
    /result    where the page reports what /greet said (kept in `results`) and what
               /events did (kept in `event_results`)

Any path below /echo/, /greet/, /private/ and /events/ is the same endpoint, so a
client can name its request in the path (query values never reach the proxy's report).
"""

from __future__ import annotations

import asyncio
import html
import itertools
import time
import urllib.parse

from . import sse
from .encoders import HELP, Behaviour

GREETING = "hello from /greet"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ws-encode lab: {behaviour}</title></head>
<body>
<h1>ws-encode lab: <code>{behaviour}</code></h1>
<p>{help}</p>
<p>This page opens a WebSocket to <code>/greet</code>, whose server speaks first: with
<code>?after=N</code> in this page's address it waits N seconds before it does. The browser waits
for the handshake's status before anything else: an encoder that holds that status until the
body starts holds this page too.</p>
<p><b id="greet">opening the WebSocket…</b></p>
<p>It also opens an event stream (<code>EventSource</code>) to <code>/events</code>, whose server sends the
response's head at once and its first event after the same N seconds. The browser fires
<code>open</code> when the head arrives: an encoder that holds the head until the body starts holds
<code>open</code> until the first event, and one that keeps the events in its compressor holds them.</p>
<p><b id="events">opening the event stream…</b></p>
<p><a href="/stream">/stream</a> is a streamed response; <code>/echo</code> echoes what a client sends first.</p>
<h2>Behaviours</h2>
<dl>{behaviours}</dl>
<script>
const out = document.getElementById("greet");
const query = new URLSearchParams(location.search);
const after = Number(query.get("after") || 0);
const started = performance.now();
const seconds = () => ((performance.now() - started) / 1000).toFixed(1);
let state = "waiting for the handshake's status";
const tick = setInterval(() => {{ out.textContent = `${{state}}: ${{seconds()}} s so far`; }}, 100);
const ws = new WebSocket(`wss://${{location.host}}/greet?after=${{after}}`);
const report = (what, words) => {{ clearInterval(tick); out.textContent = words; fetch("/result?" + what); }};
ws.onopen = () => {{ state = `open after ${{seconds()}} s; waiting for the server to speak (it waits ${{after}} s)`; }};
// The socket stays open: hypercorn can drop the whole connection on a frame
// for a stream it has closed, and the report shares that connection.
ws.onmessage = (e) => report("greet=" + encodeURIComponent(e.data),
                             `the server said "${{e.data}}", ${{seconds()}} s after the page opened the WebSocket`);
ws.onerror = () => report("error=1", `the WebSocket failed after ${{seconds()}} s`);
// The event stream, timed from the same start: when its head came (open), when its first event did.
const shown = document.getElementById("events");
let eventState = "waiting for the event stream's head", opened = null, first = null, events = 0, reported = false;
const eventTick = setInterval(() => {{ shown.textContent = `${{eventState}}: ${{seconds()}} s so far`; }}, 100);
const reportEvents = (what) => {{ if (!reported) {{ reported = true; fetch("/result?events=" + what); }} }};
const es = new EventSource(`/events?after=${{after}}`);
es.onopen = () => {{
  opened = seconds();
  eventState = `the head came after ${{opened}} s; waiting for the first event ` +
               `(the server sends it after ${{after}} s)`;
}};
es.addEventListener("tick", (e) => {{
  events += 1;
  if (first === null) {{
    first = seconds();
    clearInterval(eventTick);
    reportEvents(`open:${{opened}},first:${{first}}`);
  }}
  shown.textContent = `the head came after ${{opened}} s, the first event after ${{first}} s; ` +
                      `${{events}} so far, the last: "${{e.data}}"`;
}});
es.onerror = () => {{
  if (first !== null) return;  // the browser reconnects by itself; what it saw first is reported
  clearInterval(eventTick);
  shown.textContent = `the event stream failed after ${{seconds()}} s`;
  reportEvents(`error:${{seconds()}}`);
}};
</script>
</body></html>
"""

ERROR_PAGE = (
    "<!doctype html><html><head><title>403 Forbidden</title></head><body><h1>403 Forbidden</h1>"
    + "<p>This endpoint does not accept WebSockets from you.</p>" * 40
    + "</body></html>"
)


EVERY = 1.0  # seconds between two events of /events, unless ?every= says


def tick(i: int, n: int | None, every: float) -> bytes:
    """The i-th event of /events: small (about 50 bytes), as most real events are."""
    of = f" of {n}" if n is not None else ""
    return sse.format_event(f"event {i}{of}, one every {every:g} s", event="tick", id=str(i))


async def disconnected(receive) -> None:
    """Return once the server says the client is gone."""
    while (await receive())["type"] != "http.disconnect":
        pass


def query(scope) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(scope.get("query_string", b"").decode("latin-1")))


def endpoint(path: str) -> str:
    return "/" + path.strip("/").split("/", 1)[0]


class LabApp:
    def __init__(self, behaviour: str, log=None) -> None:
        self.behaviour = behaviour
        self.log = log  # called with one line per request, if set
        self.results: asyncio.Queue[str] = asyncio.Queue()  # the page's reports of /greet
        self.event_results: asyncio.Queue[str] = asyncio.Queue()  # and of /events ("events=...")
        # (path, event id, time.monotonic()) of every event /events handed on, as it did
        self.events_sent: list[tuple[str, int, float]] = []
        # (scope type, http_version, path, accept-encoding) of every request, as received
        self.requests: list[tuple[str, str, str, str | None]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            encoding = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"accept-encoding"), None)
            self.requests.append((scope["type"], scope["http_version"], scope["path"], encoding))
            if self.log:
                self.log(f"HTTP/{scope['http_version']} {scope['type']} {scope['path']} accept-encoding: {encoding}")
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
        elif scope["type"] == "http":
            await self.http(scope, receive, send)

    def page(self) -> bytes:
        help_of = {b.value: h for b, h in HELP.items()}
        behaviours = "".join(
            f"<dt><code>{name}</code></dt><dd>{html.escape(text.format(min_size='N'))}</dd>"
            for name, text in help_of.items()
        )
        return PAGE.format(
            behaviour=html.escape(self.behaviour),
            help=html.escape(help_of.get(self.behaviour, "no encoder in front").format(min_size="N")),
            behaviours=behaviours,
        ).encode()

    async def http(self, scope, receive, send) -> None:
        path, q = endpoint(scope["path"]), query(scope)

        async def start(status: int, content_type: bytes) -> None:
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", content_type), (b"cache-control", b"no-store")]})

        if scope["path"] == "/":
            await start(200, b"text/html; charset=utf-8")
            await send({"type": "http.response.body", "body": self.page()})
        elif path == "/stream":
            await start(200, b"text/plain; charset=utf-8")
            n, every = int(q.get("n", 5)), float(q.get("every", 0.2))
            for i in range(n):
                line = f"chunk {i + 1} of {n}: " + "streamed through the encoder " * 3 + "\n"
                await send({"type": "http.response.body", "body": line.encode(), "more_body": True})
                await asyncio.sleep(every)
            await send({"type": "http.response.body", "body": b""})
        elif path == "/events":
            await self.event_stream(scope, receive, send)
        elif path == "/result":
            report = scope.get("query_string", b"").decode("latin-1")
            (self.event_results if report.startswith("events=") else self.results).put_nowait(report)
            if self.log:
                self.log(f"the page reports: {urllib.parse.unquote(report)}")
            await start(204, b"text/plain")
            await send({"type": "http.response.body", "body": b""})
        else:
            await start(404, b"text/plain")
            await send({"type": "http.response.body", "body": b"not found\n"})

    async def event_stream(self, scope, receive, send) -> None:
        """/events: the head at once, flushed as an SSE handler flushes it (Go's Flush, Express's
        flushHeaders), then the events; they stop when the client goes."""
        q = query(scope)
        after, every, n = float(q.get("after", 0)), float(q.get("every", EVERY)), int(q["n"]) if "n" in q else None
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", sse.CONTENT_TYPE.encode()), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b"", "more_body": True})
        ticking = asyncio.ensure_future(self._tick(scope["path"], after, every, n, send))
        gone = asyncio.ensure_future(disconnected(receive))
        done, pending = await asyncio.wait({ticking, gone}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if ticking in done:
            ticking.result()

    async def _tick(self, path: str, after: float, every: float, n: int | None, send) -> None:
        await asyncio.sleep(after)
        for i in itertools.count(1) if n is None else range(1, n + 1):
            if i > 1:
                await asyncio.sleep(every)
            self.events_sent.append((path, i, time.monotonic()))
            await send({"type": "http.response.body", "body": tick(i, n, every), "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def websocket(self, scope, receive, send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        path = endpoint(scope["path"])
        if path == "/private":
            await send({"type": "websocket.http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/html; charset=utf-8")]})
            await send({"type": "websocket.http.response.body", "body": ERROR_PAGE.encode()})
            return
        if path not in ("/echo", "/greet"):
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})  # the application accepts at once
        if path == "/greet":
            await asyncio.sleep(float(query(scope).get("after", 0)))
            await send({"type": "websocket.send", "text": GREETING})
        while True:
            event = await receive()
            if event["type"] != "websocket.receive":
                return
            echo = {k: event[k] for k in ("text", "bytes") if event.get(k) is not None}
            await send({"type": "websocket.send", **echo})


def build(behaviour: str, min_size: int, log=None) -> tuple[LabApp, object]:
    """The application and what to serve: it behind the encoder, or alone ("none")."""
    from .encoders import EncodingMiddleware

    app = LabApp(behaviour, log)
    if behaviour == "none":
        return app, app
    return app, EncodingMiddleware(app, Behaviour(behaviour), min_size)
