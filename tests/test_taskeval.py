"""Did it learn the task? Real runs of the embedded model: golden prompts answered at each evaluation from
held-out rows (samples.jsonl), task evaluation of the fine-tuned model against its base on those rows
(classification, the shipped chat sample), the JSON and SQL paths, the `eval` verb and the demo."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_studio.config import TrainConfig
from qlora_studio.data import prepare_dataset, tokenize_example
from qlora_studio.evaluate import sample_sql_dir, warehouse_db_path
from qlora_studio.home import resource_dir
from qlora_studio.loading import load_tokenizer
from qlora_studio.runs import RunFolder
from qlora_studio.taskeval import TaskEvalError, evaluate_run
from qlora_studio.training import prepare_run, run_training

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
LABELS = {
    "BILLING": ["I was charged twice for my {x}", "please refund the {x} I returned", "my invoice for the {x} is wrong",
                "why did my card get billed for the {x}"],
    "SHIPPING": ["where is my {x}, the tracking has not moved", "the {x} arrived late and the box was crushed",
                 "can you change the delivery address for my {x}", "my {x} was never delivered"],
    "TECH": ["the app crashes when I open the {x} page", "I cannot log in to see my {x}",
             "the website shows an error when I add the {x}", "the {x} settings page will not load"],
}
THINGS = ["blender", "lamp", "jacket", "phone case", "desk", "kettle", "backpack", "monitor", "chair", "printer"]


def write_tickets(path: Path, n: int = 96, seed: int = 0) -> Path:
    """Support tickets routed to one of three labels in a fixed upper-case form (no duplicate rows)."""
    rows = [(label, template.format(x=thing)) for label, templates in LABELS.items()
            for template, thing in itertools.product(templates, THINGS)]
    random.Random(seed).shuffle(rows)
    with open(path, "w", encoding="utf-8") as f:
        for label, text in rows[:n]:
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "Route the support ticket: BILLING, SHIPPING or TECH."},
                {"role": "user", "content": text}, {"role": "assistant", "content": label}]}) + "\n")
    return path


def _home(session_home: Path, tmp: Path) -> Path:
    """A studio home of its own that shares the session's converted embedded model."""
    home = tmp / "home"
    (home / "models").mkdir(parents=True)
    for p in (session_home / "models").iterdir():
        if not p.name.startswith("."):
            (home / "models" / p.name).symlink_to(p)
    return home


def _train(home: Path, **settings) -> RunFolder:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLORA_STUDIO_HOME", str(home))
        run = prepare_run(TrainConfig(model="embedded", lora_dropout=0.0, **settings))
        status = run_training(run)
    assert status["state"] == "completed", status.get("error")
    return run


@pytest.fixture(scope="module")
def ticket_run(session_home, embedded_path, tmp_path_factory) -> RunFolder:
    tmp = tmp_path_factory.mktemp("tickets")
    data = write_tickets(tmp / "tickets.jsonl")
    return _train(_home(session_home, tmp), data=str(data), max_steps=8, batch_size=8, learning_rate=2e-3,
                  max_seq_len=64, eval_fraction=0.1, eval_steps=4, golden_prompts=3, golden_time_share=1.0)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_golden_prompts_are_held_out_rows_answered_at_each_evaluation(ticket_run):
    run = ticket_run
    held = json.loads((run.path / "heldout.json").read_text())
    assert len(held["lines"]) == 10 and held["sha256"] == run.config()["data_sha256"]
    golden = json.loads((run.path / "golden.json").read_text())["prompts"]
    assert len(golden) == 3 and {p["line"] for p in golden} <= set(held["lines"])
    assert len({p["reference"] for p in golden}) == 3, "a classification set shows several labels"
    # the held-out rows are never trained on: none of their token sequences is a training row
    tok = load_tokenizer(run.adapter)
    data = prepare_dataset(run.config()["data"], tok, 64, 0.1, 42)
    assert [ex.line for ex in data.heldout] == held["lines"]
    train_rows = {tuple(ids) for ids in data.train["input_ids"]}
    assert len(train_rows) == 86 and not train_rows & {tuple(tokenize_example(tok, ex, 64)["input_ids"])
                                                       for ex in data.heldout}
    eval_steps = [r["step"] for r in run.metrics() if r["type"] == "eval"]
    assert eval_steps == [4, 8]
    samples = _jsonl(run.path / "samples.jsonl")
    assert sorted({s["step"] for s in samples}) == eval_steps, "golden prompts answered at every evaluation"
    for step in eval_steps:
        at = [s for s in samples if s["step"] == step]
        assert [s["line"] for s in at] == [p["line"] for p in golden]
        assert all(s["reference"] == p["reference"] and isinstance(s["reply"], str) and s["seconds"] > 0
                   and s["prompt"] == p["messages"][-1]["content"] and s["metric"] == "normalized_match"
                   for s, p in zip(at, golden))
    summary = run.summary()
    assert summary["eval"]["eval_loss"] > 0, "summary.json's eval keeps the final eval loss"
    g = summary["golden"]
    assert g["evaluations"] == 2 and g["skipped"] == [] and g["seconds"] > 0 and g["max_new_tokens"] <= 48
    assert 0 < g["share_of_training"] <= 1.0
    best = summary["best"]
    assert best["by"] == "normalized_match" and best["step"] in eval_steps and best["why"]
    assert best["checkpoint"] == f"checkpoint-{best['step']}" and (run.checkpoints_dir / best["checkpoint"]).is_dir()
    log = (run.path / "train.log").read_text()
    assert "golden prompts at step 4: 3 replies in" in log and f"best step {best['step']}:" in log


def test_a_classification_run_scores_better_than_its_base_on_held_out_rows(ticket_run):
    result = evaluate_run(ticket_run.path)
    assert result["task"] == "label" and result["metric"] == "exact" and result["primary"] == "normalized_match"
    assert result["n"] == 10 and result["rows"] == "held-out"
    tuned, base = result["metrics"], result["base"]
    print("classification, fine-tuned:", {k: v for k, v in tuned.items() if not isinstance(v, dict)},
          "base:", {k: v for k, v in base.items() if not isinstance(v, dict)}, "seconds:", result["seconds"])
    assert tuned["normalized_match"] > base["normalized_match"]
    assert tuned["perplexity"] < base["perplexity"]
    assert sum(row["n"] for row in tuned["per_label"].values()) == 10
    assert sum(sum(row.values()) for row in tuned["confusion"].values()) == 10
    assert {e["line"] for e in result["examples"]} == set(json.loads((ticket_run.path / "heldout.json").read_text())["lines"])
    summary = ticket_run.summary()
    assert summary["task_eval"]["metrics"] == tuned and summary["task_eval"]["base"] == base
    assert "examples" not in summary["task_eval"] and summary["eval"]["eval_loss"] > 0
    assert json.loads((ticket_run.path / "eval.json").read_text())["examples"] == result["examples"]


def cli(*args, home: Path, timeout: int = 900):
    env = dict(os.environ, QLORA_STUDIO_HOME=str(home), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "qlora_studio.cli", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_the_eval_verb_prints_json_and_reuses_the_base_models_answers(ticket_run, tmp_path):
    home = tmp_path / "home"
    evaluate_run(ticket_run.path)  # the base's answers cached (already, when the test above ran)
    out = cli("eval", ticket_run.path, "--json", home=home)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert {"task", "n", "metrics", "base", "examples"} <= set(result) and result["n"] == 10
    assert result["seconds"]["base_cached"] is True, "the base's answers on the same rows come from the cache"
    assert result["metrics"]["normalized_match"] > result["base"]["normalized_match"]
    assert "fine-tuned: 10/10 replies" in out.stderr and "base:" not in out.stderr
    out = cli("eval", ticket_run.path, "--limit", "2", "--no-base", home=home)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "judged by normalized_match" in out.stdout and "base skipped" in out.stdout
    for args, message in ((["--metric", "sql"], "needs the SQLite database"),
                          (["--data", tmp_path / "missing.jsonl"], "missing.jsonl: no such file"),
                          (["--limit", "0"], "limit: must be >= 1")):
        out = cli("eval", ticket_run.path, *args, home=home, timeout=120)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_json_answers_and_sql_answers_from_an_eval_file(ticket_run, tmp_path):
    people = [("Ada Lovelace", 1815), ("Alan Turing", 1912), ("Grace Hopper", 1906)]
    path = tmp_path / "people.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Give name and birth year of {name} as JSON.",
                                        "completion": json.dumps({"name": name, "born": born})}) + "\n"
                            for name, born in people))
    result = evaluate_run(ticket_run.path, data=path, limit=2, base=False)
    assert (result["task"], result["metric"], result["primary"], result["n"]) == ("json", "json", "field_match", 2)
    assert set(result["metrics"]) == {"n", "json_valid", "field_match", "exact_match", "perplexity"}
    assert result["base"] is None and all(0 <= e["score"] <= 1 for e in result["examples"])
    sql = evaluate_run(ticket_run.path, data=sample_sql_dir() / "test.jsonl", db=warehouse_db_path(), limit=2,
                       base=False)
    assert (sql["task"], sql["metric"], sql["n"]) == ("sql", "sql", 2)
    assert set(sql["metrics"]) == {"n", "execution_accuracy", "exact_match", "errors", "perplexity"}
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "no answers here"}\n')
    with pytest.raises(TaskEvalError, match="plain text rows have no prompt and answer"):
        evaluate_run(ticket_run.path, data=text)


def test_the_chat_sample_fine_tuned_scores_better_than_its_base(session_home, embedded_path, tmp_path):
    run = _train(_home(session_home, tmp_path), data=str(resource_dir() / "assets" / "chat" / "train.jsonl"),
                 max_steps=8, batch_size=4, learning_rate=1e-3, max_seq_len=128, eval_fraction=0.05, eval_steps=8,
                 golden_prompts=0)
    assert not (run.path / "samples.jsonl").exists() and "golden" not in run.summary()
    assert run.summary()["best"]["by"] == "eval_loss"
    result = evaluate_run(run.path, limit=4)
    assert (result["task"], result["metric"], result["n"]) == ("text", "rouge", 4)
    tuned, base = result["metrics"], result["base"]
    print("chat sample, fine-tuned:", tuned, "base:", base, "seconds:", result["seconds"])
    assert tuned["rouge_l"] > base["rouge_l"] and tuned["token_f1"] > base["token_f1"]
    assert tuned["perplexity"] < base["perplexity"]


def test_the_demo_still_reports_sql_execution_accuracy(session_home, embedded_path, tmp_path):
    out = cli("demo", "--max-steps", "1", "--limit", "2", "--no-chat", home=_home(session_home, tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("held-out execution accuracy: base "))
    assert "2 questions" in line
    run = Path(out.stdout.strip().splitlines()[-1].removeprefix("run folder: "))
    task = json.loads((run / "summary.json").read_text())["task_eval"]
    assert task["metric"] == "sql" and task["data"] == str(sample_sql_dir() / "test.jsonl")
    assert {"execution_accuracy", "exact_match"} <= set(task["metrics"]) <= set(task["base"]) | {"perplexity"}
