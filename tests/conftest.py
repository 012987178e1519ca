"""Shared fixtures: a private studio home, the embedded model (converted once), a tiny Llama."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

# Tests never reach a model hub, whatever the machine's network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# llama.cpp's converters (fetched on the first export, about 77 MB) are kept across test sessions here,
# for every process the tests start (the app's server included).
os.environ.setdefault("QLORA_STUDIO_TOOLS", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "qlora-studio-tools"))


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("studio-home")
    os.environ["QLORA_STUDIO_HOME"] = str(home)
    return home


@pytest.fixture()
def studio_home(session_home, embedded_path, tmp_path, monkeypatch) -> Path:
    """A fresh studio home per test that shares the converted-model cache of the session."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    for p in (session_home / "models").iterdir() if (session_home / "models").is_dir() else []:
        if not p.name.startswith("."):
            (home / "models" / p.name).symlink_to(p)
    monkeypatch.setenv("QLORA_STUDIO_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def embedded_path(session_home) -> Path:
    from qlora_studio.models import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def tiny_llama(embedded_path, tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and the embedded model's tokenizer (fast to train)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_sql_like_data(path: Path, n: int = 64, seed: int = 0) -> Path:
    """A small, very learnable chat data set."""
    rnd = random.Random(seed)
    tables = ["customers", "orders", "products", "regions"]
    with open(path, "w") as f:
        for _ in range(n):
            t, k = rnd.choice(tables), rnd.randint(1, 60)
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Show {t} with id {k}"},
                {"role": "assistant", "content": f"SELECT * FROM {t} WHERE {t[:-1]}_id = {k};"}]}) + "\n")
    return path


@pytest.fixture()
def toy_data(tmp_path) -> Path:
    return write_sql_like_data(tmp_path / "toy.jsonl")


def train_tiny(tiny_llama, data, name: str, **settings):
    """A short 4-bit CPU run of the tiny Llama (one epoch, batch 4) with ``settings``; it must complete.
    Returns the run, its train.log and its train losses (evaluations are paced by time, so two runs may
    evaluate at different steps: their losses are not comparable step for step)."""
    from qlora_studio.config import TrainConfig
    from qlora_studio.training import prepare_run, run_training

    cfg = TrainConfig(**{"model": str(tiny_llama), "data": str(data), "epochs": 1, "batch_size": 4,
                         "learning_rate": 3e-3, "max_seq_len": 256, "eval_fraction": 0.0, "quant": "nf4",
                         "name": name, "save_steps": 10**6, **settings})
    run = prepare_run(cfg)
    assert run_training(run)["state"] == "completed"
    losses = [r["loss"] for r in run.metrics() if r["type"] == "train" and "loss" in r]
    return run, (run.path / "train.log").read_text(), losses
