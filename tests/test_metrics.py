"""Task metrics chosen by the kind of answer (qlora_studio.metrics) and the golden prompts' rules
(qlora_studio.golden) that need no model: choosing, scoring, the time budget, the best step, rotation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_studio.errors import StudioError
from qlora_studio.evaluate import warehouse_db_path
from qlora_studio.golden import (GoldenError, best_step, choose_golden, prune_checkpoints, read_golden,
                                 sample_allowance, truncate_samples_after)
from qlora_studio.metrics import (MetricError, answer_kind, chrf, choose_metric, normalize_text, parse_json_reply, rouge_l,
                                  score, token_f1)
from qlora_studio.runs import RunFolder
from qlora_studio.taskeval import EvalExample


def test_the_kind_of_answer_picks_the_metric():
    labels = ["BILLING", "TECH", "SHIPPING", "TECH", "BILLING", "TECH"]
    assert choose_metric(None, labels).metric == "exact" and answer_kind(labels)[0] == "label"
    short = ["Paris", "42 km", "Marie Curie", "blue whale"]
    assert answer_kind(short)[0] == "short" and choose_metric("auto", short).metric == "exact"
    text = ["1/2 cup of brown sugar weighs about 110 g (one cup of brown sugar is about 220 g).",
            "6 ounces is about 170 g (1 ounce is about 28.35 g).", "Preheat the oven to 180 C (350 F) for 20 minutes."]
    assert answer_kind(text)[0] == "text" and choose_metric(None, text).metric == "rouge"
    js = ['{"name": "Ada", "age": 36}', '{"name": "Alan", "age": 41}', "[1, 2]"]
    assert answer_kind(js)[0] == "json" and choose_metric(None, js).metric == "json"
    sql = ["SELECT COUNT(*) FROM orders;", "SELECT name FROM regions;"]
    assert answer_kind(sql)[0] == "short"  # no database: SQL is just text
    db = warehouse_db_path()
    assert choose_metric(None, sql, db=db).metric == "sql"
    assert choose_metric(None, ["anything"], task="sql", db=db).metric == "sql"
    assert choose_metric("f1", labels).metric == "f1" and choose_metric("f1", labels).primary == "token_f1"
    with pytest.raises(MetricError, match="needs the SQLite database") as e:
        choose_metric("sql", sql)
    assert e.value.field == "db" and "--db" in e.value.hint and isinstance(e.value, StudioError)
    with pytest.raises(MetricError, match="'bleu' is not one of"):
        choose_metric("bleu", sql)


def test_exact_and_labels_with_accuracy_per_label_and_confusion():
    refs = ["BILLING", "TECH", "SHIPPING", "TECH", "BILLING", "TECH"]
    replies = ["BILLING", "tech.", "TECH", "The answer is TECH", "BILLING<|im_end|>", "TECH"]
    figures, each = score("exact", replies, refs)
    assert figures["n"] == 6
    assert figures["exact_match"] == pytest.approx(3 / 6)  # "tech." differs as text
    assert figures["normalized_match"] == pytest.approx(4 / 6)
    assert each == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert figures["per_label"] == {"BILLING": {"n": 2, "accuracy": 1.0}, "TECH": {"n": 3, "accuracy": 2 / 3},
                                    "SHIPPING": {"n": 1, "accuracy": 0.0}}
    assert figures["confusion"] == {"BILLING": {"BILLING": 2}, "TECH": {"TECH": 2, "(other)": 1},
                                    "SHIPPING": {"TECH": 1}}
    assert normalize_text("  The  Blue-Whale! ") == "blue whale"


def test_free_text_token_f1_and_rouge_l():
    ref = "1 ounce is about 28 g"
    assert token_f1(ref, ref) == 1.0 and rouge_l(ref, ref) == 1.0
    assert token_f1("I do not know", ref) == 0.0 and rouge_l("I do not know", ref) == 0.0
    close = "one ounce is about 28 g"
    assert 0.7 < token_f1(close, ref) < 1.0 and 0.7 < rouge_l(close, ref) < 1.0
    # ROUGE-L counts order: the same words shuffled keep the token F1 but lose the longest common subsequence
    shuffled = "g 28 about is ounce 1"
    assert token_f1(shuffled, ref) == 1.0 and rouge_l(shuffled, ref) < 0.5
    assert rouge_l("кошка сидит на окне", "кошка сидит") > 0.6  # any script is words
    figures, each = score("rouge", [ref, "no idea"], [ref, ref])
    assert figures["rouge_l"] == pytest.approx(0.5) and figures["token_f1"] == pytest.approx(0.5)
    assert each == [1.0, 0.0] and figures["exact_match"] == 0.5
    assert score("f1", [close], [ref])[0]["token_f1"] == pytest.approx(token_f1(close, ref))


def test_free_text_chrf():
    """chrF (sacrebleu) scores characters: an inflected word still earns most of its credit, where the
    word-level scores give it none."""
    ref = "the cats were sleeping"
    assert chrf(ref, ref) == pytest.approx(1.0) and chrf("", "") == 1.0
    assert chrf("xyz qqq", ref) < 0.05
    inflected = "the cat was sleep"
    assert chrf(inflected, ref) > 0.3 > rouge_l("cat was sleep", "cats were sleeping")
    assert chrf("猫が寝ている", "猫が寝ていた") > 0.4  # no spaces needed
    figures, each = score("chrf", [ref, inflected], [ref, ref])
    assert figures["chrf"] == pytest.approx((1.0 + chrf(inflected, ref)) / 2)
    assert each == [pytest.approx(1.0), pytest.approx(chrf(inflected, ref))]
    assert "rouge_l" in figures and "token_f1" in figures
    assert score("rouge", [inflected], [ref])[1] == [pytest.approx(rouge_l(inflected, ref))]  # judged by ROUGE-L


def test_json_validity_and_field_match():
    refs = ['{"name": "Ada Lovelace", "born": 1815, "tags": ["math", "poetry"]}'] * 4
    replies = ['{"name": "Ada Lovelace", "born": 1815, "tags": ["math", "poetry"]}',  # the same
               'Here it is:\n```json\n{"born": 1815.0, "name": "ada lovelace", "tags": ["math", "poetry"]}\n```',
               '{"name": "Ada Lovelace", "born": 1816, "tags": ["math"]}',
               'name: Ada Lovelace']
    figures, each = score("json", replies, refs)
    assert figures["json_valid"] == 0.75 and figures["exact_match"] == 0.25
    assert each[0] == 1.0 and each[1] == 1.0  # key order, number type and case of strings do not count
    assert each[2] == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))  # 2 of 3 leaves right, 2 of 4 found
    assert each[3] == 0.0 and figures["field_match"] == pytest.approx(sum(each) / 4)
    assert parse_json_reply("prose then [1, 2] and more") == [1, 2]
    with pytest.raises(MetricError, match="reference answer 1 is not JSON"):
        score("json", ["{}"], ["not json"])


def test_sql_is_the_text_to_sql_scorer():
    db = warehouse_db_path()
    refs = ["SELECT COUNT(*) FROM regions;", "SELECT name FROM regions ORDER BY name;"]
    figures, each = score("sql", ["select count(*) from regions", "DROP TABLE regions;"], refs, db=db)
    assert figures == {"n": 2, "execution_accuracy": 0.5, "exact_match": 0.5, "errors": 1}
    assert each == [1.0, 0.0]


def test_the_time_budget_reduces_then_skips_samples():
    assert sample_allowance(3, 0.0, 1.0, None, 0.25) == (3, None)  # the first batch: its cost is unknown
    assert sample_allowance(3, 10.0, 100.0, 2.0, 0.25) == (3, None)  # 10 + 6 <= 25
    n, why = sample_allowance(3, 20.0, 100.0, 2.0, 0.25)
    assert n == 2 and why.startswith("reduced to 2 of 3 prompts")
    n, why = sample_allowance(3, 24.0, 100.0, 2.0, 0.25)
    assert n == 0 and why.startswith("skipped: golden prompts have taken 24.0 s of 100.0 s")
    assert sample_allowance(3, 0.0, 100.0, None, 0.0)[0] == 0


def test_golden_prompts_prefer_different_answers_and_read_back(tmp_path):
    held = [EvalExample(i, [{"role": "user", "content": f"q{i}"}], ref)
            for i, ref in enumerate(["A", "A", "B", "A", "C"], start=1)]
    assert [e.line for e in choose_golden(held, 3)] == [1, 3, 5]
    assert [e.line for e in choose_golden(held, 4)] == [1, 3, 5, 2]
    path = tmp_path / "golden.json"
    path.write_text(json.dumps({"prompts": [e.to_dict() for e in held[:2]]}))
    assert read_golden(path) == held[:2]
    path.write_text(json.dumps({"prompts": [{"messages": [{"role": "robot", "content": "hi"}]}]}))
    with pytest.raises(GoldenError, match=r"golden.json: prompts\[0\].messages: expected a list") as e:
        read_golden(path)
    assert e.value.field == "messages" and e.value.hint
    path.write_text("{")
    with pytest.raises(GoldenError, match="not readable as JSON"):
        read_golden(path)


def test_best_step_and_rotation_keep_the_best_by_task_and_by_loss(tmp_path):
    scores = {4: {"value": 0.33, "eval_loss": 0.9}, 8: {"value": 1.0, "eval_loss": 0.5},
              12: {"value": 1.0, "eval_loss": 0.4}, 16: {"value": 0.66, "eval_loss": 0.3}}
    assert best_step(scores) == 12  # tie at 1.0: the lower eval loss
    assert best_step({}) is None
    run = RunFolder(tmp_path / "run")
    for step in (4, 8, 12, 16, 20):
        ckpt = run.checkpoints_dir / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text("{}")
    (run.checkpoints_dir / "checkpoint-24").mkdir()  # torn (no trainer_state.json): not touched here
    assert prune_checkpoints(run, {12, 16}) == ["checkpoint-4", "checkpoint-8"]
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == [
        "checkpoint-12", "checkpoint-16", "checkpoint-20", "checkpoint-24"]


def test_samples_after_a_checkpoint_are_dropped_on_resume(tmp_path):
    run = RunFolder(tmp_path)
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"step": s, "reply": "x"}) + "\n" for s in (2, 4, 6)))
    truncate_samples_after(run, 4)
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [2, 4]
    truncate_samples_after(RunFolder(tmp_path / "none"), 4)  # no samples yet: nothing to do
    assert not Path(tmp_path / "none" / "samples.jsonl").exists()
