"""Time a short training run and print non-pad tokens/s and peak memory.

    python benchmarks/train_speed.py                      # embedded model, sample SQL data, 20 steps
    python benchmarks/train_speed.py --model Qwen/Qwen2.5-0.5B --steps 50 --batch-size 8

Model loading is excluded (the Trainer's own runtime is used); the first logging steps are
reported separately as warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlora_studio.home import resource_dir  # noqa: E402
from qlora_studio.manager import RunManager  # noqa: E402
from qlora_studio.config import TrainConfig  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument("--data", default=str(resource_dir() / "assets" / "sql" / "train.jsonl"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "none"])
    a = p.parse_args()
    cfg = TrainConfig(model=a.model, data=a.data, max_steps=a.steps, batch_size=a.batch_size,
                      max_seq_len=a.max_seq_len, quant=a.quant, eval_fraction=0, save_steps=10**9,
                      learning_rate=1e-3, task="sql")
    manager = RunManager()
    run = manager.start(cfg)
    status = manager.wait()
    if status["state"] != "completed":
        print(f"run {status['state']}: {status.get('error')}", file=sys.stderr)
        return 1
    train = [r for r in run.metrics() if r["type"] == "train"]
    steady = [r for r in train if r["step"] > a.warmup_steps]
    if len(steady) >= 2:
        tokens = steady[-1]["tokens"] - train[a.warmup_steps - 1]["tokens"]
        seconds = steady[-1]["time"] - train[a.warmup_steps - 1]["time"]
        steady_rate = tokens / seconds
    else:
        steady_rate = float("nan")
    s = run.summary()
    print(f"model {a.model} ({cfg.quant}), batch {a.batch_size}, seq {a.max_seq_len}, {s['global_step']} steps, device {s['device']}")
    print(f"non-pad tokens: {s['non_pad_tokens']}  runtime: {s['train_runtime_s']:.1f} s")
    print(f"non-pad tokens/s: {s['tokens_per_s']:.1f} (whole run), {steady_rate:.1f} (after {a.warmup_steps} warm-up steps)")
    print(f"median step time: {statistics.median(b['time'] - a_['time'] for a_, b in zip(train, train[1:])):.2f} s")
    print("peak memory: " + ", ".join(f"{k} {v:.0f}" for k, v in s["peak_memory"].items()))
    print(f"run folder: {run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
