"""Workarounds for Gradio's own behaviour, in one place, each saying what it works around.

Tested with Gradio 6.31 (the range pinned in pyproject.toml: ``gradio>=6.31,<6.32``). Each workaround
checks that the thing it adjusts is there (an attribute, a bundle file name) and does nothing when it
is not; `tests/test_ui.py::test_an_idle_page_asks_for_few_frames` fails if a Gradio release changes
what the frame guard relies on. ``TESTED`` lists the versions these were measured on; `active()` says
whether the installed one is among them (the app logs a line when it is not).
"""

from __future__ import annotations

import logging

log = logging.getLogger("qlora_studio.ui")

TESTED = ("6.31",)


def active() -> bool:
    """Whether the installed Gradio is a version these workarounds were tested with."""
    import gradio

    ok = str(gradio.__version__).startswith(TESTED)
    if not ok:
        log.warning("Gradio %s: the page workarounds were tested with %s only", gradio.__version__, ", ".join(TESTED))
    return ok


# ------------------------------------------------------------------ the queue's polling


def calm_queue(demo) -> None:
    """Gradio's queue checks for work every 1 ms (10 ms for progress) on Linux, 50 ms (100 ms) on
    Windows. Every check takes the GIL from the training thread that shares this process; at the
    Windows intervals an idle app costs well under 1% of a core instead of ~5%, and an event waits at
    most 50 ms longer to start, which nobody sees."""
    queue = getattr(demo, "_queue", None)
    if queue is None:
        return
    if hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = max(queue.sleep_when_free, 0.05)
    if hasattr(queue, "progress_update_sleep_when_free"):
        queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, 0.1)


# ------------------------------------------------------------------ the status tracker's frame loop


# Gradio 6's progress display (its "status tracker") counts the elapsed time of a pending event in a
# requestAnimationFrame loop that stops only when the event completes. A tracker removed from the page
# while pending never stops: the page-loading tracker does this on every page load, so an idle page
# asks for a new frame 60 times a second for as long as it stays open. In Chromium that cost 6-7% of a
# core, taken from training on a CPU-only machine (benchmarks/app_vs_cli.py). This script, run before
# Gradio's own, lets the tracker's frames through every 0.1 s while a progress display is on screen (the
# timer shows tenths of a second, so nothing visible changes) and once a second otherwise. Any other
# requestAnimationFrame (plots, transitions) is untouched.
FRAME_GUARD = """(() => {
  const raf = window.requestAnimationFrame.bind(window);
  const showing = () => document.querySelector('.wrap.full:not(.hide), .wrap.minimal:not(.hide)') !== null;
  window.requestAnimationFrame = function (callback) {
    if (!String(new Error().stack).includes('statustracker')) return raf(callback);
    return setTimeout(() => raf(callback), showing() ? 100 : 1000);
  };
})();"""


class PageScript:
    """ASGI middleware: puts a script first in the <head> of the app's HTML page, so it runs before
    Gradio's scripts load (Gradio's own `head=` is added later, by its scripts). Other responses pass
    through untouched."""

    def __init__(self, app, script: str):
        self.app = app
        self.tag = b"<script>" + script.encode() + b"</script>"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "GET" or not scope.get("path", "").endswith("/"):
            return await self.app(scope, receive, send)
        start, body = None, []

        async def send_page(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                if b"text/html" not in dict(start.get("headers", [])).get(b"content-type", b""):
                    await send(start)
                    start = False  # not the page: the body passes through as it comes
                return
            if start is False or message["type"] != "http.response.body":
                return await send(message)
            body.append(message.get("body", b""))
            if message.get("more_body"):
                return
            page = b"".join(body)
            at = page.find(b"<head>")
            if at >= 0:
                page = page[:at + 6] + self.tag + page[at + 6:]
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(page)).encode()))
            await send(dict(start, headers=headers))
            await send({"type": "http.response.body", "body": page})

        await self.app(scope, receive, send_page)


def middleware() -> list:
    """The ASGI middleware the app is launched with: the frame guard, first in the page's <head>."""
    from starlette.middleware import Middleware

    active()
    return [Middleware(PageScript, script=FRAME_GUARD)]
