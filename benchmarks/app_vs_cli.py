"""The app's cold start to its first page, and the speed of the same short run started from the app
(the Train tab open in Chromium, live curves polling) and from the command line (no page of the app
open: the browser sits on about:blank).

    python benchmarks/app_vs_cli.py                 # embedded model, NF4, 20 steps, batch 2 x 128 tokens, 4 rounds
    python benchmarks/app_vs_cli.py --page closed   # the app's runs with the page closed: the server's own cost
    python benchmarks/app_vs_cli.py --page toggle   # one long app run, page open and closed in turns: the page's cost

Speed is non-pad tokens/s from each run's summary.json (the Trainer's runtime: model loading
excluded), and the steady rate after 3 warm-up steps from metrics.jsonl. Rounds alternate the order
(CLI first, then app first) so a drift in the machine's load does not favour one side. The load
average is printed before and after: compare only numbers taken on a quiet machine. Each run also
prints the share of a core the browser (all Chromium processes) and the app's process used while it
trained. Separate runs on this kind of shared 2-core VM vary by +-15% from minute to minute; the
toggle mode measures the page's cost within one run instead, which cancels that drift.
Needs playwright and Debian's chromium at /usr/bin/chromium. Runs go to a temporary studio home.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rates(run: Path, warmup: int = 3) -> tuple[float, float]:
    summary = json.loads((run / "summary.json").read_text())
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    steady = float("nan")
    if len(train) > warmup + 1:
        a, b = train[warmup - 1], train[-1]
        steady = (b["tokens"] - a["tokens"]) / (b["time"] - a["time"])
    return summary["tokens_per_s"], steady


def browser_cpu_seconds() -> float:
    """CPU seconds used so far by the Chromium processes this benchmark drives (all of them, renderer included)."""
    import psutil

    total = 0.0
    for proc in psutil.Process().children(recursive=True):
        try:
            if "chrom" in proc.name().lower():
                t = proc.cpu_times()
                total += t.user + t.system
        except psutil.Error:  # a child that ended in between
            pass
    return total


def process_cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


class CpuSampler:
    """Samples the browser's and the app's CPU seconds twice a second in a thread, so a run's share can be
    taken over its training steps alone (from metrics.jsonl's timestamps), leaving out the form filling,
    model loading and saving around them."""

    def __init__(self, server_pid: int):
        import threading

        self.pid, self.samples, self.stop = server_pid, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.5):
            try:
                self.samples.append((time.time(), browser_cpu_seconds(), process_cpu_seconds(self.pid)))
            except Exception:  # the server is gone: nothing left to sample
                return

    def share(self, t0: float, t1: float) -> tuple[float, float]:
        """(browser, app) CPU use between two wall-clock times, in cores."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return float("nan"), float("nan")
        (a, b0, s0), (z, b1, s1) = inside[0], inside[-1]
        return (b1 - b0) / (z - a), (s1 - s0) / (z - a)


def training_window(run: Path) -> tuple[float, float]:
    times = [json.loads(line)["time"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    return times[0], times[-1]


def cli_run(env: dict, name: str, a, page) -> tuple[float, float]:
    page.goto("about:blank")  # someone training from the terminal has no page of the app open
    cmd = [sys.executable, "-m", "qlora_studio.cli", "train", "--preset", "cpu-demo", "--max-steps", str(a.steps),
           "--batch-size", str(a.batch_size), "--max-seq-len", str(a.max_seq_len), "--eval-fraction", "0",
           "--quant", a.quant, "--output", name]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return rates(Path(env["QLORA_STUDIO_HOME"]) / "runs" / name)


def start_from_page(page, name: str, a, first: bool, url: str, steps: int) -> None:
    """Fills the Train tab's form and presses Start."""
    def number(sel, value):
        box = page.locator(f"{sel} input").first
        box.fill(str(value))
        box.press("Tab")

    if page.url != url:
        page.goto(url)
        page.wait_for_selector("#machine-info .qs-notice, #machine-info table")
        first = True
    page.click("#tab-train-button")
    if first:
        page.click("#advanced button.label-wrap")
        page.wait_for_selector("#f-max-steps input", state="visible")
    for sel, value in (("#f-max-steps", steps), ("#f-batch", a.batch_size), ("#f-seq", a.max_seq_len), ("#f-eval", 0)):
        number(sel, value)
    page.locator("#f-quant label", has_text=a.quant).click()
    page.locator("#run-name-input input").first.fill(name)
    page.wait_for_function("n => document.querySelector('#resolved').innerText.includes('name: ' + n)", arg=name)
    page.click("#start")


def app_run(page, home: Path, name: str, a, first: bool, url: str) -> tuple[float, float]:
    start_from_page(page, name, a, first, url, a.steps)
    if a.page == "closed":  # the run goes on without any page watching it
        page.wait_for_function("n => document.querySelector('#run-header').innerText.includes(n)", arg=name)
        page.goto("about:blank")
        status = home / "runs" / name / "status.json"
        while json.loads(status.read_text()).get("state") == "running":
            time.sleep(1)
        return rates(home / "runs" / name)
    page.wait_for_function("n => { const h = document.querySelector('#run-header'); "
                           "return h && h.innerText.includes(n) && h.innerText.includes('completed'); }",
                           arg=name, timeout=3_600_000, polling=1000)
    return rates(home / "runs" / name)


def toggle_run(page, home: Path, a, url: str) -> None:
    """One long app run; the page alternates between watching it on the Train tab and being closed
    (about:blank) every `--window` seconds. Training steps that fall wholly inside a window, after its
    first `--settle` seconds (the page loading), are credited to that window's side, so both sides are
    measured on the same run at the same time of day, which cancels the machine's drift."""
    name = "toggle"
    start_from_page(page, name, a, True, url, a.toggle_steps)
    status = home / "runs" / name / "status.json"
    while not (home / "runs" / name / "metrics.jsonl").is_file() or not (home / "runs" / name / "metrics.jsonl").stat().st_size:
        time.sleep(0.5)
    windows, side = [], "closed"
    while json.loads(status.read_text()).get("state") == "running":
        t0 = time.time()
        if side == "open":
            page.goto(url)
            page.wait_for_selector("#machine-info .qs-notice, #machine-info table")
            page.click("#tab-train-button")
        else:
            page.goto("about:blank")
        while time.time() < t0 + a.window and json.loads(status.read_text()).get("state") == "running":
            time.sleep(0.5)
        windows.append((side, t0 + a.settle, time.time()))
        side = "closed" if side == "open" else "open"
    train = [json.loads(line) for line in (home / "runs" / name / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    got = {"open": [0.0, 0.0, 0], "closed": [0.0, 0.0, 0]}  # tokens, seconds, steps
    for prev, rec in zip(train, train[1:]):
        for w_side, w0, w1 in windows:
            if prev["time"] >= w0 and rec["time"] <= w1:
                g = got[w_side]
                g[0] += rec["tokens"] - prev["tokens"]
                g[1] += rec["time"] - prev["time"]
                g[2] += 1
    rate = {k: v[0] / v[1] if v[1] else float("nan") for k, v in got.items()}
    print(f"one run of {len(train)} steps, {len(windows)} windows of {a.window:.0f} s (first {a.settle:.0f} s of each left out)")
    print(f"  page open on the Train tab: {rate['open']:.1f} tokens/s over {got['open'][2]} steps")
    print(f"  page closed:                {rate['closed']:.1f} tokens/s over {got['closed'][2]} steps")
    print(f"  open/closed = {rate['open'] / rate['closed']:.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "none"])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--page", default="train", choices=["train", "closed", "toggle"],
                   help="during the app's runs: keep the Train tab open (live curves), or close the page; "
                        "toggle: one long app run, the page opened and closed in turns (no CLI runs)")
    p.add_argument("--toggle-steps", type=int, default=360, help="--page toggle: the run's length")
    p.add_argument("--window", type=float, default=45.0, help="--page toggle: seconds per window")
    p.add_argument("--settle", type=float, default=8.0, help="--page toggle: seconds left out at each window's start")
    a = p.parse_args()

    from playwright.sync_api import sync_playwright

    from qlora_studio.models import embedded_model_path

    embedded = embedded_model_path()  # converted once in the usual studio home; shared by a link
    home = Path(tempfile.mkdtemp(prefix="qlora-bench-"))
    (home / "models").mkdir()
    (home / "models" / embedded.name).symlink_to(embedded)
    env = dict(os.environ, QLORA_STUDIO_HOME=str(home), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]))
    load_before = os.getloadavg()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    results = {"cli": [], "app": []}
    shares = {"cli": [], "app": []}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        t0 = time.monotonic()
        server = subprocess.Popen([sys.executable, "-m", "qlora_studio.cli", "serve", "--port", str(port)], cwd=ROOT,
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sampler = CpuSampler(server.pid)
        try:
            while True:
                try:
                    page.goto(url, timeout=5000)
                    break
                except Exception:
                    if server.poll() is not None or time.monotonic() - t0 > 180:
                        raise SystemExit("the app did not start")
                    time.sleep(0.1)
            served = time.monotonic() - t0
            page.wait_for_selector("#machine-info .qs-notice, #machine-info table", timeout=60_000)
            cold = time.monotonic() - t0
            print(f"cold start: page served after {served:.1f} s, first page rendered (hardware tab filled) "
                  f"after {cold:.1f} s", flush=True)
            first = True
            if a.page == "toggle":
                toggle_run(page, home, a, url)
                return 0
            for r in range(a.rounds):
                order = ("cli", "app") if r % 2 == 0 else ("app", "cli")
                for side in order:
                    name = f"{side}-{r}"
                    t, b0, s0 = time.monotonic(), browser_cpu_seconds(), process_cpu_seconds(server.pid)
                    out = cli_run(env, name, a, page) if side == "cli" else app_run(page, home, name, a, first, url)
                    if side == "app":
                        first = False
                    results[side].append(out)
                    wall = time.monotonic() - t
                    during = sampler.share(*training_window(Path(env["QLORA_STUDIO_HOME"]) / "runs" / name))
                    shares[side].append(during)
                    print(f"  round {r} {side:3s}: {out[0]:6.1f} tokens/s (summary), {out[1]:6.1f} steady ({wall:.0f} s wall); "
                          f"while it trained the browser used {during[0]:.1%} of a core and the app's process "
                          f"{during[1]:.0%} (whole run: browser {(browser_cpu_seconds() - b0) / wall:.0%})", flush=True)
        finally:
            sampler.stop.set()
            server.send_signal(signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
            browser.close()
    load_after = os.getloadavg()

    def mean(xs):
        return sum(xs) / len(xs)

    cli_s, app_s = mean([x[0] for x in results["cli"]]), mean([x[0] for x in results["app"]])
    cli_st, app_st = mean([x[1] for x in results["cli"]]), mean([x[1] for x in results["app"]])
    print(f"embedded model, {a.quant}, batch {a.batch_size} x {a.max_seq_len}, {a.steps} steps, {a.rounds} rounds, "
          f"page {'open on the Train tab' if a.page == 'train' else 'closed'} during the app's runs")
    print(f"CLI {cli_s:.1f} tokens/s, app {app_s:.1f} tokens/s: app/CLI = {app_s / cli_s:.3f} (summary); "
          f"steady {cli_st:.1f} vs {app_st:.1f}: {app_st / cli_st:.3f}")
    app_b = mean([x[0] for x in shares["app"]])
    print(f"while training, the browser used {app_b:.1%} of a core during the app's runs "
          f"({mean([x[0] for x in shares['cli']]):.1%} during the CLI's)")
    print(f"load average before {load_before[0]:.2f} / {load_before[1]:.2f}, after {load_after[0]:.2f} / {load_after[1]:.2f}"
          f" (1 / 5 min; {os.cpu_count()} CPUs)")
    print(f"runs in {home}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
