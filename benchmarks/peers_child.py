"""One training run of `peers.py`, in the process (and the virtual environment) of the system it runs: ours,
TRL or LLaMA-Factory on the recipe below, with a probe patched into every Trainer the process builds that
counts each step's examples and tokens and times the epoch. Prints one ``RESULT {json}`` line.

    python benchmarks/peers_child.py '{"system": "ours", "model": ..., "train": ..., "out": ..., ...}'

`peers.py` writes the spec and starts this with each system's venv Python; see its docstring.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's qlora_studio (for ours)
RECIPE = dict(rank=16, alpha=32, dropout=0.05, lr=2e-4, warmup=0.05, epochs=1, batch=4, max_len=512, seed=42)


def _count(feature: dict, pad_id) -> tuple[int, int, int]:
    """(non-pad tokens, trained tokens, examples) of one collator input: a pad tail (pad ids without
    labels, as LLaMA-Factory's packed rows end) or attention-mask zeros are not counted."""
    ids, labels, mask = list(feature["input_ids"]), feature.get("labels"), feature.get("attention_mask")
    if mask is not None and 0 in list(mask):
        real = sum(1 for m in mask if m)
    else:
        real = len(ids)
        while real and ids[real - 1] == pad_id and (labels is None or labels[real - 1] == -100):
            real -= 1
    trained = real if labels is None else sum(1 for y in list(labels)[:real] if y != -100)
    if "seq_lengths" in feature:  # TRL's packed rows
        examples = len(feature["seq_lengths"])
    elif "position_ids" in feature:  # LLaMA-Factory's packed rows: positions restart at each example
        examples = sum(1 for p in list(feature["position_ids"])[:real] if p == 0)
    else:
        examples = 1
    return real, trained, examples


def install_probe(budget: float | None) -> dict:
    """Patch every Trainer this process builds: a counting collator and a timing callback. The
    dataloader fetches a batch ahead, so a step's totals are those after its own batches (``cum``)."""
    import transformers
    from transformers import TrainerCallback

    probe = {"records": [], "losses": [], "cum": []}
    counts = dict(tokens=0, trained=0, examples=0, rows=0, positions=0)

    class Counting:
        def __init__(self, inner, pad_id):
            self.inner, self.pad_id = inner, pad_id

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, features):
            for f in features:
                real, trained, examples = _count(f, self.pad_id)
                counts["tokens"] += real
                counts["trained"] += trained
                counts["examples"] += examples
            batch = self.inner(features)
            shape = batch["input_ids"].shape  # what the model computes: rows x width, padding included
            counts["rows"] += shape[0]
            counts["positions"] += shape[0] * shape[1]
            probe["cum"].append(dict(counts))
            return batch

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            probe["t0"] = time.time()
            probe["model"] = _describe_model(model, args)

        def on_step_end(self, args, state, control, **kw):
            now = time.time()
            done = probe["cum"][min(state.global_step * args.gradient_accumulation_steps, len(probe["cum"])) - 1]
            probe["records"].append({"step": state.global_step, "time": now, **done,
                                     "trainer_tokens": int(state.num_input_tokens_seen or 0)})
            if budget is not None and now - probe["t0"] >= budget:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                probe["losses"].append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kw):
            probe["t1"] = time.time()

    init = transformers.Trainer.__init__

    def patched(self, *a, **k):
        init(self, *a, **k)
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        self.data_collator = Counting(self.data_collator, getattr(tok, "pad_token_id", None))
        self.add_callback(Probe())

    transformers.Trainer.__init__ = patched
    return probe


def _describe_model(model, args) -> dict:
    qc = getattr(model.config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc or {})
    lora = [p for p in model.parameters() if p.requires_grad]
    short = lambda x: str(x).replace("torch.", "")  # noqa: E731
    return {"compute_dtype": short(qc.get("bnb_4bit_compute_dtype")), "quant_type": qc.get("bnb_4bit_quant_type"),
            "double_quant": qc.get("bnb_4bit_use_double_quant"), "lora_dtype": short(lora[0].dtype),
            "frozen_dtype": short(model.get_input_embeddings().weight.dtype),
            "autocast": "bf16" if args.bf16 else "fp16" if args.fp16 else None,
            "trainable_params": sum(p.numel() for p in lora), "attention": model.config._attn_implementation,
            "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
            "optim": str(args.optim).replace("OptimizerNames.", "").lower()}


def run_ours(spec: dict) -> dict:
    from qlora_studio.config import TrainConfig
    from qlora_studio.training import prepare_run, run_training

    r = RECIPE
    cfg = TrainConfig(model=spec["model"], data=spec["train"], data_format="alpaca", quant="nf4", rank=r["rank"],
                      alpha=r["alpha"], targets="all", lora_dropout=r["dropout"], learning_rate=r["lr"],
                      warmup_ratio=r["warmup"], epochs=r["epochs"], batch_size=r["batch"], max_seq_len=r["max_len"],
                      seed=r["seed"], eval_fraction=0.0, save_steps=10**9, max_steps=spec["max_steps"],
                      batch_unit="sequences" if spec["system"] == "ours-seq" else "examples")
    run = prepare_run(cfg)
    status = run_training(run, echo=False)
    if status["state"] != "completed":
        raise SystemExit(f"our run did not complete: {status}")
    plan = json.loads((run.path / "plan.json").read_text())["plan"]
    keys = ("precision", "batching", "batch_unit", "attention", "logits", "gradient_checkpointing", "optimizer",
            "targets", "decoded_weights", "dropout_masks", "cross_entropy", "lora_update")
    return {"adapter": str(run.adapter), "settings": {k: plan.get(k) for k in keys}}


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    r = RECIPE
    rows = [json.loads(line) for line in open(spec["train"], encoding="utf-8")]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": x["instruction"]}],
                               "completion": [{"role": "assistant", "content": x["output"]}]} for x in rows])
    fp32 = spec["peer_dtype"] == "fp32"  # else TRL's documented QLoRA defaults: bf16 compute and autocast
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32 if fp32 else torch.bfloat16)
    args = SFTConfig(output_dir=spec["out"], model_init_kwargs={"quantization_config": bnb, **(
                     {"dtype": torch.float32} if fp32 else {})}, **({"bf16": False} if fp32 else {}),
                     max_length=r["max_len"], packing=True, completion_only_loss=True, gradient_checkpointing=False,
                     use_cpu=True, per_device_train_batch_size=r["batch"], gradient_accumulation_steps=1,
                     learning_rate=r["lr"], lr_scheduler_type="cosine", warmup_steps=r["warmup"],
                     num_train_epochs=r["epochs"], max_steps=spec["max_steps"] or -1, optim="adamw_torch",
                     logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
                     seed=r["seed"], dataloader_num_workers=0, include_num_input_tokens_seen="non_padding")
    lora = LoraConfig(r=r["rank"], lora_alpha=r["alpha"], lora_dropout=r["dropout"], target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=spec["model"], args=args, train_dataset=data, peft_config=lora,
                         processing_class=AutoTokenizer.from_pretrained(spec["model"]))
    if spec["peer_dtype"] != "default":  # TRL casts a 4-bit model's LoRA weights to bf16 (not a setting);
        # back to fp32, as ours keeps them
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    trainer.train()
    trainer.save_model(str(Path(spec["out"]) / "adapter"))
    return {"adapter": str(Path(spec["out"]) / "adapter"), "settings": {
        "packing": args.packing_strategy, "padding_free": trainer.padding_free,
        "completion_only_loss": trainer.completion_only_loss, "peer_dtype": spec["peer_dtype"]}}


def lf_config(spec: dict, packing: bool) -> dict:
    r = RECIPE
    cfg = dict(model_name_or_path=spec["lf_model"], stage="sft", do_train=True, finetuning_type="lora",
               lora_rank=r["rank"], lora_alpha=r["alpha"], lora_dropout=r["dropout"], lora_target="all",
               quantization_bit=4, quantization_method="bnb", quantization_type="nf4", double_quantization=True,
               dataset="peers_train", dataset_dir=spec["lf_dir"], template="smollm2", cutoff_len=r["max_len"],
               packing=packing, overwrite_cache=True, output_dir=str(Path(spec["out"]) / "adapter"),
               per_device_train_batch_size=r["batch"], gradient_accumulation_steps=1, learning_rate=r["lr"],
               lr_scheduler_type="cosine", warmup_steps=r["warmup"], num_train_epochs=float(r["epochs"]),
               bf16=spec["peer_dtype"] == "bf16", use_cpu=True,  # transformers refuses bf16 on a CPU without use_cpu
               disable_gradient_checkpointing=True, optim="adamw_torch", logging_steps=1,
               save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, seed=r["seed"],
               dataloader_num_workers=0, plot_loss=False, include_num_input_tokens_seen="non_padding")
    if spec["max_steps"]:
        cfg["max_steps"] = spec["max_steps"]
    return cfg


def run_lf(spec: dict) -> dict:
    from llamafactory.train.tuner import run_exp

    cfg = lf_config(spec, packing=spec["system"] == "lf")
    (Path(spec["out"]) / "lf_config.json").write_text(json.dumps(cfg, indent=1))  # llamafactory-cli train <it>
    run_exp(args=cfg)
    return {"adapter": cfg["output_dir"], "settings": cfg}


def child(spec: dict) -> int:
    probe = install_probe(spec["budget"])
    run = {"ours": run_ours, "ours-seq": run_ours, "trl": run_trl}.get(spec["system"], run_lf)
    out = run(spec)
    recs = probe["records"]
    out |= {"epoch_s": probe["t1"] - probe["t0"], "records": [
        {**rec, "time": rec["time"] - probe["t0"]} for rec in recs], "losses": probe["losses"], "model": probe["model"]}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(child(json.loads(sys.argv[1])))
