"""What the app adds to Gradio's login (``--auth``), as ASGI middleware (tested with Gradio 6.31):

- `HideApiBeforeLogin`: Gradio puts its whole API description (every endpoint, its parameters, and
  example values such as uploaded files' paths) into the HTML page it serves to a visitor who has not
  logged in yet. The login page needs none of it, so it is emptied there.
- `LoginThrottle`: Gradio's ``/login`` answers as fast as it is asked, so a password can be guessed
  at network speed. After `MAX_FAILURES` wrong passwords from one address within `WINDOW_S`, that
  address gets 429 (with Retry-After) for `LOCKOUT_S`, doubling with each further lockout.
"""

from __future__ import annotations

import json
import re
import time

MAX_FAILURES = 5
WINDOW_S = 60.0
LOCKOUT_S = 30.0
MAX_LOCKOUT_S = 15 * 60.0

_API_INFO = re.compile(rb"<script>window\.gradio_api_info = .*?;</script>", re.S)


class HideApiBeforeLogin:
    """Empties ``window.gradio_api_info`` in a page whose config says ``"auth_required":true``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        start, body = None, []

        async def send_page(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                if b"text/html" not in dict(start.get("headers", [])).get(b"content-type", b""):
                    await send(start)
                    start = False
                return
            if start is False or message["type"] != "http.response.body":
                return await send(message)
            body.append(message.get("body", b""))
            if message.get("more_body"):
                return
            page = b"".join(body)
            if b'"auth_required":true' in page:
                page = _API_INFO.sub(b"<script>window.gradio_api_info = {};</script>", page, count=1)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(page)).encode()))
            await send(dict(start, headers=headers))
            await send({"type": "http.response.body", "body": page})

        await self.app(scope, receive, send_page)


class LoginThrottle:
    """Refuses ``POST /login`` from an address that failed too often lately (see the module docstring)."""

    def __init__(self, app, clock=time.monotonic):
        self.app = app
        self.clock = clock
        self.failures: dict[str, list[float]] = {}
        self.locked_until: dict[str, float] = {}
        self.lockouts: dict[str, int] = {}

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").rstrip("/")
        if scope["type"] != "http" or scope.get("method") != "POST" or not path.endswith("/login"):
            return await self.app(scope, receive, send)
        who = (scope.get("client") or ("?", 0))[0]
        now = self.clock()
        wait = self.locked_until.get(who, 0) - now
        if wait > 0:
            return await self._refuse(send, wait)
        status = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if status.get("code") == 200:
            self.failures.pop(who, None)
            self.lockouts.pop(who, None)
        elif status.get("code") in (400, 401):
            recent = [t for t in self.failures.get(who, []) if now - t < WINDOW_S] + [now]
            self.failures[who] = recent
            if len(recent) >= MAX_FAILURES:
                n = self.lockouts.get(who, 0)
                self.lockouts[who] = n + 1
                self.locked_until[who] = now + min(MAX_LOCKOUT_S, LOCKOUT_S * 2 ** n)
                self.failures[who] = []

    @staticmethod
    async def _refuse(send, wait: float):
        body = json.dumps({"detail": f"too many wrong passwords; try again in {int(wait) + 1} s"}).encode()
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", str(int(wait) + 1).encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def middleware() -> list:
    from starlette.middleware import Middleware

    return [Middleware(HideApiBeforeLogin), Middleware(LoginThrottle)]
