"""The lab's WebSocket application (ASGI), healthy on its own.

    /          a page (a few KB, so it is compressed) that opens /greet and shows what it says
    /stream    a streamed response: ?n= chunks, one every ?every= seconds
    /echo      WebSocket, the client speaks first: every message comes back
    /greet     WebSocket, the server speaks first (after ?after= seconds), then echoes
    /private   WebSocket refused with 403 and an HTML error page
    /result    where the page reports what /greet said (kept in `results`)

Any path below /echo/, /greet/ and /private/ is the same endpoint, so a client
can name its handshake in the path (query values never reach the proxy's report).
"""

from __future__ import annotations

import asyncio
import html
import urllib.parse

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
</script>
</body></html>
"""

ERROR_PAGE = (
    "<!doctype html><html><head><title>403 Forbidden</title></head><body><h1>403 Forbidden</h1>"
    + "<p>This endpoint does not accept WebSockets from you.</p>" * 40
    + "</body></html>"
)


def query(scope) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(scope.get("query_string", b"").decode("latin-1")))


def endpoint(path: str) -> str:
    return "/" + path.strip("/").split("/", 1)[0]


class LabApp:
    def __init__(self, behaviour: str, log=None) -> None:
        self.behaviour = behaviour
        self.log = log  # called with one line per request, if set
        self.results: asyncio.Queue[str] = asyncio.Queue()
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
        elif path == "/result":
            report = scope.get("query_string", b"").decode("latin-1")
            self.results.put_nowait(report)
            if self.log:
                self.log(f"the page reports: {urllib.parse.unquote(report)}")
            await start(204, b"text/plain")
            await send({"type": "http.response.body", "body": b""})
        else:
            await start(404, b"text/plain")
            await send({"type": "http.response.body", "body": b"not found\n"})

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
