"""One speed lever on and off, inside one training process, on the same batches.

    python benchmarks/lever_ab.py --lever decoded        # 64 alpaca rows, 8 samples of 4 batches each way
    python benchmarks/lever_ab.py --lever loss --samples 4 --levers-off   # on throughput.py's levers-off settings

Levers: ``decoded`` (the 4-bit weights kept decoded, `decoded.keep_decoded`, against bitsandbytes' decoding at
each use), ``loss`` (the chunked cross-entropy, `loss.causal_lm_loss`, against transformers'
``ForCausalLMLoss``) and ``fused`` (the LoRA update added in one matrix product, `lora_update.fused_forward`,
against peft's layer) and ``masks`` (LoRA dropout with 16-bit masks, `dropout.Dropout16`, against torch's
``nn.Dropout``).

A run of our trainer (the embedded model, throughput.py's recipe and data) trains as shipped until step 6;
the batches of steps 2-5 are kept. Then, in the same process, each sample trains those batches again
(forward, backward, no optimizer step) with the lever on or off, the two alternating (ABBA), the same seed
before each batch. Printed: each sample's seconds, the medians, the mean and standard error of the pairs'
ratios (on / off), how far the losses and the first batch's adapter gradients differ (bit for bit the same
for ``decoded``; rounding for ``loss`` and ``fused``), and the load average.

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

VARIANTS = ("off", "on")


def _decoded(model, on: bool) -> None:
    from bitsandbytes.nn import Linear4bit

    from qlora_studio.decoded import keep_decoded

    if on:
        keep_decoded(model)  # the kept matrices stay on the layers between samples: nothing is decoded again
        return
    for module in model.modules():
        if isinstance(module, Linear4bit) and "forward" in module.__dict__:
            del module.forward  # bitsandbytes' own forward again


def _loss(model, on: bool) -> None:
    from qlora_studio import loss

    if on:
        loss.install(model)
    else:
        loss.uninstall(model)


def _fused(model, on: bool) -> None:
    from qlora_studio import lora_update

    if on:
        lora_update.fuse(model)
    else:
        lora_update.unfuse(model)


def _masks(model, on: bool) -> None:
    import torch

    from qlora_studio.dropout import Dropout16, use_16bit_masks

    if on:
        use_16bit_masks(model)
        return
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in list(dropouts.items()):
                if isinstance(dropout, Dropout16):
                    dropouts[name] = torch.nn.Dropout(dropout.p)


# lever: (switch, the setting and value the run starts with; the samples then alternate)
LEVERS = {"decoded": (_decoded, ("decoded_weights", True)), "loss": (_loss, ("cross_entropy", "chunked")),
          "fused": (_fused, ("lora_update", "fused")), "masks": (_masks, ("dropout_masks", "16bit"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lever", choices=sorted(LEVERS), required=True)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--samples", type=int, default=8, help="samples of each variant (alternating)")
    p.add_argument("--levers-off", action="store_true", help="throughput.py's 'ours, levers off' settings")
    a = p.parse_args()

    import torch
    import transformers

    import throughput

    switch, setting = LEVERS[a.lever]
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
                    switch(model, v == "on")
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
            on, off = grads["on"], grads["off"]
            result.update(times=times, same_losses=losses["on"] == losses["off"],
                          loss_diff=max(abs(x - y) for x, y in zip(losses["on"], losses["off"])),
                          same_grads=len(on) == len(off) > 0 and all(torch.equal(x, y) for x, y in zip(on, off)),
                          grad_diff=max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))
                                        for x, y in zip(on, off)),
                          grads=len(on))
            self.control.should_training_stop = True
        return original(self, model, inputs, *args, **kwargs)

    transformers.Trainer.training_step = step
    work = Path(tempfile.mkdtemp(prefix="lever-ab-"))
    os.environ["QLORA_STUDIO_HOME"] = str(work / "home")
    from qlora_studio.models import embedded_model_path

    model = embedded_model_path()
    data = work / "data.jsonl"
    throughput.make_data(data, a.examples, max_words=512, kind="alpaca")
    settings = argparse.Namespace(data="alpaca", batch_size=4, max_seq_len=512, warmup=2)
    overrides = dict(throughput.BASE_OURS) if a.levers_off else {}
    overrides[setting[0]] = setting[1]  # the run starts with the lever on; the samples alternate
    print(f"lever {a.lever}; load average before {os.getloadavg()[0]:.2f}; {a.examples} alpaca rows, batches of steps 2-5, "
          f"{a.samples} samples each way" + (", levers off" if a.levers_off else ""), flush=True)
    throughput.run_ours(settings, data, model, overrides)
    if not result:
        raise SystemExit("the run ended before step 6: give it more --examples")
    times = result["times"]
    ratios = [k / e for k, e in zip(times["on"], times["off"])]
    se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    med = {v: statistics.median(times[v]) for v in VARIANTS}
    print(f"medians: off {med['off']:.2f} s, on {med['on']:.2f} s")
    print(f"on / off: {statistics.mean(ratios):.3f} +- {se:.3f} (mean +- standard error of the pairs), "
          f"{sum(x < 1 for x in ratios)} of {len(ratios)} faster")
    print(f"losses bit for bit the same: {result['same_losses']} (largest difference {result['loss_diff']:.3g}); "
          f"the {result['grads']} adapter gradients of the first batch bit for bit the same: {result['same_grads']} "
          f"(largest difference {result['grad_diff']:.3g} of the largest element); "
          f"load average after {os.getloadavg()[0]:.2f}")
    print(json.dumps({"ratios": ratios, **{k: v for k, v in result.items() if k != "grads"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
