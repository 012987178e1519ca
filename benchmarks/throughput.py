"""Non-pad tokens/s of the standard QLoRA recipe and of our trainer on the same long-tailed data.

    python benchmarks/throughput.py                          # CPU: embedded model, the reference, ours, each lever
    python benchmarks/throughput.py --only reference ours    # just the two
    python benchmarks/throughput.py --data alpaca --only "ours, LM head everywhere" ours   # prompts masked
    python benchmarks/throughput.py --busy --only "ours, threads fixed" ours   # beside a busy process
    python benchmarks/throughput.py --data alpaca --only "ours, dropout masks from torch" ours
    python benchmarks/throughput.py --data alpaca --only "ours, eager attention" ours
    python benchmarks/throughput.py --data alpaca --only "ours, 4-bit weights decoded at each use" ours
    python benchmarks/throughput.py --data alpaca --only "ours, attention in bf16" ours
    python benchmarks/throughput.py --from-config qwen2.5-0.5b --examples 512   # a model built from its config
                                                                               # (random weights; for CUDA)

The reference is the recipe the guides print: transformers Trainer + PEFT + bitsandbytes NF4 (double
quant, bf16 compute) + `prepare_model_for_kbit_training` + DataCollatorForLanguageModeling (dynamic
padding, loss on every token) + gradient checkpointing, batch 4. Ours is `qlora_studio.training` as a
user runs it, on the same examples (plain text, trained on every token), the same LoRA (rank 16,
alpha 32, every linear layer, dropout 0.05), learning rate, batch and sequence length.

Every configuration runs in a fresh process. Model loading is excluded, and so are the first
``--warmup`` optimizer steps: the rate is (tokens after the warm-up) / (time after the warm-up),
from the per-step log each Trainer writes. The data: ``--examples`` texts built from the project's own
files, their lengths drawn from a log-normal (most short, a long tail up to the sequence length), the
same file for every configuration. The levers are measured one at a time on top of "ours, levers
off" (padded random batches, SDPA, checkpointing on: only the fp32 up-cast of the reference is gone),
then all together (ours as shipped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlora_studio.home import resource_dir  # noqa: E402

LORA = dict(r=16, alpha=32, dropout=0.05)
BASE_OURS = {"batching": "padded", "attention": "sdpa", "gradient_checkpointing": True, "logits": "all",
             "dropout_masks": "torch", "decoded_weights": False, "cross_entropy": "torch", "lora_update": "peft",
             "optimizer": "adamw_torch"}
CONFIGS = {
    # name: (side, overrides of our TrainConfig)
    "reference": ("reference", {}),
    "ours, levers off": ("ours", dict(BASE_OURS)),
    "+ length-grouped batches": ("ours", dict(BASE_OURS, batching="grouped")),
    "+ padding-free packing": ("ours", dict(BASE_OURS, batching="packed")),
    "+ eager attention": ("ours", dict(BASE_OURS, attention="eager")),
    "+ no gradient checkpointing": ("ours", dict(BASE_OURS, gradient_checkpointing=False)),
    "+ LM head at trained positions": ("ours", dict(BASE_OURS, logits="labelled")),  # --data alpaca: prompts masked
    "+ 16-bit dropout masks": ("ours", dict(BASE_OURS, dropout_masks="16bit")),
    "+ 4-bit weights kept decoded": ("ours", dict(BASE_OURS, decoded_weights=True)),
    "+ chunked cross-entropy": ("ours", dict(BASE_OURS, cross_entropy="chunked")),
    "+ fused LoRA update": ("ours", dict(BASE_OURS, lora_update="fused")),
    "+ fused AdamW": ("ours", dict(BASE_OURS, optimizer="adamw_torch_fused")),
    "ours, LM head everywhere": ("ours", {"logits": "all"}),
    "ours, SDPA attention": ("ours", {"attention": "sdpa"}),  # SDPA over whole packed rows, with a mask
    "ours, eager attention": ("ours", {"attention": "eager"}),  # against SDPA per packed example
    "ours, dropout masks from torch": ("ours", {"dropout_masks": "torch"}),  # against 16-bit masks
    "ours, 4-bit weights decoded at each use": ("ours", {"decoded_weights": False}),  # against kept decoded
    "ours, transformers' cross-entropy": ("ours", {"cross_entropy": "torch"}),  # against the chunked one
    "ours, peft's LoRA update": ("ours", {"lora_update": "peft"}),  # against the fused one
    "ours, foreach AdamW": ("ours", {"optimizer": "adamw_torch"}),  # against torch's fused AdamW
    "ours, attention in bf16": ("ours", {"_attention_bf16": True}),  # bf16 CPU: SDPA in bf16, not fp32
    "ours, threads fixed": ("ours", {"cpu_threads": os.cpu_count()}),  # --busy: against the adaptive count
    "ours, batch counts sequences": ("ours", {"batch_unit": "sequences"}),  # the peers' bigger packed steps
    "ours": ("ours", {}),  # as shipped: every setting automatic
}


# ----------------------------------------------------------------------------------------- data


def corpus_words() -> list[str]:
    """Words from the project's sample data and troubleshooting guide (questions, SQL, chats, advice)."""
    texts = []
    for path in sorted((resource_dir() / "assets").rglob("*.jsonl")) + [ROOT / "qlora_studio" / "guide.md"]:
        texts.append(path.read_text(encoding="utf-8"))
    words = re.findall(r"\S+", re.sub(r'[{}"\[\]]|\\n', " ", "\n".join(texts)))
    return [w for w in words if len(w) < 30]


def make_data(path: Path, n: int, max_words: int, seed: int = 0, kind: str = "text") -> dict:
    """``n`` rows; words per row log-normal (median 60, long tail), capped at ``max_words``. ``text``:
    {"text": ...} (every token trained); ``alpaca``: {"instruction", "output"}, the instruction about
    two thirds of the words (masked: only the output is trained, as in chat data)."""
    words = corpus_words()
    rng = random.Random(seed)
    lengths = []
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            k = max(8, min(max_words, int(rng.lognormvariate(math.log(60), 0.9))))
            start = rng.randrange(0, len(words) - k)
            row = words[start:start + k]
            if kind == "alpaca":
                cut = max(1, int(k * rng.uniform(0.5, 0.8)))
                f.write(json.dumps({"instruction": " ".join(row[:cut]), "output": " ".join(row[cut:])}) + "\n")
            else:
                f.write(json.dumps({"text": " ".join(row)}) + "\n")
            lengths.append(k)
    lengths.sort()
    return {"rows": n, "words_median": lengths[n // 2], "words_p90": lengths[int(n * 0.9)], "words_max": lengths[-1]}


# ------------------------------------------------------------------------------------ one run


def _rate(records: list[dict], warmup: int) -> tuple[float, int, float]:
    """(tokens/s after the warm-up steps, total tokens, seconds after the warm-up)."""
    records = [r for r in records if r.get("type", "train") == "train"]
    a, b = records[warmup - 1], records[-1]
    return (b["tokens"] - a["tokens"]) / (b["time"] - a["time"]), b["tokens"], b["time"] - a["time"]


def run_reference(a, data: Path, model_path: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForLanguageModeling, Trainer,
                              TrainerCallback, TrainingArguments)

    from qlora_studio.data import prepare_dataset
    from qlora_studio.loading import linear_module_names, load_tokenizer

    cuda = torch.cuda.is_available()
    tok = load_tokenizer(model_path)
    prepared = prepare_dataset(data, tok, a.max_seq_len, eval_fraction=0.0, seed=42, fmt=a.data)
    train = prepared.train.select_columns(["input_ids"])  # the recipe's collator makes labels (every token)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0} if cuda else None)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=linear_module_names(model), task_type="CAUSAL_LM"))
    records = []

    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                records.append({"step": state.global_step, "time": time.time(), "tokens": int(state.num_input_tokens_seen),
                                "loss": logs["loss"]})

    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="ref-"), per_device_train_batch_size=a.batch_size,
                             gradient_accumulation_steps=1, learning_rate=2e-4, lr_scheduler_type="cosine",
                             warmup_steps=0.05, num_train_epochs=1, logging_steps=1, save_strategy="no",
                             bf16=True, use_cpu=not cuda, gradient_checkpointing=True,
                             optim="paged_adamw_8bit" if cuda else "adamw_torch", report_to="none", disable_tqdm=True,
                             include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False), callbacks=[Log()])
    trainer.train()
    rate, tokens, seconds = _rate(records, a.warmup)
    return {"tokens_per_s": rate, "tokens": tokens, "seconds": seconds, "steps": len(records),
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"]}


def run_ours(a, data: Path, model_path: Path, overrides: dict) -> dict:
    from qlora_studio.runs import RunFolder
    from qlora_studio.config import TrainConfig
    from qlora_studio.training import prepare_run, run_training

    overrides = dict(overrides)
    if overrides.pop("_attention_bf16", False):
        import qlora_studio.attention

        qlora_studio.attention.CPU_FP32 = False
    cfg = TrainConfig(model=str(model_path), data=str(data), data_format=a.data, quant="nf4", rank=LORA["r"],
                      alpha=LORA["alpha"], targets="all", lora_dropout=LORA["dropout"], learning_rate=2e-4,
                      epochs=1, batch_size=a.batch_size, max_seq_len=a.max_seq_len, eval_fraction=0.0,
                      save_steps=10**9, **overrides)
    run = prepare_run(cfg)
    status = run_training(run, echo=False)
    if status["state"] != "completed":
        raise SystemExit(f"our run did not complete: {status}")
    records = [r for r in RunFolder(run.path).metrics() if r.get("type") == "train"]
    rate, tokens, seconds = _rate(records, a.warmup)
    config = json.loads((run.path / "config.json").read_text())
    return {"tokens_per_s": rate, "tokens": tokens, "seconds": seconds, "steps": len(records),
            "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"], "speed": config.get("speed")}


def child(a) -> int:
    spec = json.loads(a.child)
    if spec["side"] == "reference":
        out = run_reference(a, Path(spec["data"]), Path(spec["model"]))
    else:
        out = run_ours(a, Path(spec["data"]), Path(spec["model"]), spec["overrides"])
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# ------------------------------------------------------------------------------------- driver


def model_from_config(name: str, folder: Path) -> Path:
    """A model with random weights built from a catalog architecture, saved with the embedded tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_studio.catalog import load_architecture
    from qlora_studio.models import embedded_model_path
    from qlora_studio.loading import load_tokenizer

    arch = load_architecture(name)
    extra = {"attention_bias": True} if arch.qkv_bias and arch.model_type == "llama" else {}
    cfg = AutoConfig.for_model(arch.model_type, hidden_size=arch.hidden_size, num_hidden_layers=arch.num_layers,
                               num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
                               head_dim=arch.head_dim, intermediate_size=arch.intermediate_size,
                               vocab_size=arch.vocab_size, tie_word_embeddings=arch.tied_embeddings, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    load_tokenizer(embedded_model_path()).save_pretrained(folder)  # its ids fit any larger vocabulary
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of the rate")
    p.add_argument("--from-config", help="a catalog architecture (e.g. qwen2.5-0.5b) built with random weights")
    p.add_argument("--data", choices=["text", "alpaca"], default="text",
                   help="text: every token trained; alpaca: instructions masked, only the outputs trained")
    p.add_argument("--busy", action="store_true", help="run a busy process (one core) beside each configuration")
    p.add_argument("--repeats", type=int, default=1, help="run the configurations this many times, the order "
                   "reversed every other time")
    p.add_argument("--only", nargs="+", help=f"configurations to run: {', '.join(CONFIGS)} (or reference / ours)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)

    from qlora_studio.models import embedded_model_path

    work = Path(tempfile.mkdtemp(prefix="qlora-throughput-"))
    model = model_from_config(a.from_config, work / "model") if a.from_config else embedded_model_path()
    data = work / "data.jsonl"
    shape = make_data(data, a.examples, max_words=a.max_seq_len, kind=a.data)
    names = [n for n in CONFIGS if not a.only or n in a.only]
    env = dict(os.environ, QLORA_STUDIO_HOME=str(work / "home"), HF_HUB_OFFLINE="1")
    (work / "home" / "models").mkdir(parents=True)
    if not a.from_config:
        (work / "home" / "models" / model.name).symlink_to(model)
    load = os.getloadavg()
    print(f"model {a.from_config or 'embedded SmolLM2-135M'}, {a.examples} {a.data} examples (words: median "
          f"{shape['words_median']}, 90th percentile {shape['words_p90']}, max {shape['words_max']}), "
          f"batch {a.batch_size}, sequence length {a.max_seq_len}, {a.warmup} warm-up steps left out", flush=True)
    results = {}
    order = [n for k in range(a.repeats) for n in (names if k % 2 == 0 else names[::-1])]
    for name in order:
        side, overrides = CONFIGS[name]
        spec = {"side": side, "data": str(data), "model": str(model), "overrides": overrides}
        cmd = [sys.executable, __file__, "--child", json.dumps(spec), "--batch-size", str(a.batch_size),
               "--max-seq-len", str(a.max_seq_len), "--warmup", str(a.warmup), "--data", a.data]
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if a.busy else None
        start_load = os.getloadavg()[0]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        r = results[name] = json.loads(line[len("RESULT "):])
        r["load"] = (start_load, os.getloadavg()[0])
        ref = results.get("reference")
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        speed = r.get("speed") or {}
        how = (f"  [{speed.get('attention')}, checkpointing {'on' if speed.get('gradient_checkpointing') else 'off'}, "
               f"{'packed' if speed.get('packing') else speed.get('batching', 'padded')}]") if speed else ""
        print(f"{name:30s} {r['tokens_per_s']:7.1f} non-pad tokens/s  {ratio:>6s}   ({r['tokens']} tokens, "
              f"{r['steps']} steps, loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}){how}  load "
              f"{r['load'][0]:.2f} -> {r['load'][1]:.2f}", flush=True)
    totals = {r["tokens"] for r in results.values()}
    if len(totals) > 1:
        print(f"warning: the configurations saw different token totals {sorted(totals)}", flush=True)
    after = os.getloadavg()
    print(f"load average before {load[0]:.2f}, after {after[0]:.2f} ({os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
