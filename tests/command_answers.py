"""A mitmproxy script for test proxies: the wsencode commands' answers over HTTP.

    mitmdump -s addon/ws_encode.py -s tests/command_answers.py ...

mitmdump has no command prompt, so a test that wants to read what
`wsencode.stalls` or `wsencode.waiting` answer requests
`/__wsencode__/wsencode.stalls` (any host, HTTP/1.1 or HTTP/2) and gets the
answer as a JSON list. Nothing else is touched, and no request with this path
goes upstream.
"""

from __future__ import annotations

import json

from mitmproxy import ctx, http

PREFIX = "/__wsencode__/"
COMMANDS = frozenset({"wsencode.stalls", "wsencode.waiting"})


class CommandAnswers:
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.request.path.startswith(PREFIX):
            return
        name = flow.request.path[len(PREFIX):]
        if name not in COMMANDS:
            flow.response = http.Response.make(404, b"unknown command\n")
            return
        answer = list(ctx.master.commands.call(name))
        flow.response = http.Response.make(
            200, json.dumps(answer).encode(), {"content-type": "application/json"}
        )


addons = [CommandAnswers()]
