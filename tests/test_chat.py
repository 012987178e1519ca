"""Merge a trained adapter into the 16-bit base and talk to the result."""

import os
import stat
import subprocess
import sys

import pytest
import torch

from qlora_studio.chat import generate_batch, load_chat_model, load_run_model, merge_run, reply
from qlora_studio.config import TrainConfig
from qlora_studio.training import prepare_run, run_training

PROMPTS = [[{"role": "user", "content": f"Show {t} with id {k}"}] for t, k in [("orders", 7), ("regions", 3), ("products", 41)]]


@pytest.fixture(scope="module")
def trained_run(session_home, embedded_path, tmp_path_factory):
    from conftest import write_sql_like_data

    data = write_sql_like_data(tmp_path_factory.mktemp("chat-data") / "toy.jsonl")
    cfg = TrainConfig(model="embedded", data=str(data), max_steps=8, batch_size=4, learning_rate=1e-3,
                      max_seq_len=64, eval_fraction=0, quant="nf4", lora_dropout=0.0, save_steps=1000)
    run = prepare_run(cfg)
    assert run_training(run)["state"] == "completed"
    return run


def _last_logits(model, tok):
    enc = tok.apply_chat_template(PROMPTS[0], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**enc).logits[0, -1].float()


def test_merged_model_matches_base_plus_adapter(trained_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(trained_run.plan()["model"]["path"], dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, str(trained_run.adapter)).eval()
    tok = load_chat_model(trained_run.plan()["model"]["path"])[1]
    want = _last_logits(unmerged, tok)
    want_text = generate_batch(unmerged, tok, PROMPTS, max_new_tokens=24)

    # Saved in fp32, the merge is base + adapter up to float rounding.
    exact, _ = load_chat_model(merge_run(trained_run, dtype="float32"))
    assert (_last_logits(exact, tok) - want).abs().max() < 1e-3
    # Saved in the base's bf16 (the default): same greedy replies, logits within bf16 rounding.
    merged_path = merge_run(trained_run, force=True)
    assert "bfloat16" in (merged_path / "studio_merged.json").read_text()
    assert (merged_path / "model.safetensors").is_file() and (merged_path / "tokenizer_config.json").is_file()
    # Readable by other tools and users as the umask allows (a temporary folder is made 0700 first).
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(merged_path.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in merged_path.iterdir()} == {0o666 & ~umask}
    merged, _ = load_chat_model(merged_path)
    got = _last_logits(merged, tok)
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.999 and got.argmax() == want.argmax()
    assert generate_batch(merged, tok, PROMPTS, max_new_tokens=24) == want_text
    mtime = (merged_path / "model.safetensors").stat().st_mtime
    assert merge_run(trained_run) == merged_path and (merged_path / "model.safetensors").stat().st_mtime == mtime


def test_fine_tuned_model_answers_in_the_trained_form_and_the_base_does_not(trained_run):
    tuned, tok = load_run_model(trained_run.path)
    text = reply(tuned, tok, PROMPTS[0], max_new_tokens=24)
    assert text.strip() == "SELECT * FROM orders WHERE order_id = 7;"
    base, tok = load_run_model(trained_run.path, base=True)
    assert "SELECT * FROM orders WHERE order_id = 7;" not in reply(base, tok, PROMPTS[0], max_new_tokens=24)


def test_chat_cli_prints_the_streamed_reply(trained_run):
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-m", "qlora_studio.cli", "chat", str(trained_run.path), "--prompt",
                          "Show regions with id 3", "--max-new-tokens", "24"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "SELECT * FROM regions WHERE region_id = 3;" in out.stdout


def test_merge_refuses_a_run_without_adapter(studio_home, toy_data):
    from qlora_studio.chat import ChatError

    run = prepare_run(TrainConfig(data=str(toy_data)))
    with pytest.raises(ChatError, match="no adapter yet"):
        merge_run(run)
