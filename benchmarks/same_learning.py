"""Packing must not change what is learned: the eval loss after the same steps (the same examples, so the
same tokens) with padding-free packing and with padded batches, next to the spread between two seeds.

    python benchmarks/same_learning.py                  # embedded model, sample SQL data, 30 steps of 8
    python benchmarks/same_learning.py --steps 60

Each run is the product's trainer (`qlora_studio.training`) with everything automatic except
``batching``, on every row of the training file. The held-out loss is measured the same way for every
run: the 16-bit base with the run's adapter, on the sample's assets/sql/test.jsonl (loss on the answer tokens, as
trained). Seed 1 and seed 2 differ in LoRA initialisation and example order: their gap is the noise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qlora_studio.home import resource_dir  # noqa: E402


def held_out_loss(run, path: str) -> float:
    """Mean loss per trained token of the held-out rows: the 16-bit base with the run's adapter."""
    import torch

    from qlora_studio.chat import _base_path, load_chat_model
    from qlora_studio.data import prepare_dataset

    model, tok = load_chat_model(_base_path(run), adapter=run.adapter)
    rows = prepare_dataset(path, tok, 256, eval_fraction=0.0).train
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return total / count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data", default=str(resource_dir() / "assets" / "sql" / "train.jsonl"))
    p.add_argument("--held-out", default=str(resource_dir() / "assets" / "sql" / "test.jsonl"))
    a = p.parse_args()

    from qlora_studio.models import embedded_model_path

    embedded = embedded_model_path()
    home = Path(tempfile.mkdtemp(prefix="qlora-same-"))
    (home / "models").mkdir()
    (home / "models" / embedded.name).symlink_to(embedded)
    os.environ["QLORA_STUDIO_HOME"] = str(home)

    from qlora_studio.config import TrainConfig
    from qlora_studio.training import prepare_run, run_training

    results = {}
    for batching, seed in (("packed", 1), ("padded", 1), ("padded", 2), ("packed", 2)):
        cfg = TrainConfig(model="embedded", data=a.data, max_steps=a.steps, batch_size=a.batch_size, max_seq_len=256,
                          learning_rate=1e-3, rank=16, targets="all", lora_dropout=0.0, eval_fraction=0.0,
                          save_steps=10**9, seed=seed, batching=batching, task="sql",
                          name=f"{batching}-seed{seed}")
        run = prepare_run(cfg)
        status = run_training(run)
        if status["state"] != "completed":
            raise SystemExit(f"{run.path}: {status}")
        summary = run.summary()
        loss = held_out_loss(run, a.held_out)
        results[(batching, seed)] = (loss, summary["non_pad_tokens"], summary["tokens_per_s"])
        print(f"{batching:6s} seed {seed}: held-out loss {loss:.4f} after {a.steps} steps, "
              f"{summary['non_pad_tokens']} tokens, {summary['tokens_per_s']:.1f} tokens/s", flush=True)
    for seed in (1, 2):
        d = results[("packed", seed)][0] - results[("padded", seed)][0]
        print(f"seed {seed}: packed - padded = {d:+.4f}")
    noise = abs(results[("padded", 1)][0] - results[("padded", 2)][0])
    print(f"seed-to-seed gap (padded): {noise:.4f}; packed seed gap: "
          f"{abs(results[('packed', 1)][0] - results[('packed', 2)][0]):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
