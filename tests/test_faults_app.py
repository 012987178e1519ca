"""Fault corpus, the app behind a login (``serve --auth``): a real server in a subprocess, asked the
way a stranger on the network would ask it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("auth-home")
    port = _free_port()
    env = dict(os.environ, QLORA_STUDIO_HOME=str(home), GRADIO_ANALYTICS_ENABLED="False",
               QLORA_STUDIO_AUTH="alice:correct-horse")
    log = tmp_path_factory.mktemp("auth-log") / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "qlora_studio.cli", "serve", "--port", str(port)], cwd=ROOT,
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/", timeout=2):
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("the app did not start:\n" + log.read_text()[-3000:])
        time.sleep(0.25)
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    assert "Traceback" not in log.read_text()


def _login(url: str, password: str) -> tuple[int, dict, str]:
    data = urllib.parse.urlencode({"username": "alice", "password": password}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/login", data=data), timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def _page(url: str, cookie: str | None = None) -> str:
    req = urllib.request.Request(url + "/", headers={"Cookie": cookie} if cookie else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def test_the_login_page_does_not_describe_the_api(auth_server):
    page = _page(auth_server)
    assert '"auth_required":true' in page
    assert "window.gradio_api_info = {};" in page
    assert "named_endpoints" not in page and "/start_run" not in page and "parameter_name" not in page

    status, headers, _ = _login(auth_server, "correct-horse")
    assert status == 200
    cookie = "; ".join(c.split(";")[0] for k, c in headers.items() if k.lower() == "set-cookie")
    if not cookie:  # urllib folds repeated headers; read them one by one
        cookie = headers.get("set-cookie", "").split(";")[0]
    inside = _page(auth_server, cookie)
    assert '"auth_required":true' not in inside and '"components":[{' in inside, "logged in, the app is whole"


def test_wrong_passwords_are_throttled(auth_server):
    codes = [_login(auth_server, f"guess-{i}")[0] for i in range(5)]
    assert codes == [400] * 5
    status, headers, body = _login(auth_server, "guess-6")
    assert status == 429 and "too many wrong passwords" in json.loads(body)["detail"]
    assert 1 <= int({k.lower(): v for k, v in headers.items()}["retry-after"]) <= 31
    assert _login(auth_server, "correct-horse")[0] == 429, "locked out, even with the right password"
