"""4-bit weights kept decoded against decoded at each use, inside one training process, on the same batches.

    python benchmarks/decoded_ab.py                       # 64 alpaca rows, 8 samples of 4 batches each way
    python benchmarks/decoded_ab.py --samples 4 --levers-off   # on throughput.py's levers-off settings

A run of our trainer (the embedded model, throughput.py's recipe and data) trains as shipped until step 6;
the batches of steps 2-5 are kept. Then, in the same process, each sample trains those batches again
(forward, backward, no optimizer step) with the 4-bit layers' kept weights (`decoded.keep_decoded`) or
with bitsandbytes' forward, the two alternating (ABBA), the same seed before each batch. Printed: each
sample's seconds, the medians, the mean and standard error of the pairs' ratios (kept / each use), whether
every loss and the first batch's adapter gradients were bit for bit the same, and the load average.

Comparing inside one process leaves out what separate runs differ in (where the model lands in memory,
the machine's drift between runs), which on a 2-core VM is larger than this lever.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

VARIANTS = ("each use", "kept")


def _set(model, variant: str) -> None:
    from bitsandbytes.nn import Linear4bit

    from qlora_studio.decoded import keep_decoded

    if variant == "kept":
        keep_decoded(model)  # the kept matrices stay on the layers between samples: nothing is decoded again
        return
    for module in model.modules():
        if isinstance(module, Linear4bit) and "forward" in module.__dict__:
            del module.forward  # bitsandbytes' own forward again


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--samples", type=int, default=8, help="samples of each variant (alternating)")
    p.add_argument("--levers-off", action="store_true", help="throughput.py's 'ours, levers off' settings")
    a = p.parse_args()

    import torch
    import transformers

    import throughput

    batches, result = [], {}
    original = transformers.Trainer.training_step

    def step(self, model, inputs, *args, **kwargs):
        s = self.state.global_step
        if 2 <= s <= 5:
            batches.append(inputs)
        if s == 6:
            times = {v: [] for v in VARIANTS}
            losses = {v: [] for v in VARIANTS}
            grads = {}
            for r in range(a.samples):
                for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                    _set(model, v)
                    total = 0.0
                    for i, batch in enumerate(batches):
                        torch.manual_seed(r)
                        t = time.perf_counter()
                        loss = original(self, model, batch, *args, **kwargs)
                        total += time.perf_counter() - t
                        losses[v].append(float(loss))
                        if r == 0 and i == 0:
                            grads[v] = [q.grad.clone() for q in model.parameters() if q.grad is not None]
                        model.zero_grad(set_to_none=True)
                    times[v].append(total)
                print(f"sample {r + 1}: " + ", ".join(f"{v} {times[v][-1]:.2f} s" for v in VARIANTS)
                      + f"  (load {os.getloadavg()[0]:.2f})", flush=True)
            result.update(times=times, same_losses=losses["kept"] == losses["each use"],
                          same_grads=len(grads["kept"]) == len(grads["each use"]) > 0
                          and all(torch.equal(x, y) for x, y in zip(grads["kept"], grads["each use"])),
                          grads=len(grads["kept"]))
            self.control.should_training_stop = True
        return original(self, model, inputs, *args, **kwargs)

    transformers.Trainer.training_step = step
    work = Path(tempfile.mkdtemp(prefix="decoded-ab-"))
    os.environ["QLORA_STUDIO_HOME"] = str(work / "home")
    from qlora_studio.models import embedded_model_path

    model = embedded_model_path()
    data = work / "data.jsonl"
    throughput.make_data(data, a.examples, max_words=512, kind="alpaca")
    settings = argparse.Namespace(data="alpaca", batch_size=4, max_seq_len=512, warmup=2)
    overrides = dict(throughput.BASE_OURS) if a.levers_off else {}
    overrides["decoded_weights"] = True  # the run starts with them kept; the samples alternate
    print(f"load average before {os.getloadavg()[0]:.2f}; {a.examples} alpaca rows, batches of steps 2-5, "
          f"{a.samples} samples each way" + (", levers off" if a.levers_off else ""), flush=True)
    throughput.run_ours(settings, data, model, overrides)
    if not result:
        raise SystemExit("the run ended before step 6: give it more --examples")
    times = result["times"]
    ratios = [k / e for k, e in zip(times["kept"], times["each use"])]
    se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    med = {v: statistics.median(times[v]) for v in VARIANTS}
    print(f"medians: each use {med['each use']:.2f} s, kept {med['kept']:.2f} s")
    print(f"kept / each use: {statistics.mean(ratios):.3f} +- {se:.3f} (mean +- standard error of the pairs), "
          f"{sum(x < 1 for x in ratios)} of {len(ratios)} faster")
    print(f"losses bit for bit the same: {result['same_losses']}; the {result['grads']} adapter gradients of the "
          f"first batch bit for bit the same: {result['same_grads']}; load average after {os.getloadavg()[0]:.2f}")
    print(json.dumps({"ratios": ratios, **{k: v for k, v in result.items() if k != "grads"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
