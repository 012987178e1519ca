"""The whole journey in a real browser: Playwright drives Debian's Chromium (headless) against the real
app server (`qlora-studio serve` in a subprocess, on a free loopback port, with a private studio home).

Page loads -> hardware tab shows the CPU notice and the memory chart -> the sample data previews ->
a short run on the embedded model starts, its loss plot gains points, a second Start is refused,
Stop stops it -> a fresh page load still shows it (stopped) -> the chat tab answers from the merged
model -> the run is exported for Ollama from the chat tab. A screenshot of each tab goes to
artifacts/screenshots/.

The tests run in file order and share one server and one browser (each step builds on the last).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = ROOT / "artifacts" / "screenshots"
RUN_NAME = "ui-journey"
# A run long enough to still be going when we stop it; small enough to step in about a second on a CPU.
# Half the sample held out, evaluated one example at a time every 2 steps: the evaluation at step 2 lasts long
# enough (~150 batches) for the page to show it and for Stop to land in it.
RUN_SETTINGS = {"#f-max-steps": "10", "#f-batch-size": "1", "#f-max-seq-len": "256", "#f-eval-fraction": "0.5"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(session_home, embedded_path, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"the browser tests need Debian's Chromium at {CHROMIUM} (scripts/test.sh installs it)")
    pytest.importorskip("playwright.sync_api")
    home = tmp_path_factory.mktemp("ui-home")
    (home / "models").mkdir()
    for p in (session_home / "models").iterdir():  # share the converted embedded model
        if not p.name.startswith("."):
            (home / "models" / p.name).symlink_to(p)
    port = _free_port()
    env = dict(os.environ, QLORA_STUDIO_HOME=str(home), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    log = open(tmp_path_factory.mktemp("ui-log") / "server.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "qlora_studio.cli", "serve", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.flush()
            pytest.fail("the app did not start:\n" + Path(log.name).read_text()[-3000:])
        time.sleep(0.25)
    srv = SimpleNamespace(url=url, home=home, proc=proc, log=Path(log.name), serving_s=time.monotonic() - t0)
    yield srv
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    text = srv.log.read_text()
    assert "Traceback" not in text, text[-4000:]


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(browser, server):
    p = browser.new_page(viewport={"width": 1280, "height": 900})
    p.set_default_timeout(60_000)
    t0 = time.monotonic()
    p.goto(server.url)
    p.wait_for_selector("#machine-info .qs-notice, #machine-info table")
    server.first_page_s = time.monotonic() - t0
    yield p
    p.close()


def open_tab(page, tab_id: str) -> None:
    page.click(f"#tab-{tab_id}-button")
    page.wait_for_selector(f"#tab-{tab_id}", state="visible")


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def plot_points(page, elem_id: str, trace: int = 0) -> int:
    """Points plotly drew in one trace (its full data: curves are sent as typed arrays)."""
    return page.evaluate(
        """([id, i]) => { const el = document.querySelector('#' + id + ' .js-plotly-plot');
                         const t = el && el._fullData && el._fullData[i];
                         return t && t.x ? t.x.length : 0; }""",
        [elem_id, trace])


def wait_for(fn, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def fill_number(page, selector: str, value: str) -> None:
    box = page.locator(f"{selector} input").first
    box.fill(value)
    box.press("Tab")


def test_page_loads_with_the_cpu_notice_and_memory_chart(page, server):
    from qlora_studio.hardware import probe_gpus

    assert page.title() == "QLoRA Studio"
    assert page.locator(".qs-header h1").inner_text() == "QLoRA Studio"
    for tab in ("Hardware & plan", "Data", "Train", "Chat", "Runs", "Help"):
        assert page.get_by_role("tab", name=tab, exact=True).is_visible()
    machine = page.locator("#machine-info").inner_text()
    if not probe_gpus()[0]:
        assert "No NVIDIA GPU found" in machine and "CPU" in machine
    page.wait_for_selector("#memory-chart .js-plotly-plot")
    assert plot_points(page, "memory-chart") == 1  # one stacked bar ...
    n_items = page.evaluate("() => document.querySelector('#memory-chart .js-plotly-plot').data.length")
    assert n_items == 7  # ... of seven items
    title = lambda: page.locator("#memory-chart .gtitle").text_content()  # noqa: E731
    before = title()
    fill_number(page, "#whatif-batch", "16")  # the chart follows the controls
    wait_for(lambda: title() != before, 30, "the memory chart to follow the batch size")
    assert "Estimated peak" in title()
    assert page.locator("#memory-verdict .qs-notice").count() == 1
    shot(page, "hardware")


def pick(page, selector: str, option: str) -> None:
    """Choose ``option`` in a Gradio dropdown as a user does: open it, type, click the option."""
    box = page.locator(f"{selector} input").first
    box.click()
    box.fill(option)
    page.locator("ul.option-list li[role=option]", has_text=option).first.click()


def test_the_plan_follows_the_recommendation_and_a_hand_off_that_does_not_fit_is_refused(browser, server):
    """On a page of its own (the main page's Train form stays on the cpu-demo preset)."""
    import re

    from qlora_studio.hardware import probe_gpus

    p = browser.new_page(viewport={"width": 1280, "height": 900})
    p.set_default_timeout(60_000)
    try:
        p.goto(server.url)
        p.wait_for_selector("#memory-chart .js-plotly-plot")
        follow = lambda: p.locator("#whatif-follow").inner_text()  # noqa: E731
        model = lambda: p.locator("#whatif-model input").first.input_value()  # noqa: E731
        recommended = lambda: re.search(r"Recommended: (\S+)", p.locator("#recommendation").inner_text())  # noqa: E731
        wait_for(lambda: "Showing the recommendation" in follow(), 30, "the panel to show the recommendation")
        pick(p, "#whatif-card", "RTX 4090 24 GB")
        wait_for(lambda: "RTX 4090 24 GB" in p.locator("#recommendation").inner_text(), 30, "the 4090's recommendation")
        rec = recommended().group(1)
        wait_for(lambda: model() == rec, 30, f"the what-if model to follow the recommendation ({rec})")
        # The user's own settings: the panel stops following, and a plan that does not fit is not handed over.
        fill_number(p, "#whatif-batch", "32")
        wait_for(lambda: "your own settings" in follow(), 30, "the panel to say it shows the user's settings")
        pick(p, "#whatif-seq", "4096")
        wait_for(lambda: "Does not fit" in p.locator("#memory-verdict").inner_text(), 30, "the verdict")
        p.click("#use-plan")
        wait_for(lambda: "Not handed over" in p.locator("#use-plan-notice").inner_text(), 30, "the refusal")
        assert p.locator("#tab-hardware").is_visible() and not p.locator("#tab-train").is_visible()
        shot(p, "hardware-refused")
        pick(p, "#whatif-card", "RTX 3060 12 GB")  # the user's settings stay; the recommendation follows the card
        wait_for(lambda: "RTX 3060 12 GB" in p.locator("#recommendation").inner_text(), 30, "the 3060's recommendation")
        assert p.locator("#whatif-batch input").first.input_value() == "32" and model() == rec
        p.click("#whatif-reset")
        rec = recommended().group(1)
        wait_for(lambda: model() == rec and "Showing the recommendation" in follow(), 30, "back to the recommendation")
        wait_for(lambda: "Fits" in p.locator("#memory-verdict").inner_text(), 30, "the recommendation to fit")
        p.click("#use-plan")
        p.wait_for_selector("#tab-train", state="visible")
        handed = p.locator("#train-notice").inner_text()
        assert "Settings from the plan" in handed and "This plan is for a RTX 3060 12 GB" in handed, handed
        assert "Kept from the Train tab: learning rate" in handed, handed
        if not probe_gpus()[0]:
            assert "no NVIDIA GPU" in handed, handed
        shot(p, "train-handed-off")
    finally:
        p.close()


def test_an_idle_page_asks_for_few_frames(browser, server):
    """Gradio's progress timer keeps asking for a frame 60 times a second once the page has loaded (the
    page-loading tracker is removed while still pending); the app's page script slows that loop down.
    Counts the frames the page requests from the browser while it sits idle on the Hardware tab."""
    idle = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        idle.add_init_script("""(() => {
            const raf = window.requestAnimationFrame.bind(window); window.__frames = {};
            window.requestAnimationFrame = (cb) => {
                const at = String(new Error().stack).split('\\n').slice(2, 4).join(' < ');
                window.__frames[at] = (window.__frames[at] || 0) + 1; return raf(cb); }; })()""")
        idle.goto(server.url)
        idle.wait_for_selector("#memory-chart .js-plotly-plot")
        counts = []  # frames asked for in successive 3-second windows: once loading is over, a quiet page
        for _ in range(8):  # asks for a few (the progress timer's once a second); without the script, ~180
            idle.evaluate("() => { window.__frames = {}; }")
            idle.wait_for_timeout(3000)
            frames = idle.evaluate("() => window.__frames")
            counts.append(sum(frames.values()))
            if counts[-1] <= 6:
                break
        assert counts[-1] <= 6, f"an idle page asked for {counts} frames in successive 3 s windows; the last: {frames}"
    finally:
        idle.close()


def test_every_tab_before_the_first_run(page):
    """The empty states: nothing looks broken or stale before there is a run (screenshots *-empty.png)."""
    open_tab(page, "train")
    wait_for(lambda: "no run yet" in page.locator("#run-header").inner_text(), 30, "the live view's empty state")
    shot(page, "train-empty")
    open_tab(page, "chat")
    wait_for(lambda: "No run to talk to yet" in page.locator("#merge-status").inner_text(), 30, "chat's empty state")
    shot(page, "chat-empty")
    open_tab(page, "runs")
    page.wait_for_selector("#runs-compare .js-plotly-plot")
    assert "select one run" in page.locator("#runs-diff").inner_text()
    shot(page, "runs-empty")
    open_tab(page, "help")
    shot(page, "help")


def test_sample_data_previews(page):
    open_tab(page, "data")
    summary = page.locator("#data-summary")
    summary.wait_for(timeout=120_000)
    text = summary.inner_text()
    assert "format chat" in text and "297 usable of 297 rows" in text
    assert page.locator("#data-preview [role=row]").count() >= 10  # a header and (virtualized) rows
    page.wait_for_selector("#length-hist .js-plotly-plot")
    assert plot_points(page, "length-hist") == 297
    assert page.locator("#example-tokens .qs-tok-train").count() > 0  # trained tokens ...
    assert page.locator("#example-tokens .qs-tok-mask").count() > 0  # ... told apart from masked ones
    shot(page, "data")


def test_an_upload_is_checked_with_file_line_and_field(page, tmp_path):
    bad = tmp_path / "my data.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(30)]
    rows[3] = {"messages": [{"role": "user", "content": "no answer here"}]}
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    page.locator("#data-upload input[type=file]").set_input_files(str(bad))
    wait_for(lambda: "Uploaded my-data.jsonl" in page.locator("#data-notice").inner_text(), 60, "the upload")
    wait_for(lambda: "29 usable of 31 rows" in page.locator("#data-summary").inner_text(), 60, "the upload's check")
    errors = page.locator("#data-errors").inner_text()
    assert "my-data.jsonl:4 messages: no assistant message to learn from" in errors
    assert "my-data.jsonl:31 (json): not valid JSON" in errors


def test_training_runs_live_refuses_a_second_start_and_stops(page):
    open_tab(page, "train")
    assert page.locator("#preset input").first.input_value() == "cpu-demo"
    page.click("#advanced button.label-wrap, #advanced > button")
    page.wait_for_selector("#f-max-steps input", state="visible")
    for sel, value in RUN_SETTINGS.items():
        fill_number(page, sel, value)
    page.locator("#f-quant label", has_text="none").click()  # 16-bit: a CPU trains this far faster than 4-bit
    page.locator("#run-name-input textarea, #run-name-input input").first.fill(RUN_NAME)
    wait_for(lambda: "max_steps: 10" in page.locator("#resolved").inner_text(), 30, "the resolved settings")
    page.click("#start")
    wait_for(lambda: "Started" in page.locator("#train-notice").inner_text(), 60, "the run to start")
    wait_for(lambda: page.locator("#run-name").count() and page.locator("#run-name").inner_text() == RUN_NAME,
             30, "the live view to show the run")
    wait_for(lambda: plot_points(page, "loss-plot"), 240, "the first point on the loss plot")
    progress = page.locator(".qs-progress").first.inner_text()
    assert "ETA" in progress and "ETA -" not in progress, f"an ETA from the first step: {progress}"
    assert page.locator("#run-state").inner_text() == "running"
    from qlora_studio.hardware import probe_gpus

    if not probe_gpus()[0]:  # a CPU run: the page says it refreshes less often to leave the cores to training
        assert "Training on the CPU: this page refreshes every" in page.locator("#run-pace").inner_text()
    page.click("#start")  # one run at a time
    wait_for(lambda: "already training" in page.locator("#train-notice").inner_text(), 30, "a polite refusal")
    assert RUN_NAME in page.locator("#train-notice").inner_text()
    shot(page, "train-running")
    # The evaluation at step 2 is shown as a phase with its progress; Stop abandons it.
    wait_for(lambda: page.locator("#run-phase").count() and "evaluating" in page.locator("#run-phase").inner_text(),
             240, "the evaluation phase")
    assert "batch" in page.locator("#run-phase").inner_text()
    shot(page, "train-evaluating")
    page.click("#stop")
    wait_for(lambda: "Stopping" in page.locator("#train-notice").inner_text()
             or "stopping" in page.locator("#run-phase").inner_text(), 30, "the stop request")
    wait_for(lambda: page.locator("#run-state").inner_text() == "stopped", 120, "the run to stop")
    wait_for(lambda: plot_points(page, "loss-plot") >= 2, 90, "both steps on the loss plot")
    log = page.locator("#run-log textarea").input_value()
    # Stopped at the step the page showed, never training on. Whether the click landed inside the evaluation
    # or just after it depends on timing (the page's view of a CPU run can be 15 s old); the abandoned
    # evaluation itself is checked deterministically in tests/test_run_phases.py.
    assert "stopped at step 2" in log and "step 3/" not in log, log
    assert page.locator("#train-notice").inner_text().strip() == "", "no stale 'Stopping ...' once it stopped"
    wait_for(lambda: page.locator("#train-to-chat").is_visible(), 30, "the next steps once it has an adapter")
    assert page.locator("#train-to-eval").is_visible()
    panel = page.locator("#findings").inner_text()
    assert panel.strip(), "the findings panel says something (findings, or that nothing looks wrong)"
    page.locator("#advanced button.label-wrap, #advanced > button").first.click()  # fold it for the screenshot
    shot(page, "train")


def test_a_fresh_page_still_shows_the_run(browser, server):
    fresh = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        fresh.goto(server.url)
        open_tab(fresh, "train")
        wait_for(lambda: fresh.locator("#run-name").count() and fresh.locator("#run-name").inner_text() == RUN_NAME,
                 30, "the run on a fresh page")
        assert fresh.locator("#run-state").inner_text() == "stopped"
        wait_for(lambda: plot_points(fresh, "loss-plot") >= 2, 30, "the loss curve on a fresh page")
        open_tab(fresh, "runs")
        row = fresh.locator("#runs-table [role=row]", has_text=RUN_NAME)
        row.wait_for()
        assert "stopped" in row.inner_text()
        fresh.locator("#runs-select label", has_text=RUN_NAME).click()  # overlay + settings
        fresh.wait_for_selector("#runs-compare .js-plotly-plot")
        wait_for(lambda: plot_points(fresh, "runs-compare") >= 2, 30, "the run's curve in the comparison")
        shot(fresh, "runs")
        fresh.click("#runs-chat")  # the run, opened in the Chat tab
        fresh.wait_for_selector("#tab-chat", state="visible")
        wait_for(lambda: fresh.locator("#chat-run input").first.input_value() == RUN_NAME, 30, "the run in Chat")
        wait_for(lambda: "not merged yet" in fresh.locator("#merge-status").inner_text(), 30, "its merge state")
    finally:
        fresh.close()


def test_chat_replies_from_the_merged_model(page, server):
    open_tab(page, "chat")
    wait_for(lambda: page.locator("#chat-run input").first.input_value() == RUN_NAME, 30, "the run in the chat tab")
    page.click("#chat-settings button.label-wrap")
    fill_number(page, "#chat-max", "24")
    page.locator("#chat-examples input").first.click()  # a held-out prompt, with the answer the data gives
    page.locator("ul.option-list li[role=option]").first.click()
    wait_for(lambda: page.locator("#chat-prompt textarea").input_value().strip(), 30, "the held-out prompt")
    assert "Held out from training" in page.locator("#chat-notice").inner_text()
    page.locator("#chat-prompt textarea").fill("Which products belong to Sports?")
    page.click("#chat-send")
    def reply(chat_id: str) -> str:
        bots = page.locator(f"#{chat_id} [data-testid='bot']")
        text = bots.last.inner_text().strip() if bots.count() else ""
        return "" if "Loading content" in text else text

    # The fine-tuned reply comes first (after the merge); the status says merged once it is done.
    wait_for(lambda: "merged, ready" in page.locator("#merge-status").inner_text() and reply("chat-tuned"), 300,
             "a reply from the fine-tuned model")
    wait_for(lambda: reply("chat-base"), 120, "a reply from the base model")
    assert (server.home / "runs" / RUN_NAME / "merged" / "studio_merged.json").is_file()
    assert "merged" in page.locator("#merge-status").inner_text()
    shot(page, "chat")


def test_export_from_the_chat_tab(page, server):
    """The run above, exported for Ollama from the page: progress, the verification, the command to copy."""
    open_tab(page, "chat")
    wait_for(lambda: page.locator("#chat-run input").first.input_value() == RUN_NAME, 30, "the run in the chat tab")
    page.click("#export-section button.label-wrap, #export-section > button")
    page.wait_for_selector("#export-button", state="visible")
    assert page.locator("#export-format input[value=ollama]").is_checked()
    assert page.locator("#export-quant input[value=q8_0]").is_checked()
    page.click("#export-button")
    status = page.locator("#export-status")
    wait_for(lambda: "Exported to" in status.inner_text() or "error" in (status.inner_html() or ""), 600,
             "the export and its verification")
    text = status.inner_text()
    assert "verified." in text, text
    assert page.locator("#export-checks tr", has_text="generation").count() == 1
    folder = server.home / "runs" / RUN_NAME / "exports" / "ollama-q8_0"
    command = page.locator("#export-command").inner_text()
    assert f"ollama create {RUN_NAME} -f {folder / 'Modelfile'}" in command, command
    assert json.loads((folder / "verify.json").read_text())["ok"] is True
    assert (folder / f"{RUN_NAME}-q8_0.gguf").is_file() and (folder / "README.md").is_file()
    shot(page, "export")


GOLDEN_RUN = "ui-golden"


def test_a_completed_run_shows_golden_answers_and_is_evaluated_in_one_click(page, server):
    """A short run to completion: its golden prompts' answers appear in the Train tab; "Evaluate it" opens
    Chat and scores the base and the fine-tuned model on the held-out rows; the Runs table shows the figure."""
    open_tab(page, "chat")  # a small evaluation: at most 3 prompts
    page.click("#chat-eval-section button.label-wrap, #chat-eval-section > button")
    fill_number(page, "#chat-eval-limit", "3")
    open_tab(page, "train")
    page.click("#advanced button.label-wrap, #advanced > button")
    page.wait_for_selector("#f-max-steps input", state="visible")
    for sel, value in {"#f-max-steps": "2", "#f-batch-size": "1", "#f-max-seq-len": "256", "#f-eval-fraction": "0.05",
                       "#f-golden-prompts": "2", "#f-golden-max-new-tokens": "16"}.items():
        fill_number(page, sel, value)
    page.locator("#f-quant label", has_text="none").click()
    page.locator("#run-name-input textarea, #run-name-input input").first.fill(GOLDEN_RUN)
    wait_for(lambda: "max_steps: 2" in page.locator("#resolved").inner_text(), 30, "the resolved settings")
    page.click("#start")
    wait_for(lambda: page.locator("#run-name").count() and page.locator("#run-name").inner_text() == GOLDEN_RUN,
             60, "the live view to show the new run")
    wait_for(lambda: page.locator("#run-state").inner_text() == "completed", 300, "the run to complete")
    golden = json.loads((server.home / "runs" / GOLDEN_RUN / "golden.json").read_text())
    wait_for(lambda: page.locator("#golden-samples").count(), 60, "the golden answers in the page")
    samples = page.locator("#golden-samples").inner_text()
    assert "What the model says now" in samples
    rows = [json.loads(line) for line in (server.home / "runs" / GOLDEN_RUN / "samples.jsonl").read_text().splitlines()]
    answered = [r for r in rows if "reply" in r]
    assert answered and {r["step"] for r in answered} <= {1, 2}, rows
    last = max(r["step"] for r in answered)  # the page shows the latest step's answers
    assert f"step {last}" in samples, samples
    assert all(r["prompt"][:40] in samples for r in answered if r["step"] == last), (answered, samples)
    assert golden, "golden.json holds the chosen prompts"
    page.locator("#advanced button.label-wrap, #advanced > button").first.click()
    shot(page, "train-completed")
    page.click("#train-to-eval")
    page.wait_for_selector("#tab-chat", state="visible")
    wait_for(lambda: page.locator("#chat-run input").first.input_value() == GOLDEN_RUN, 30, "the run in Chat")
    result = page.locator("#chat-eval-result")
    wait_for(lambda: result.count(), 600, "the evaluation result")
    text = result.inner_text()
    assert "3 held-out prompts" in text and "base model" in text and "fine-tuned" in text, text
    shot(page, "chat-evaluated")
    open_tab(page, "runs")
    page.click("#runs-refresh")
    row = page.locator("#runs-table [role=row]", has_text=GOLDEN_RUN)
    wait_for(lambda: "(base" in row.inner_text(), 30, "the task eval column")
    for name in (RUN_NAME, GOLDEN_RUN):  # two runs: their curves overlaid and the settings that differ
        label = page.locator("#runs-select label", has_text=name)
        if label.count() and not label.locator("input").is_checked():
            label.click()
    wait_for(lambda: "Settings that differ" in page.locator("#runs-diff").inner_text(), 30, "the settings diff")
    shot(page, "runs-two")


def test_help_tab(page):
    open_tab(page, "help")
    guide = page.locator("#help-guide")
    guide.wait_for()
    assert "NaN" in guide.inner_text() and "out of memory" in guide.inner_text().lower()
    shot(page, "help")


def test_timings(server, page, record_property):
    """Not a timed test: records how long the server took to serve and the first page to render."""
    record_property("serving_s", round(server.serving_s, 2))
    record_property("first_page_s", round(getattr(server, "first_page_s", float("nan")), 2))
    print(f"\nserver answering after {server.serving_s:.1f} s; first page rendered in {server.first_page_s:.1f} s")
