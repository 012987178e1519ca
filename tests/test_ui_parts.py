"""The app's parts that need no browser: serve's refusals, the bounded live view, the findings panel
with and without a diagnosis module, uploads, run names, presets. Fast (no model is loaded)."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ serve


@pytest.mark.parametrize("host,share", [("0.0.0.0", False), ("192.168.1.20", False), ("127.0.0.1", True), ("::", False)])
def test_serve_refuses_to_expose_the_app_without_a_login(host, share, capsys, monkeypatch):
    from qlora_studio.cli import main

    monkeypatch.delenv("QLORA_STUDIO_AUTH", raising=False)
    argv = ["serve", "--host", host] + (["--share"] if share else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refusing to start" in err and "--auth user:password" in err and "QLORA_STUDIO_AUTH" in err
    assert ("--share" in err) if share else (f"--host {host}" in err)


def test_serve_auth_rules(monkeypatch):
    from qlora_studio.cli import UserError, serve_auth

    assert serve_auth("127.0.0.1", False, None) is None
    assert serve_auth("localhost", False, None) is None
    assert serve_auth("::1", False, None) is None
    assert serve_auth("0.0.0.0", False, "ann:s3cret:x") == ("ann", "s3cret:x")
    assert serve_auth("0.0.0.0", True, "ann:pw") == ("ann", "pw")
    for bad in ("nopassword", "ann:", ":pw"):
        with pytest.raises(UserError, match="user:password"):
            serve_auth("127.0.0.1", False, bad)


def test_serve_takes_the_login_from_the_environment(monkeypatch):
    import qlora_studio.cli as cli

    seen = {}
    fake = types.ModuleType("qlora_studio.ui.app")
    fake.serve = lambda **kw: seen.update(kw)
    monkeypatch.setitem(sys.modules, "qlora_studio.ui.app", fake)
    monkeypatch.setenv("QLORA_STUDIO_AUTH", "ann:pw")
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "7999"]) == 0
    assert seen == {"host": "0.0.0.0", "port": 7999, "share": False, "auth": ("ann", "pw")}


def test_gradio_is_imported_only_inside_the_ui_package():
    ui = ROOT / "qlora_studio" / "ui"
    files = [p for p in (ROOT / "qlora_studio").rglob("*.py") if ui not in p.parents] + [ROOT / "app.py"]
    offenders = [str(p.relative_to(ROOT)) for p in files
                 if re.search(r"^\s*(import gradio|from gradio)", p.read_text(), re.M)]
    assert offenders == []


def test_the_page_script_goes_first_in_the_page_head_and_nowhere_else():
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from qlora_studio.ui.gradio_compat import FRAME_GUARD, PageScript

    page = "<!doctype html><html><head><title>t</title><script type=module src=a.js></script></head><body>x</body></html>"
    app = Starlette(routes=[Route("/", lambda r: HTMLResponse(page)), Route("/config", lambda r: JSONResponse({"a": 1})),
                            Route("/assets/", lambda r: PlainTextResponse("<head>"))],
                    middleware=[Middleware(PageScript, script=FRAME_GUARD)])
    client = TestClient(app)
    r = client.get("/")
    head = r.text.split("<head>", 1)[1]
    assert head.startswith("<script>" + FRAME_GUARD + "</script><title>")  # before Gradio's module script
    assert int(r.headers["content-length"]) == len(r.content)
    assert client.get("/config").json() == {"a": 1}
    assert client.get("/assets/").text == "<head>"  # not HTML: untouched


def test_curves_go_to_the_browser_as_typed_arrays():
    import base64
    import math
    import struct

    from qlora_studio.ui.common import typed_array

    spec = typed_array([1, 2.5, None, 4])
    assert spec["dtype"] == "f8"
    values = struct.unpack("<4d", base64.b64decode(spec["bdata"]))  # plotly.js reads little-endian float64
    assert values[:2] == (1.0, 2.5) and math.isnan(values[2]) and values[3] == 4.0


def test_figures_carry_a_small_template():
    from qlora_studio.ui.live import empty_figure

    fig = json.loads(empty_figure("Loss", "nothing yet").to_json())
    template = json.dumps(fig["layout"]["template"])
    assert len(template) < 1500 and "colorscale" not in template and fig["layout"]["template"]["layout"]["plot_bgcolor"] == "white"


# ------------------------------------------------------------------ the live view


def test_series_stays_bounded_and_keeps_the_newest_point():
    from qlora_studio.ui.live import Series

    s = Series(cap=50)
    for i in range(10_000):
        s.add(i, float(i))
    xs, ys = s.points()
    assert len(xs) <= 51 and xs[0] == 0 and xs[-1] == 9_999
    assert xs == sorted(xs) and len(s) == 10_000
    s.add(10_000, None)  # missing values are skipped
    assert s.points()[0][-1] == 9_999


def _values(spec: dict) -> list:
    """A plotly typed array (as the figures send curves) back to numbers; NaN (a gap) as None."""
    import base64
    import math
    import struct

    assert spec["dtype"] == "f8"
    raw = base64.b64decode(spec["bdata"])
    return [None if math.isnan(v) else v for v in struct.unpack(f"<{len(raw) // 8}d", raw)]


def _append(path: Path, records: list[dict]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_run_view_reads_only_what_was_appended(tmp_path):
    from qlora_studio.ui.live import RunView

    run = tmp_path / "run"
    run.mkdir()
    view = RunView(run)
    assert view.refresh() is False  # no metrics yet
    train = [{"type": "train", "step": i, "epoch": i / 10, "time": 1000.0 + i, "loss": 2.0 / i, "lr": 1e-4,
              "grad_norm": 1.0, "tokens": 100 * i, "tokens_per_s": 100.0, "memory_rss_mb": 900.0} for i in range(1, 6)]
    _append(run / "metrics.jsonl", train)
    assert view.refresh() is True and view.version == 1 and len(view.loss) == 5
    offset = view.offset
    assert view.refresh() is False and view.offset == offset  # nothing new: nothing read, no new version
    with open(run / "metrics.jsonl", "a") as f:  # a line being written is left for the next poll
        f.write('{"type": "eval", "step": 5, "eval_loss": 0.5')
    assert view.refresh() is False
    with open(run / "metrics.jsonl", "a") as f:
        f.write("}\n")
    assert view.refresh() is True and view.last_eval["eval_loss"] == 0.5 and len(view.eval_loss) == 1
    assert view.seconds_per_step() == pytest.approx(1.0)
    loss_json, dyn_json = view.figures(None)
    loss_fig, dyn_fig = json.loads(loss_json), json.loads(dyn_json)
    assert _values(loss_fig["data"][0]["x"]) == [1, 2, 3, 4, 5] and loss_fig["data"][1]["name"] == "eval loss"
    assert _values(loss_fig["data"][1]["y"]) == [0.5]
    assert view.figures(None)[0] is loss_json  # built once per change, shared by every page
    assert dyn_fig["layout"]["annotations"][3]["text"].startswith("process memory")
    assert _values(dyn_fig["data"][2]["y"]) == [100.0] * 5
    _append(run / "metrics.jsonl", [{"type": "train", "step": 6, "time": 1006.0, "loss": float("nan")}])
    view.refresh()
    assert _values(json.loads(view.figures(None)[0])["data"][0]["y"])[-1] is None  # NaN: a gap (valid JSON)


def test_a_page_watching_a_cpu_run_polls_and_redraws_less_often(tmp_path, monkeypatch):
    import socket
    import subprocess
    import time

    from qlora_studio.ui import train

    monkeypatch.setenv("QLORA_STUDIO_HOME", str(tmp_path))
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the run's live process
    run = tmp_path / "runs" / "watched"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"name": "watched"}))
    (run / "plan.json").write_text(json.dumps({"plan": {"device": "cpu"}}))
    status = {"state": "running", "phase": "training", "pid": trainer.pid, "host": socket.gethostname(),
              "step": 1, "total_steps": 100, "started_at": time.time()}
    (run / "status.json").write_text(json.dumps(status))
    (run / "metrics.jsonl").write_text("")

    try:
        out = train.poll(str(run), {})
        assert set(out) <= set(train.LIVE_OUTPUTS)
        assert out["timer"].value == train.POLL_CPU_S  # the page is told to ask less often, and says so
        assert f"refreshes every {train.POLL_CPU_S:.0f} s" in out["progress"]
        assert out["loss"] is not None  # the first curves are drawn at once, empty ...
        _append(run / "metrics.jsonl", [{"type": "train", "step": 1, "time": time.time(), "loss": 1.0, "tokens": 10}])
        out = train.poll(str(run), out["seen"])
        assert "loss" in out  # ... again as soon as the first step is logged ...
        _append(run / "metrics.jsonl", [{"type": "train", "step": 2, "time": time.time(), "loss": 0.9, "tokens": 20}])
        again = train.poll(str(run), out["seen"])
        assert "loss" not in again and "progress" in again  # ... the next only PLOT_EVERY_CPU_S later ...
        _append(run / "metrics.jsonl", [{"type": "eval", "step": 2, "time": time.time(), "eval_loss": 0.95}])
        again = train.poll(str(run), again["seen"])
        assert "loss" in again  # ... but the first evaluation at once
        _append(run / "metrics.jsonl", [{"type": "train", "step": 3, "time": time.time(), "loss": 0.8, "tokens": 30}])
        again = train.poll(str(run), again["seen"])
        assert "loss" not in again
    finally:
        trainer.kill()
        trainer.wait()
    status.update(state="completed")
    (run / "status.json").write_text(json.dumps(status))
    done = train.poll(str(run), again["seen"])
    assert done["timer"].value == train.POLL_SECONDS and "loss" in done  # finished: final curves, usual pace


def test_run_view_starts_over_when_a_resume_rewrites_the_metrics(tmp_path):
    import os

    from qlora_studio.ui.live import RunView

    run = tmp_path / "run"
    run.mkdir()
    recs = [{"type": "train", "step": i, "time": float(i), "loss": 1.0} for i in range(1, 9)]
    _append(run / "metrics.jsonl", recs)
    view = RunView(run)
    view.refresh()
    tmp = run / "metrics.tmp"
    _append(tmp, recs[:3])
    os.replace(tmp, run / "metrics.jsonl")  # as training._truncate_metrics_after does
    view.refresh()
    assert len(view.loss) == 3


# ------------------------------------------------------------------ findings


def test_the_help_tab_shows_the_troubleshooting_guide():
    from qlora_studio.ui import findings

    guide = findings.guide_text()
    assert guide and guide == (ROOT / "qlora_studio" / "guide.md").read_text()


def _train_rows(steps, loss=lambda i: 2.0 - 0.01 * i):
    return [{"type": "train", "step": i, "epoch": i / 100, "time": 1000.0 + i, "loss": loss(i), "lr": 2e-4,
             "grad_norm": 1.0, "tokens": 100 * i, "tokens_per_s": 100.0} for i in steps]


def test_findings_follow_the_run_incrementally_and_offer_fixes(tmp_path):
    from qlora_studio.ui import findings

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"learning_rate": 2e-4, "batch_size": 4, "grad_accum": 1}))
    _append(run / "metrics.jsonl", _train_rows(range(1, 21)))
    diag = findings.RunDiagnosis(run)
    assert diag.update({"state": "running"}) == [] and diag.version == 0
    assert len(diag._diagnoser.train) == 20
    diag.update({"state": "running"})  # a second page polling: nothing is fed twice
    assert len(diag._diagnoser.train) == 20
    _append(run / "metrics.jsonl", _train_rows([21], loss=lambda i: float("nan")))
    out = diag.update({"state": "running"})
    assert len(diag._diagnoser.train) == 21 and diag.version == 1
    assert [f.kind for f in out] == ["nonfinite"] and out[0].severity == "error"
    html = findings.findings_html(out, running=True)
    assert "nonfinite" in html and "at step 21" in html and "qs-error" in html and "<ol" in html
    choices = findings.fix_choices(out)
    assert choices and all(value.startswith("nonfinite|21|") for _, value in choices)
    assert "learning_rate" in choices[0][0]
    # the finished run: diagnosed once over everything, with its status
    done = diag.update({"state": "stopped", "finished_at": 1.0})
    assert [f.kind for f in done] == ["nonfinite"]


def test_findings_start_over_when_a_resume_rewrites_the_metrics(tmp_path):
    import os

    from qlora_studio.ui import findings

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    _append(run / "metrics.jsonl", _train_rows(range(1, 11)))
    diag = findings.RunDiagnosis(run)
    diag.update({"state": "running"})
    _append(run / "metrics.tmp", _train_rows(range(1, 5)))
    os.replace(run / "metrics.tmp", run / "metrics.jsonl")
    diag.update({"state": "running"})
    assert len(diag._diagnoser.train) == 4


def test_findings_panel_renders_what_it_is_given():
    from qlora_studio.ui import findings

    assert "nothing found so far" in findings.findings_html([], running=True)
    html = findings.findings_html([{"kind": "spike", "severity": "warning", "step": 7, "message": "loss <jumped>",
                                    "fixes": [{"title": "halve it", "changes": {"learning_rate": 1e-4}, "why": "w"},
                                              {"title": "look at the data", "changes": {}, "why": ""}]}])
    assert "loss &lt;jumped&gt;" in html and "learning_rate → 0.0001" in html and "qs-warn" in html
    assert findings.fix_choices([{"kind": "spike", "step": 7, "fixes": [{"title": "advice", "changes": {}}]}]) == []


# ------------------------------------------------------------------ files and names


def test_uploads_are_kept_under_safe_names_and_limited(studio_home, tmp_path, monkeypatch):
    from qlora_studio.ui import common

    src = tmp_path / "my data (v2).jsonl"
    src.write_text('{"text": "hi"}\n')
    kept = common.keep_upload(src, "../../etc/my data (v2).jsonl")
    assert kept.parent == studio_home / "uploads" and kept.name == "my-data-v2.jsonl"
    assert common.keep_upload(src, src.name).name == "my-data-v2-2.jsonl"
    with pytest.raises(ValueError, match="unsupported file type"):
        common.keep_upload(src, "notes.txt")
    monkeypatch.setattr(common, "MAX_UPLOAD_MB", 0)
    with pytest.raises(ValueError, match="over the upload limit"):
        common.keep_upload(src, src.name)
    assert any(value == str(kept) for _, value in common.data_choices())


def test_run_names_cannot_leave_the_runs_folder(studio_home):
    from qlora_studio.runs import RunError
    from qlora_studio.ui.common import run_folder
    from qlora_studio.ui.train import settings_from_form

    for bad in ("../outside", "/etc", "a/b", ".."):
        with pytest.raises(RunError):
            run_folder(bad)
    with pytest.raises(RunError, match="not a valid run name"):
        settings_from_form({"model": "embedded"}, "assets/sql/train.jsonl", "../escape", _form_values())


def _form_values(**over):
    from qlora_studio.ui.train import FORM_SETTINGS, preset_values

    values, _, _ = preset_values("cpu-demo")
    values.update(over)
    return [values[s.name] for s in FORM_SETTINGS]


def test_the_form_builds_the_train_config_and_names_bad_fields():
    from qlora_studio.config import TrainConfig
    from qlora_studio.errors import ConfigError
    from qlora_studio.ui.train import preset_values, settings_from_form

    _, settings, _ = preset_values("cpu-demo")
    cfg = TrainConfig.from_dict(settings_from_form(settings, "assets/sql/train.jsonl", "", _form_values(max_steps=0)))
    assert cfg.max_steps is None and cfg.model == "embedded" and cfg.test_data  # 0 = by epochs
    other = TrainConfig.from_dict(settings_from_form(settings, "assets/chat/train.jsonl", "mine",
                                                     _form_values(rank=0, targets="auto", task="none")))
    assert other.rank is None and other.targets is None and other.task is None
    assert other.test_data is None and other.name == "mine"
    with pytest.raises(ConfigError, match="settings: batch_size: must be a whole number"):
        TrainConfig.from_dict(settings_from_form(settings, "assets/sql/train.jsonl", "", _form_values(batch_size=2.5)),
                              source="settings")
    with pytest.raises(ValueError, match="data: nope.jsonl: no such file"):
        settings_from_form(settings, "nope.jsonl", "", _form_values())
    with pytest.raises(ConfigError, match="learning_rate"):
        TrainConfig.from_dict(settings_from_form(settings, "assets/sql/train.jsonl", "", _form_values(learning_rate=5)))


def test_the_speed_settings_on_the_form_and_what_automatic_resolves_to():
    import yaml

    from qlora_studio.ui.train import preset_values, resolved_yaml, settings_from_form

    from qlora_studio.config import TrainConfig
    from qlora_studio.errors import ConfigError

    def config(**over):
        return TrainConfig.from_dict(settings_from_form(settings, "assets/sql/train.jsonl", "", _form_values(**over)))

    values, settings, _ = preset_values("cpu-demo")
    assert values["gradient_checkpointing"] == values["batching"] == values["attention"] == "auto"
    auto = config()
    assert auto.gradient_checkpointing is None and auto.batching is None and auto.attention is None
    forced = config(gradient_checkpointing="on", batching="grouped", attention="sdpa")
    assert forced.gradient_checkpointing is True and forced.batching == "grouped" and forced.attention == "sdpa"
    assert config(gradient_checkpointing="off").gradient_checkpointing is False
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        config(gradient_checkpointing="maybe")
    text = resolved_yaml(settings, "assets/sql/train.jsonl", "", *_form_values())
    plan = yaml.safe_load(text)["plan"]
    # this machine has no GPU: SDPA per packed example, and checkpointing off because the demo fits in RAM
    from qlora_studio.hardware import cpu_has_bf16

    assert plan["device"] == "cpu" and plan["precision"] == ("bf16" if cpu_has_bf16() else "fp32")
    assert plan["attention"] == "packed_sdpa"
    assert plan["gradient_checkpointing"] is False and plan["batching"] == "packed"
    assert "# gradient checkpointing: off -- about" in text
    assert "# attention: packed_sdpa -- SDPA on each packed example alone" in text
    off_gb = float(plan["estimated_peak"].split()[0])
    on = yaml.safe_load(resolved_yaml(settings, "assets/sql/train.jsonl", "",
                                      *_form_values(gradient_checkpointing="on")))["plan"]
    assert on["gradient_checkpointing"] is True and float(on["estimated_peak"].split()[0]) < off_gb


def test_log_tail_leaves_tracebacks_out(tmp_path):
    from qlora_studio.ui.common import tail_lines

    log = tmp_path / "train.log"
    log.write_text("10:00:00 step 1/9 loss 2.0\n10:00:01 FAILED: RuntimeError: boom\n"
                   "10:00:01 Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\nRuntimeError: boom\n")
    assert tail_lines(log) == ["10:00:00 step 1/9 loss 2.0", "10:00:01 FAILED: RuntimeError: boom"]


def test_friendly_errors_name_the_problem_without_a_traceback():
    from qlora_studio.data import DataError
    from qlora_studio.ui.common import friendly, safe

    assert friendly(DataError("x.jsonl:3 messages: missing")) == "x.jsonl:3 messages: missing"
    msg = friendly(KeyError("oops"))
    assert msg.startswith("unexpected error (KeyError") and "Traceback" not in msg

    @safe(lambda m: ("error", m))
    def handler():
        raise DataError("x.jsonl:1 text: empty")

    assert handler() == ("error", "x.jsonl:1 text: empty")

    @safe(lambda m: ("error", m))
    def streaming():
        yield ("ok", 1)
        raise ValueError("bad value")

    assert list(streaming()) == [("ok", 1), ("error", "bad value")]


# ------------------------------------------------------------------ presets


@pytest.mark.parametrize("name,card_gb", [("chat-8gb", 8), ("sql-12gb", 12), ("7b-16gb", 16)])
def test_gpu_presets_are_valid_and_fit_their_card(name, card_gb):
    from qlora_studio.catalog import load_architecture
    from qlora_studio.estimator import HEADROOM, estimate
    from qlora_studio.presets import load_preset

    cfg = load_preset(name)
    assert Path(cfg.data).is_file() and cfg.model.startswith("Qwen/Qwen2.5-")
    targets = cfg.targets if isinstance(cfg.targets, str) else "attention"
    est = estimate(load_architecture(cfg.model), quant=cfg.quant, double_quant=cfg.double_quant, rank=cfg.rank,
                   targets=targets, batch=cfg.batch_size, seq=cfg.max_seq_len,
                   grad_checkpointing=cfg.gradient_checkpointing)
    assert est.total_bytes * (1 + HEADROOM) <= card_gb * 2**30


def test_the_chat_sample_is_usable_chat_data():
    from qlora_studio.data import load_examples

    examples, report = load_examples(ROOT / "qlora_studio" / "resources" / "assets" / "chat" / "train.jsonl")
    assert report.format == "chat" and report.usable == report.rows >= 200 and not report.warnings


def test_a_run_started_from_the_form_runs_the_plan_its_preview_showed(studio_home, tiny_llama, toy_data):
    import yaml

    from qlora_studio.manager import get_manager
    from qlora_studio.runs import RunFolder
    from qlora_studio.ui import train

    _, settings, _ = train.preset_values("cpu-demo")
    values = _form_values(model=str(tiny_llama), max_steps=2, max_seq_len=64, eval_fraction=0, rank=0)
    cfg, preview = train.form_plan(settings, str(toy_data), "from-form", *values)
    shown = yaml.safe_load(train.resolved_yaml(settings, str(toy_data), "from-form", *values))["plan"]
    assert shown["rank"] == preview.rank == 16 and shown["targets"] == preview.targets  # what the page shows
    out = train.start(settings, str(toy_data), "from-form", *values)
    assert "Started from-form" in out["notice"], out
    status = get_manager().wait(300)
    assert status["state"] == "completed", status.get("error")
    run = RunFolder(out["watched"])
    doc = run.plan()
    assert doc["plan"] == preview.to_dict(), "plan.json is the plan the preview showed"
    assert doc["adjustments"] == [] and doc["checks"]["packing"].startswith("packed logits match")
    assert run.config()["rank"] is None and run.config()["max_steps"] == 2  # the settings as given


def test_runs_open_a_run_in_chat_and_load_its_settings_into_train(studio_home, toy_data):
    from qlora_studio.runs import RunFolder
    from qlora_studio.ui import runs as runs_tab
    from qlora_studio.ui.train import FORM_SETTINGS, settings_values

    done = RunFolder(studio_home / "runs" / "done")
    (done.adapter).mkdir(parents=True)
    (done.adapter / "adapter_config.json").write_text("{}")
    done.write_config({"model": "embedded", "data": str(toy_data), "rank": 8, "learning_rate": 5e-4,
                       "max_steps": 30, "data_sha256": "x"})
    done.set_status("completed")
    bare = RunFolder(studio_home / "runs" / "bare")
    bare.path.mkdir()
    bare.write_config({"model": "embedded", "data": str(toy_data)})
    bare.set_status("failed", error="boom")

    dropdown, tabs, note = runs_tab.open_in_chat(["done"])
    assert dropdown.value == "done" and tabs.selected == "chat" and note == ""
    with pytest.raises(ValueError, match="bare has no adapter to talk to yet"):
        runs_tab.open_in_chat(["bare"])
    with pytest.raises(ValueError, match="select exactly one run"):
        runs_tab.open_in_chat(["done", "bare"])

    settings, description = runs_tab.settings_of(["done"])
    assert "data_sha256" not in settings and settings["rank"] == 8 and "run done" in description
    values = settings_values(settings)
    by_name = {s.name: s for s in FORM_SETTINGS}
    assert values["rank"] == 8 and values["learning_rate"] == 5e-4 and values["max_steps"] == 30
    assert values["data"].endswith("toy.jsonl") and set(values) == set(by_name) | {"data"}


def test_golden_answers_and_task_evaluation_are_shown(tmp_path):
    from qlora_studio.ui.live_html import samples_html
    from qlora_studio.ui.evaluation import evaluation_html, task_metric as _task_metric

    samples = tmp_path / "samples.jsonl"
    assert samples_html(samples) == ""
    with open(samples, "w") as f:
        for step, reply, score in ((2, "maybe", 0.0), (4, "positive", 1.0)):
            f.write(json.dumps({"step": step, "prompt": "Great <b>film</b>", "reply": reply, "reference": "positive",
                                "step_score": score, "metric": "normalized_match"}) + "\n")
    html = samples_html(samples)
    assert "step 4" in html and "positive" in html and "maybe" not in html, "only the latest step's answers"
    assert "step 2: 0 → step 4: 1" in html and "&lt;b&gt;film" in html

    result = {"run": "r", "n": 2, "metric": "exact", "reason": "short answers", "primary": "normalized_match",
              "metrics": {"normalized_match": 0.5, "exact_match": 0.5, "perplexity": 1.26},
              "base": {"normalized_match": 0.0, "exact_match": 0.0, "perplexity": 82.3},
              "examples": [{"line": 3, "prompt": "p1", "reply": "neg", "reference": "positive", "score": 0.0},
                           {"line": 5, "prompt": "p2", "reply": "positive", "reference": "positive", "score": 1.0}]}
    html = evaluation_html(result)
    assert "normalized match <b>(judged by this)</b></td><td>0%</td><td>50%" in html
    assert "perplexity</td><td>82.3</td><td>1.26" in html
    sql = {**result, "metrics": {"n": 2, "execution_accuracy": 1.0, "errors": 1}, "base": {"errors": 2}}
    html = evaluation_html(sql)
    assert "errors</td><td>2</td><td>1</td>" in html and ">n<" not in html, "counts are counts, not percentages"
    assert html.index("line 3") < html.index("line 5"), "the worst answer first"
    assert _task_metric({"task_eval": {k: v for k, v in result.items() if k != "examples"}}) == \
        "normalized match 50% (base 0%)"
    assert _task_metric({}) == "-" and _task_metric({"task_eval": {"metrics": []}}) == "-"
