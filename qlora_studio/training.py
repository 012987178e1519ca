"""QLoRA training: 4-bit base (bitsandbytes), LoRA adapters (peft), transformers' Trainer.

The pieces, in the order a run uses them:
1. `TrainConfig` -- every setting of a run, as plain values (presets and the UI fill it in).
2. `device_plan` -- CUDA or CPU, the compute dtype (bf16 only where the card has compute capability
   >= 8.0; fp16 below; bf16 autocast on the CPU) and the optimizer (paged 8-bit AdamW on CUDA).
3. `load_model_for_training` -- NF4/FP4 with double quantization, or plain 16-bit for quant=none.
   Frozen weights that are not quantized (embeddings, norms) stay in their 16-bit dtype: we do not
   call peft's `prepare_model_for_kbit_training`, whose fp32 up-cast of every such weight costs
   ~2 GB on 7-8B models and buys nothing with autocast. The adapters are kept in fp32 (peft's
   default) and run under bf16/fp16 autocast.
4. `auto_lora` -- rank, alpha (= 2 x rank) and target modules from the architecture, size and task.
5. `speed_plan` / `PackedBatches` -- gradient checkpointing (off on a CPU with RAM to spare), the
   attention implementation, and padding-free packed batches where `packing_respected` shows the
   attention keeps packed examples apart (benchmarks/throughput.py measures each against the usual
   recipe).
6. `run_training` -- Trainer + `StudioCallback`, which writes metrics, honours a stop request,
   and keeps the run folder's status true.

Troubleshooting acts inside the run (the findings themselves come from `diagnose`):
- out of memory: caught, memory released, and -- up to ``oom_retries`` times -- retried from the
  last checkpoint with half the micro-batch and twice the gradient accumulation (the same effective
  batch); each recovery is written to train.log and to status.json's ``recoveries``. When it cannot
  recover, the run fails with ``error_kind: "oom"`` and keeps its checkpoints.
- NaN/inf loss or grad norm: the callback stops the run at once without saving the poisoned state;
  checkpoints saved after the last good step are set aside, the last good checkpoint's adapter
  becomes the run's adapter, and the run fails with ``error_kind: "nonfinite"``.
- a fix applied to a run (`prepare_fix_run`) starts a new run from a checkpoint's adapter weights
  (``init_adapter``) with a fresh optimizer and schedule.
"""

from __future__ import annotations

import math
import os
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .runs import RunFolder, read_metrics_from, atomic_write_json

ATTENTION_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn",
                     "Wqkv", "out_proj", "query", "key", "value", "dense"}
MLP_MODULES = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3",
               "dense_h_to_4h", "dense_4h_to_h", "c_proj"}
# Tasks that change the output format or need reasoning benefit from adapting the MLPs too.
FORMAT_TASKS = {"sql", "code", "json", "reasoning", "math", "format"}


class TrainingError(Exception):
    """A run could not be set up; the message says why (and ``field`` which setting, if one)."""

    def __init__(self, message: str, field: str | None = None, why: str | None = None):
        super().__init__(message)
        self.field = field
        self.why = why or message


@dataclass
class TrainConfig:
    model: str = "embedded"
    data: str = ""
    task: str | None = None  # e.g. "sql": enables task evaluation and informs auto LoRA
    test_data: str | None = None  # held-out file for task evaluation (not used in training)
    data_format: str | None = None  # auto-detected when None
    quant: str = "nf4"  # nf4 | fp4 | none
    double_quant: bool = True
    rank: int | None = None  # auto when None
    alpha: int | None = None  # 2 x rank when None
    targets: str | list[str] | None = None  # attention | all | [names]; auto when None
    lora_dropout: float = 0.05
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int = 512
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.1
    eval_steps: int | None = None  # about 5 evaluations per run when None
    save_steps: int | None = None  # with each evaluation when None
    logging_steps: int = 1
    # None: decided per run by `speed_plan` (on where memory is tight, off on a CPU with RAM to spare)
    gradient_checkpointing: bool | None = None
    # How a step's examples become a batch. packed: concatenated in one row, position ids restarting per
    # example (no padding at all; used only where the model's attention is checked to keep examples
    # apart, else grouped); grouped: padded, examples of similar length together; padded: padded,
    # random order. None: packed.
    batching: str | None = None
    attention: str | None = None  # sdpa | eager; None: the faster one for the device (see `speed_plan`)
    optimizer: str | None = None  # paged_adamw_8bit on CUDA, adamw_torch on the CPU when None
    seed: int = 42
    trust_remote_code: bool = False
    device: str | None = None  # cuda | cpu; auto when None
    name: str | None = None  # run folder name; generated when None
    oom_retries: int = 3  # automatic out-of-memory recoveries: half the micro-batch, twice the accumulation
    init_adapter: str | None = None  # start from these LoRA weights (a checkpoint of an earlier run)
    init_step: int = 0  # the earlier run's step those weights come from (for the record)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        types = {f.name: f.type for f in fields(cls)}
        for key in d:
            if key not in types:
                why = f"unknown setting; known settings: {', '.join(sorted(types))}"
                raise TrainingError(f"{source}: {key}: {why}", key, why)
        d = dict(d)
        for key, value in d.items():  # YAML reads 2e-4 as text; accept numbers written as text
            if isinstance(value, str) and types[key] in ("float", "float | None"):
                try:
                    d[key] = float(value)
                except ValueError:
                    why = f"expected a number, got {value!r}"
                    raise TrainingError(f"{source}: {key}: {why}", key, why) from None
        cfg = cls(**d)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        def bad(name, why):
            raise TrainingError(f"{source}: {name}: {why}", name, why)

        if self.quant not in ("nf4", "fp4", "none"):
            bad("quant", f"{self.quant!r} is not one of nf4, fp4, none")
        if not self.data:
            bad("data", "no training data file given")
        for name in ("batch_size", "grad_accum", "max_seq_len", "logging_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, f"must be a whole number >= 1, got {v!r}")
        for name in ("oom_retries", "init_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, f"must be a whole number >= 0, got {v!r}")
        if self.init_adapter is not None and not (Path(self.init_adapter) / "adapter_model.safetensors").is_file():
            bad("init_adapter", f"{self.init_adapter}: no adapter_model.safetensors there")
        if self.rank is not None and (not isinstance(self.rank, int) or not 1 <= self.rank <= 1024):
            bad("rank", f"must be a whole number from 1 to 1024, got {self.rank!r}")
        for name in ("learning_rate", "epochs", "eval_fraction", "warmup_ratio", "lora_dropout", "weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                bad(name, f"expected a number, got {v!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool)):
            bad("max_steps", f"must be a whole number, got {self.max_steps!r}")
        if not (0 < self.learning_rate < 1):
            bad("learning_rate", f"must be between 0 and 1, got {self.learning_rate!r}")
        if not 0 <= self.eval_fraction < 1:
            bad("eval_fraction", f"must be in [0, 1), got {self.eval_fraction!r}")
        # 0 steps is allowed for a run that starts from an adapter: it evaluates and keeps that adapter.
        if self.max_steps is not None and self.max_steps < (0 if self.init_adapter else 1):
            bad("max_steps", f"must be >= 1, got {self.max_steps!r}")
        if self.epochs <= 0:
            bad("epochs", f"must be > 0, got {self.epochs!r}")
        if isinstance(self.targets, str) and self.targets not in ("attention", "all"):
            bad("targets", f"{self.targets!r} is not attention, all, or a list of module names")
        if self.device not in (None, "cuda", "cpu"):
            bad("device", f"{self.device!r} is not cuda or cpu")
        if self.attention not in (None, "sdpa", "eager"):
            bad("attention", f"{self.attention!r} is not sdpa or eager (or empty for automatic)")
        if self.batching not in (None, "packed", "grouped", "padded"):
            bad("batching", f"{self.batching!r} is not packed, grouped or padded (or empty for automatic)")
        if not isinstance(self.double_quant, bool):
            bad("double_quant", f"must be true or false, got {self.double_quant!r}")
        if self.gradient_checkpointing is not None and not isinstance(self.gradient_checkpointing, bool):
            bad("gradient_checkpointing", f"must be true, false or empty (automatic), got {self.gradient_checkpointing!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ device


@dataclass
class DevicePlan:
    device: str  # cuda | cpu
    compute_dtype: str  # bfloat16 | float16
    optimizer: str
    reason: str


def device_plan(cfg: TrainConfig) -> DevicePlan:
    import torch

    use_cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device: cuda was asked for, but torch sees no CUDA GPU (is a CUDA build of torch installed?)")
    if use_cuda:
        major, minor = torch.cuda.get_device_capability(0)
        # Turing and older have no native bf16 (torch.cuda.is_bf16_supported() reports emulation).
        bf16 = (major, minor) >= (8, 0)
        return DevicePlan("cuda", "bfloat16" if bf16 else "float16", cfg.optimizer or "paged_adamw_8bit",
                          f"{torch.cuda.get_device_name(0)} (compute capability {major}.{minor}): "
                          + ("bf16" if bf16 else "no native bf16, fp16 with loss scaling"))
    return DevicePlan("cpu", "bfloat16", cfg.optimizer or "adamw_torch", "no CUDA GPU: CPU with bf16 autocast")


# ------------------------------------------------------------------ model


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers LoRA could adapt (the output head excluded)."""
    import torch

    names = set()
    for full, module in model.named_modules():
        leaf = full.rsplit(".", 1)[-1]
        if leaf in ("lm_head", "embed_out", "output", "score", "classifier"):
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(leaf)
    return sorted(names)


def count_parameters(model) -> int:
    """Parameters of the base model, counting packed 4-bit weights at their real size."""
    total, seen = 0, set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights (lm_head = embeddings) count once
                continue
            seen.add(id(p))
            if type(module).__name__ == "Linear4bit" and name == "weight":
                total += module.in_features * module.out_features
            else:
                total += p.numel()
    return total


def auto_lora(module_names: list[str], n_params: int, task: str | None, cfg: TrainConfig) -> dict:
    """Rank, alpha and target modules: overrides from cfg, otherwise chosen by size and task.

    - Targets: attention projections by default; MLP projections too for models under 3B parameters
      (cheap, and small models need the capacity) and for format-shifting tasks (SQL, code, JSON).
    - Rank: 16 for most; 8 for attention-only on models of 13B and more (big models adapt with little);
      32 for format tasks on models of 13B and more.
    """
    attn = [n for n in module_names if n in ATTENTION_MODULES]
    mlp = [n for n in module_names if n in MLP_MODULES]
    if not attn:  # unknown architecture: adapt every linear layer
        attn, mlp = module_names, []
    format_task = (task or "").lower() in FORMAT_TASKS
    why = []
    if cfg.targets is None:
        use_all = n_params < 3e9 or format_task
        targets = attn + mlp if use_all else attn
        why.append("attention + MLP projections" + (" (model under 3B)" if n_params < 3e9 else f" ({task} task)")
                   if use_all else "attention projections")
    elif cfg.targets == "all":
        targets = attn + mlp
    elif cfg.targets == "attention":
        targets = attn
    else:
        missing = [t for t in cfg.targets if t not in module_names]
        if missing:
            raise TrainingError(f"targets: {missing} are not linear layers of this model; it has {module_names}")
        targets = list(cfg.targets)
    if cfg.rank is None:
        if n_params >= 13e9:
            rank = 32 if format_task else 8
        else:
            rank = 16
        why.append(f"rank {rank} for a {n_params / 1e9:.2f}B model")
    else:
        rank = cfg.rank
    alpha = cfg.alpha or 2 * rank
    return {"rank": rank, "alpha": alpha, "targets": sorted(targets), "why": "; ".join(why)}


def keep_4bit_weights_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On CPUs with AVX512-BF16, the first eval-mode forward without grad (an evaluation pass, or
    generate()) repacks a Linear4bit weight in place; from then on its matmul carries no gradient to
    the layer input, and training learns almost nothing. A model we train must never repack, and a
    weight already repacked is turned back. Returns how many layers were turned back.
    """
    restored = 0
    for module in model.modules():
        if type(module).__name__ not in ("Linear4bit", "LinearNF4", "LinearFP4"):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
            restored += 1
    return restored


# ------------------------------------------------------------------ speed


@dataclass
class SpeedPlan:
    gradient_checkpointing: bool
    attention: str  # sdpa | eager
    why: str


# benchmarks/throughput.py measured both on the CPU (bf16 autocast, the embedded model): eager attention
# was faster there (the CPU's fused SDPA kernel is slow in its backward pass); on CUDA SDPA wins.
AUTO_ATTENTION = {"cpu": "eager", "cuda": "sdpa"}


def speed_plan(cfg: TrainConfig, plan: DevicePlan, arch=None, lora: dict | None = None) -> SpeedPlan:
    """Gradient checkpointing and the attention implementation for a run.

    Checkpointing recomputes each layer's forward pass in the backward pass (about a third more
    compute) to keep activations small. On a GPU memory is the limit, so it stays on unless the user
    turns it off; on the CPU it is turned off when the memory estimate without it (``arch``, a
    `catalog.Architecture`) fits in half of the RAM that is free now."""
    attention = cfg.attention or AUTO_ATTENTION.get(plan.device, "sdpa")
    if cfg.gradient_checkpointing is not None:
        return SpeedPlan(cfg.gradient_checkpointing, attention, "as configured")
    if plan.device == "cuda":
        return SpeedPlan(True, attention, "on: GPU memory is the limit")
    from .hardware import ram_bytes

    _, available = ram_bytes()
    need = None
    if arch is not None:
        try:
            need = run_estimate(cfg, arch, lora, plan, grad_checkpointing=False).total_bytes
        except Exception:  # an architecture the estimator cannot size
            need = None
    if need is None or not available:
        return SpeedPlan(True, attention, "on: cannot tell whether the run fits in RAM without it")
    gib = 2 ** 30
    if need <= available / 2:
        return SpeedPlan(False, attention, f"off: about {need / gib:.1f} GiB needed without it, "
                                           f"{available / gib:.1f} GiB of RAM free")
    return SpeedPlan(True, attention, f"on: about {need / gib:.1f} GiB needed without it, "
                                      f"only {available / gib:.1f} GiB of RAM free")


class PackedBatches:
    """Collates a step's examples into rows without padding between them.

    Each example's position ids restart at 0, which is how the attention (checked by
    `packing_respected`) tells them apart. How many rows: attention makes a token's cost grow with the
    length of its row, so one long row of the whole batch is not always cheapest. For row capacities
    from the longest example up to the whole batch (doubling), examples are placed first-fit, longest
    first, and the layout with the lowest ``rows x width x (1 + width / attention_span)`` wins.
    ``attention_span`` is the row length at which attention costs as much per token as the rest of the
    model: about 2.2 x hidden size measured on the CPU (eager attention, bf16; one 750-token row of
    eight SQL examples ran 9% slower than padding them), 6 x hidden size by counting FLOPs for a GPU.
    The end of a shorter row is filled with pad tokens forming a sequence of their own, with no labels;
    ``attention_mask`` marks the real tokens for counting only (`StudioTrainer` takes it out before
    the model sees it, so the packed positions decide the attention)."""

    def __init__(self, pad_id: int, attention_span: float):
        self.pad_id = pad_id
        self.attention_span = attention_span

    @staticmethod
    def _first_fit(lengths: list[int], cap: int) -> tuple[list[list[int]], int]:
        bins: list[list[int]] = []
        loads: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            for b, load in enumerate(loads):
                if load + lengths[i] <= cap:
                    bins[b].append(i)
                    loads[b] += lengths[i]
                    break
            else:
                bins.append([i])
                loads.append(lengths[i])
        return [sorted(b) for b in bins], max(loads)

    def rows(self, lengths: list[int]) -> list[list[int]]:
        total, cap = sum(lengths), max(lengths)
        best = None
        while True:
            bins, width = self._first_fit(lengths, cap)
            cost = len(bins) * width * (1 + width / self.attention_span)
            if best is None or cost < best[0]:
                best = (cost, bins)
            if cap >= total:
                return best[1]
            cap = min(total, cap * 2)

    def __call__(self, features: list[dict]) -> dict:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        rows = self.rows(lengths)
        width = max(sum(lengths[i] for i in row) for row in rows)
        out = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
        for row in rows:
            ids, labels, pos, real = [], [], [], []
            for i in row:
                x = list(features[i]["input_ids"])
                y = list(features[i].get("labels", x))
                ids += x
                labels += [-100] + y[1:]
                pos += range(len(x))
                real += [1] * len(x)
            fill = width - len(ids)
            ids += [self.pad_id] * fill
            labels += [-100] * fill
            pos += range(fill)
            real += [0] * fill
            for key, values in zip(("input_ids", "labels", "position_ids", "attention_mask"), (ids, labels, pos, real)):
                out[key].append(values)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def _studio_trainer_class():
    from transformers import Trainer

    class StudioTrainer(Trainer):
        """The Trainer, except that a packed batch's ``attention_mask`` (real tokens, for the token
        count) is taken out before the model sees it: packed rows are told apart by their position ids."""

        packed = False

        def compute_loss(self, model, inputs, *args, **kwargs):
            if self.packed and "position_ids" in inputs:
                inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
            return super().compute_loss(model, inputs, *args, **kwargs)

    return StudioTrainer


def run_estimate(cfg: TrainConfig, arch, lora: dict | None, plan: DevicePlan, grad_checkpointing: bool):
    """The memory estimator's figure for this run's settings (``arch``: a `catalog.Architecture`)."""
    from .estimator import estimate

    targets = "attention" if lora and set(lora["targets"]) <= ATTENTION_MODULES else "all"
    return estimate(arch, method="qlora" if cfg.quant != "none" else "lora",
                    quant=None if cfg.quant == "none" else cfg.quant, double_quant=cfg.double_quant,
                    rank=(lora or {}).get("rank") or cfg.rank or 16, targets=targets, batch=cfg.batch_size,
                    seq=cfg.max_seq_len, grad_checkpointing=grad_checkpointing, optimizer=plan.optimizer,
                    compute_dtype="bf16" if plan.compute_dtype == "bfloat16" else "fp16")


def packing_respected(model) -> tuple[bool, str]:
    """Whether this model's attention keeps packed examples apart (position ids restarting per example).

    Two short sequences go through the model separately and packed in one row. If the packed row's
    second half matches the separate run far better than a row whose positions run on (attention
    crossing the boundary), the attention respects the packing."""
    import torch

    vocab = getattr(model.config, "vocab_size", 1000)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(10, vocab - 1, (1, 12), generator=g)
    b = torch.randint(10, vocab - 1, (1, 9), generator=g)
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    a, b = a.to(device), b.to(device)
    row = torch.cat([a, b], dim=1)
    packed_pos = torch.cat([torch.arange(12), torch.arange(9)]).unsqueeze(0).to(device)
    running_pos = torch.arange(21).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=b, use_cache=False).logits.float()
            packed = model(input_ids=row, position_ids=packed_pos, use_cache=False).logits[:, 12:].float()
            crossing = model(input_ids=row, position_ids=running_pos, use_cache=False).logits[:, 12:].float()
    except Exception as e:  # a model that does not take position ids
        return False, f"the model failed on a packed row ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
    err = (packed - alone).abs().max().item()
    leak = (crossing - alone).abs().max().item()
    if leak > 0 and err < 0.05 * leak:
        return True, f"packed logits match separate ones (max diff {err:.3g} vs {leak:.3g} when attention crosses)"
    return False, (f"{model.config._attn_implementation} attention does not keep packed examples apart "
                   f"(max diff {err:.3g} vs {leak:.3g} when attention crosses)")


def load_base_model(path: str | Path, quant: str, compute_dtype: str, device: str, double_quant: bool = True,
                    trust_remote_code: bool = False, attention: str | None = None):
    """The base model: 4-bit (NF4/FP4, double quant) or 16-bit, on the chosen device."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, compute_dtype)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attention:
        kwargs["attn_implementation"] = attention
    if quant in ("nf4", "fp4"):
        # Explicit on purpose: BitsAndBytesConfig defaults to FP4, no double quant, fp32 compute.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype)
    if device == "cuda":
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from .data import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    ensure_chat_template(tok)
    return tok


# ------------------------------------------------------------------ callback


def _peak_memory_mb(device: str) -> dict:
    if device == "cuda":
        import torch

        return {"memory_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
                "memory_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
    try:  # the process's peak resident memory (Linux)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return {"memory_rss_mb": int(line.split()[1]) / 1024}
    except OSError:
        pass
    return {}


def _make_callback_class():
    from transformers import TrainerCallback

    class StudioCallback(TrainerCallback):
        """Writes metrics.jsonl, honours stop requests, keeps status.json current, and feeds each
        record to a `Diagnoser`: its findings go to train.log, and a NaN/inf stops the run at once
        without evaluating or saving the poisoned state (``self.nonfinite`` holds that finding)."""

        def __init__(self, run: RunFolder, stop_event: threading.Event, device: str, log=print, diagnoser=None):
            self.run = run
            self.stop_event = stop_event
            self.device = device
            self.log = log
            self.diagnoser = diagnoser
            self.last_time = None
            self.last_tokens = 0
            self.stopped = False
            self.nonfinite = None
            self.start_time = None

        def on_train_begin(self, args, state, control, **kw):
            self.last_time = self.start_time = time.time()
            self.last_tokens = state.num_input_tokens_seen
            self.run.set_status("running", max_steps=state.max_steps, step=state.global_step,
                                started_at=self.run.status().get("started_at") or time.time())

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            now = time.time()
            rec = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": now}
            if "eval_loss" in logs:
                rec["type"] = "eval"
                rec.update({k: v for k, v in logs.items() if k.startswith("eval_")})
            elif "loss" in logs:
                rec["type"] = "train"
                rec["loss"] = logs["loss"]
                rec["lr"] = logs.get("learning_rate")
                rec["grad_norm"] = logs.get("grad_norm")
                tokens = state.num_input_tokens_seen
                dt = now - (self.last_time or now)
                rec["tokens"] = tokens
                rec["tokens_per_s"] = (tokens - self.last_tokens) / dt if dt > 0 else None
                rec.update(_peak_memory_mb(self.device))
                self.last_time, self.last_tokens = now, tokens
            else:
                return
            self.run.append_metrics(rec)
            if rec["type"] == "train":
                self.log(f"step {rec['step']}/{state.max_steps} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                         f"grad_norm {rec['grad_norm'] if rec['grad_norm'] is None else round(rec['grad_norm'], 3)} "
                         f"tok/s {rec['tokens_per_s'] or 0:.0f}")
            else:
                self.log(f"eval at step {rec['step']}: eval_loss {rec['eval_loss']:.4f}")
            if self.diagnoser is None:
                return
            for finding in self.diagnoser.add(rec):
                _log_finding(self.log, finding)
            if self.diagnoser.stop_reason is not None and self.nonfinite is None:
                self.nonfinite = self.diagnoser.stop_reason
                control.should_training_stop = True
                control.should_save = False  # the weights after this step are not worth keeping
                control.should_evaluate = False
                self.log(f"stopping at step {state.global_step}: non-finite values; nothing more is saved")

        def on_step_end(self, args, state, control, **kw):
            if self.stop_event.is_set() and not self.stopped:
                self.stopped = True
                control.should_training_stop = True
                control.should_save = True
                self.log(f"stop requested: saving a checkpoint at step {state.global_step}")
            return control

    return StudioCallback


def _log_finding(log, finding) -> None:
    log(f"finding ({finding.severity}) {finding.kind} at step {finding.step}: {finding.message}")
    for i, fix in enumerate(finding.fixes, 1):
        log(f"  fix {i}: {fix.title}" + (f" {fix.changes}" if fix.changes else ""))


# ------------------------------------------------------------------ the run


def _run_log(run: RunFolder, echo: bool):
    path = run.path / "train.log"

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if echo:
            print(line, flush=True)

    return log


def _truncate_metrics_after(run: RunFolder, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint we go back to."""
    records, _ = read_metrics_from(run.metrics_path)
    kept = [r for r in records if r.get("step", 0) <= step]
    tmp = run.metrics_path.with_suffix(".tmp")
    import json

    with open(tmp, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run.metrics_path)


def prepare_run(cfg: TrainConfig, name: str | None = None) -> RunFolder:
    """Create the run folder and write its resolved configuration (before anything heavy runs)."""
    from .data import file_sha256
    from .runs import new_run_dir

    data_path = Path(cfg.data).expanduser()
    if not data_path.is_file():
        raise TrainingError(f"data: {cfg.data}: no such file")
    run = RunFolder(new_run_dir(cfg.model, cfg.data, name or cfg.name))
    resolved = cfg.to_dict()
    resolved["data"] = str(data_path.resolve())
    if cfg.test_data:
        resolved["test_data"] = str(Path(cfg.test_data).expanduser().resolve())
    resolved["data_sha256"] = file_sha256(data_path)
    run.write_config(resolved)
    run.set_status("running", created_at=time.time(), phase="queued")
    return run


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _release_memory(device: str | None) -> None:
    """Free what a failed attempt left behind (its frames are gone once the exception is)."""
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _last_logged_step(run: RunFolder) -> int:
    records, _ = read_metrics_from(run.metrics_path)
    steps = [r.get("step", 0) for r in records if r.get("type") == "train"]
    return max(steps) if steps else 0


def _recover_from_oom(run: RunFolder, cfg: TrainConfig, error: str, log) -> dict:
    """Halve the micro-batch, double the accumulation (the effective batch stays), note it in
    config.json, status.json (``recoveries``) and train.log; the caller retries from the last
    checkpoint, or from the start if there is none."""
    step = _last_logged_step(run) + 1  # the step that was being computed
    b, ga = cfg.batch_size, cfg.grad_accum
    nb, nga = max(1, b // 2), ga * 2 if b > 1 else ga
    stored = run.config()
    stored.update(batch_size=nb, grad_accum=nga)
    run.write_config(stored)
    ckpt = run.last_checkpoint()
    recovery = {"step": step, "error": error, "batch_size": [b, nb], "grad_accum": [ga, nga],
                "resumed_from": ckpt.name if ckpt else None, "time": time.time()}
    recoveries = (run.status().get("recoveries") or []) + [recovery]
    run.set_status("running", phase="recovering from out of memory", recoveries=recoveries)
    log(f"out of memory at step {step}: recovering automatically ({len(recoveries)} of {cfg.oom_retries}): "
        f"micro-batch {b} -> {nb}, gradient accumulation {ga} -> {nga} (effective batch {b * ga} -> {nb * nga}); "
        + (f"continuing from {ckpt.name}" if ckpt else "no checkpoint yet, starting over"))
    if ckpt is None:
        _truncate_metrics_after(run, 0)
    return recovery


LAYOUT_SETTINGS = ("model", "rank", "alpha", "targets", "task", "trust_remote_code")


def prepare_fix_run(parent, fix, reason: str = "", name: str | None = None) -> RunFolder:
    """A new run folder for "apply and restart": the parent's settings with the fix's changes.

    It starts from the adapter weights of the parent's newest good checkpoint at or before
    ``fix.from_step`` (None: the newest good one; 0, none there, or a change of model or LoRA layout:
    from scratch), copied into the new folder's ``init_adapter/``. It trains what is left of the
    parent's schedule (in the new effective batch), or -- when nothing is left and the fix does not
    set the length itself -- the parent's whole length again from those weights. config.json records
    ``parent_run``, ``changes``, ``reason``, ``fix`` and ``init_checkpoint``.
    """
    import shutil

    from .diagnose import Fix
    from .home import runs_dir
    from .runs import resolve_run

    parent = parent if isinstance(parent, RunFolder) else RunFolder(resolve_run(parent))
    fix = Fix.from_dict(fix) if isinstance(fix, dict) else fix
    if not fix.changes:
        raise TrainingError(f"'{fix.title}' is advice: there is no setting to change")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(k for k in fix.changes if k not in known)
    if unknown:
        raise TrainingError(f"the fix changes unknown settings {unknown}")
    old = parent.config()
    settings = {k: v for k, v in old.items() if k in known}
    settings.update(fix.changes)
    settings.update(name=None, init_adapter=None, init_step=0)

    ckpt = None
    if fix.from_step != 0 and not any(k in fix.changes for k in LAYOUT_SETTINGS):
        good = good_checkpoints(parent, fix.from_step)
        ckpt = good[-1] if good else None
    init_step = int(ckpt.name.rsplit("-", 1)[-1]) if ckpt else 0

    # How long the new run trains: what the parent had left, counted in the new effective batch.
    ratio = (old.get("batch_size", 4) * old.get("grad_accum", 1)) / (settings["batch_size"] * settings["grad_accum"])
    sets_length = "max_steps" in fix.changes or "epochs" in fix.changes
    if ckpt is not None:
        if settings.get("max_steps") is not None:
            left = round((settings["max_steps"] - init_step) * ratio)
            settings["max_steps"] = max(0, left) if (left > 0 or sets_length) else round(old["max_steps"] * ratio)
        else:
            total = old.get("total_steps") or 0
            done = init_step / total * float(old.get("epochs", 1.0)) if total else 0.0
            left = round(float(settings["epochs"]) - done, 4)
            if left > 0:
                settings["epochs"] = left
            elif sets_length:
                settings["max_steps"] = 0
            # else: the whole length again from these weights
        settings["init_adapter"] = str(ckpt)  # checked by validation; the copy below replaces it
        settings["init_step"] = init_step

    cfg = TrainConfig.from_dict(settings, source=f"fix '{fix.title}'")
    if name is None:  # <parent>-fix1, -fix2, ...
        i = 1
        while (runs_dir() / f"{parent.name[:90]}-fix{i}").exists():
            i += 1
        name = f"{parent.name[:90]}-fix{i}"
    child = prepare_run(cfg, name)
    config = child.config()
    if ckpt is not None:
        dest = child.path / "init_adapter"
        dest.mkdir()
        for f in ckpt.iterdir():
            if f.is_file() and f.name.startswith("adapter_"):
                shutil.copy2(f, dest / f.name)
        config["init_adapter"] = str(dest)
    config.update(parent_run=str(parent.path), changes=dict(fix.changes), reason=reason, fix=fix.to_dict(),
                  init_checkpoint=str(ckpt) if ckpt else None)
    child.write_config(config)
    return child


def run_training(run: RunFolder, stop_event: threading.Event | None = None, resume: bool = False,
                 echo: bool = False, extra_callbacks: list | None = None) -> dict:
    """Train the run described by ``run/config.json``; returns the final status.

    Never raises for a failed run: the failure is recorded in status.json (and the traceback in
    train.log), so the caller -- a UI thread or the CLI -- survives it. An out-of-memory error
    during training is retried (see `_recover_from_oom`) up to ``oom_retries`` times.
    ``extra_callbacks``: more `TrainerCallback`s for the Trainer (tests inject faults with them).
    """
    stop_event = stop_event or threading.Event()
    log = _run_log(run, echo)
    recovered = 0
    while True:
        plan = cfg = None
        try:
            stored = run.config()
            cfg_dict = {k: v for k, v in stored.items() if k in {f.name for f in fields(TrainConfig)}}
            cfg = TrainConfig.from_dict(cfg_dict, source=str(run.path / "config.json"))
            plan = device_plan(cfg)
            run.set_status("running", phase="loading model", device=plan.device)
            return _train(run, cfg, plan, stored, stop_event, resume, log, list(extra_callbacks or []))
        except Exception as e:  # recorded, not raised: the app and other runs must survive it
            oom = _is_oom(e)
            msg = f"{type(e).__name__}: {e}"
            kind = "oom" if oom else type(e).__name__
            log(("OUT OF MEMORY: " if oom else "FAILED: ") + msg)
            log(traceback.format_exc())
            phase = run.status().get("phase")
        _release_memory(plan.device if plan else None)  # outside the except block: the traceback is gone
        can_retry = (oom and cfg is not None and phase == "training" and recovered < cfg.oom_retries
                     and cfg.batch_size > 1 and not stop_event.is_set())
        if not can_retry:
            if oom and cfg is not None and cfg.batch_size == 1 and phase == "training":
                log("out of memory with a micro-batch of 1: no automatic recovery left; see the fixes "
                    "(`qlora-studio diagnose`)")
            ckpt = run.last_checkpoint()
            done = _last_logged_step(run)
            return run.set_status("failed", error=msg, error_kind=kind, finished_at=time.time(), phase="failed",
                                  step=done, error_step=done + 1 if phase == "training" else 0,
                                  last_checkpoint=ckpt.name if ckpt else None)
        recovered += 1
        resume = _recover_from_oom(run, cfg, msg, log)["resumed_from"] is not None


def _load_init_adapter(model, path: str, log) -> None:
    """Start from an earlier run's LoRA weights (same rank and targets)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(path) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise TrainingError(f"init_adapter: {path} does not fit this model's LoRA layers "
                            f"(e.g. {unexpected[0]}); start from scratch instead", "init_adapter")
    log(f"starting from the adapter weights in {path} ({len(state)} tensors); "
        "the optimizer and the learning-rate schedule start fresh because settings changed")


def _adapter_is_finite(folder: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(folder / "adapter_model.safetensors"))
    except Exception:
        return False
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def good_checkpoints(run: RunFolder, at_or_before: int | None = None) -> list[Path]:
    """Checkpoints of a run (oldest first) at or before a step, whose adapter weights are all finite."""
    if not run.checkpoints.is_dir():
        return []
    found = []
    for p in run.checkpoints.iterdir():
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name.rsplit("-", 1)[-1].isdigit():
            step = int(p.name.rsplit("-", 1)[-1])
            complete = (p / "trainer_state.json").is_file()  # a save cut short by a kill is not a checkpoint
            if (at_or_before is None or step <= at_or_before) and complete and _adapter_is_finite(p):
                found.append((step, p))
    return [p for _, p in sorted(found)]


def _roll_back_nonfinite(run: RunFolder, finding, log) -> Path | None:
    """After a NaN/inf: checkpoints saved after the last good step are set aside (renamed
    ``nonfinite-checkpoint-N``, so resume never picks them), and the last good checkpoint's adapter
    becomes the run's adapter. Returns that checkpoint (None: no good one, the fix starts over)."""
    import shutil

    good_step = finding.details.get("last_good_step", 0)
    if run.checkpoints.is_dir():
        for p in list(run.checkpoints.iterdir()):
            if p.name.startswith("checkpoint-") and p.name.rsplit("-", 1)[-1].isdigit() and int(p.name.rsplit("-", 1)[-1]) > good_step:
                p.rename(p.with_name("nonfinite-" + p.name))
                log(f"set aside {p.name}: saved after the last good step {good_step}")
    good = good_checkpoints(run, good_step)
    if run.adapter.exists():
        shutil.rmtree(run.adapter)
    if not good:
        log("no checkpoint from before the non-finite values: a fix starts from scratch")
        return None
    run.adapter.mkdir(parents=True)
    for f in good[-1].iterdir():
        if f.is_file() and (f.name.startswith("adapter_") or f.name.startswith("tokenizer") or f.name in (
                "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")):
            shutil.copy2(f, run.adapter / f.name)
    log(f"rolled back: the run's adapter is now {good[-1].name}, the last good checkpoint")
    return good[-1]


def _train(run: RunFolder, cfg: TrainConfig, plan: DevicePlan, stored: dict, stop_event, resume: bool, log,
           extra_callbacks: list) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, TrainingArguments, set_seed

    from .data import prepare_dataset
    from .diagnose import Diagnoser, data_findings
    from .models import resolve_model

    set_seed(cfg.seed)
    source = resolve_model(cfg.model)
    log(f"model {cfg.model} -> {source.path} ({source.kind}); device: {plan.reason}")
    tokenizer = load_tokenizer(source.path, cfg.trust_remote_code)
    data = prepare_dataset(cfg.data, tokenizer, cfg.max_seq_len, cfg.eval_fraction, cfg.seed, cfg.data_format)
    rep = data.report
    log(f"data {rep.path}: format {rep.format}, {rep.usable}/{rep.rows} rows usable, "
        f"{rep.truncated} truncated at {cfg.max_seq_len}, train {len(data.train)}, eval {len(data.eval) if data.eval else 0}")
    for issue in rep.errors[:20]:
        log("  skipped " + issue.format(rep.path))
    atomic_write_json(run.path / "data_report.json", rep.to_dict())
    for finding in data_findings(rep.to_dict(), stored):
        _log_finding(log, finding)

    speed = speed_plan(cfg, plan)  # the attention choice needs no model; checkpointing is settled below
    model = load_base_model(source.path, cfg.quant, plan.compute_dtype, plan.device, cfg.double_quant, cfg.trust_remote_code,
                            attention=speed.attention)
    keep_4bit_weights_trainable(model)
    model.config.use_cache = False
    n_params = count_parameters(model)
    lora = auto_lora(linear_module_names(model), n_params, cfg.task, cfg)
    try:
        from .catalog import load_architecture

        arch = load_architecture(source.path)
    except Exception:  # a model the catalog cannot read: checkpointing stays on
        arch = None
    speed = speed_plan(cfg, plan, arch, lora)
    batching = cfg.batching or "packed"
    packing = False
    if batching == "packed":
        packing, why = packing_respected(model)
        batching_why = "padding-free packing: " + why if packing else "padded batches grouped by length: " + why
        batching = "packed" if packing else "grouped"
    else:
        batching_why = f"{'padded batches grouped by length' if batching == 'grouped' else 'padded batches'} (as configured)"
    ckpt_why = speed.why if speed.why.startswith(("on", "off")) else f"{'on' if speed.gradient_checkpointing else 'off'} ({speed.why})"
    log(f"speed: attention {speed.attention}; gradient checkpointing {ckpt_why}; {batching_why}")
    if speed.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        model.enable_input_require_grads()
    peft_config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=lora["targets"],
                             lora_dropout=cfg.lora_dropout, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_config)
    if cfg.init_adapter and not resume:
        _load_init_adapter(model, cfg.init_adapter, log)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"LoRA r={lora['rank']} alpha={lora['alpha']} on {lora['targets']} ({lora['why'] or 'as configured'}); "
        f"trainable {trainable:,} of {n_params:,} parameters ({100 * trainable / n_params:.2f}%)")

    steps_per_epoch = math.ceil(len(data.train) / (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(steps_per_epoch * cfg.epochs))
    eval_steps = cfg.eval_steps or max(1, total_steps // 5)
    save_steps = cfg.save_steps or eval_steps
    resolved = dict(stored)
    resolved.update({"lora": lora, "device_plan": asdict(plan), "trainable_params": trainable, "total_params": n_params,
                     "trainable_share": trainable / n_params, "model_path": str(source.path),
                     "model_kind": source.kind, "total_steps": total_steps, "eval_steps": eval_steps,
                     "speed": {"attention": speed.attention, "gradient_checkpointing": speed.gradient_checkpointing,
                               "gradient_checkpointing_why": speed.why, "packing": packing, "batching": batching, "batching_why": batching_why}})
    run.write_config(resolved)

    args = TrainingArguments(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # show NaN/inf losses as they are
        eval_strategy="steps" if data.eval is not None else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        # The checkpoint with the lowest eval loss survives rotation: "stop at the best checkpoint"
        # (the overfitting fix) needs it. Nothing is reloaded at the end.
        metric_for_best_model="eval_loss" if data.eval is not None else None,
        greater_is_better=False if data.eval is not None else None,
        optim=plan.optimizer,
        bf16=plan.compute_dtype == "bfloat16",
        fp16=plan.compute_dtype == "float16",
        use_cpu=plan.device == "cpu",
        seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        # Counted by the batch's attention_mask: real tokens only, packed or padded.
        include_num_input_tokens_seen="non_padding",
        # Without packing, examples of similar length share a batch, so less compute goes to padding.
        train_sampling_strategy="group_by_length" if batching == "grouped" else "random",
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    if packing:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        hidden = getattr(model.config, "hidden_size", None) or 1024
        collator = PackedBatches(pad_id, attention_span=(2.2 if plan.device == "cpu" else 6.0) * hidden)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    diagnoser = Diagnoser(resolved)
    callback = _make_callback_class()(run, stop_event, plan.device, log, diagnoser)
    trainer = _studio_trainer_class()(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                      data_collator=collator,
                      processing_class=tokenizer, callbacks=[callback, *extra_callbacks])
    trainer.packed = packing
    trainer.remove_callback(PrinterCallback)  # our callback logs; the printer would echo raw dicts
    resume_from = None
    if resume:
        ckpt = run.last_checkpoint()
        if ckpt is None:
            raise TrainingError(f"{run.path}: no checkpoint to resume from")
        step = int(ckpt.name.rsplit("-", 1)[-1])
        _truncate_metrics_after(run, step)
        resume_from = str(ckpt)
        log(f"resuming from {ckpt.name}")
        diagnoser.add_all(run.metrics())  # the detectors see the history they continue (findings already logged)
    if plan.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run.set_status("running", phase="training", total_steps=total_steps)
    if total_steps > 0:
        result_metrics = trainer.train(resume_from_checkpoint=resume_from).metrics
    else:  # a run that starts from an adapter with nothing left to train: evaluate and keep it
        log("no steps left to train: evaluating the starting adapter and keeping it")
        result_metrics = {}
        trainer.state.global_step = 0

    if callback.nonfinite is not None:
        good = _roll_back_nonfinite(run, callback.nonfinite, log)
        f = callback.nonfinite
        run.write_summary({"global_step": trainer.state.global_step, "total_steps": total_steps, "device": plan.device,
                           "peak_memory": _peak_memory_mb(plan.device), "nonfinite_step": f.step,
                           "last_good_checkpoint": good.name if good else None})
        return run.set_status("failed", error=f"non-finite values at step {f.step}: {f.message}", error_kind="nonfinite",
                              finished_at=time.time(), phase="failed", step=trainer.state.global_step,
                              last_checkpoint=good.name if good else None)

    model.save_pretrained(str(run.adapter))
    tokenizer.save_pretrained(str(run.adapter))
    final_eval = {}
    if data.eval is not None:
        records, _ = read_metrics_from(run.metrics_path)
        evals = [r for r in records if r.get("type") == "eval"]
        if (not evals or evals[-1]["step"] != trainer.state.global_step) and not callback.stopped:
            final_eval = trainer.evaluate()  # a stopped run reports its last evaluation instead: stopping stays quick
        elif evals:
            final_eval = {k: v for k, v in evals[-1].items() if k.startswith("eval_")}
    records, _ = read_metrics_from(run.metrics_path)
    train_losses = [r["loss"] for r in records if r.get("type") == "train"]
    tokens = trainer.state.num_input_tokens_seen
    runtime = result_metrics.get("train_runtime")
    summary = {
        "train_runtime_s": runtime,
        "global_step": trainer.state.global_step,
        "total_steps": total_steps,
        "epoch": trainer.state.epoch,
        "non_pad_tokens": tokens,
        "tokens_per_s": tokens / runtime if runtime else None,
        "final_loss": train_losses[-1] if train_losses else None,
        "first_loss": train_losses[0] if train_losses else None,
        "eval": final_eval,
        "peak_memory": _peak_memory_mb(plan.device),
        "device": plan.device,
        "resumed": bool(resume_from),
    }
    if plan.device == "cuda":
        summary["gpu_total_mb"] = torch.cuda.get_device_properties(0).total_memory / 2**20
    summary["memory_estimate"] = _estimate_vs_measured(cfg, lora, arch, plan, summary["peak_memory"], log,
                                                       speed.gradient_checkpointing)
    run.write_summary(summary)
    state = "stopped" if callback.stopped else "completed"
    log(f"{state} at step {trainer.state.global_step}: final loss {summary['final_loss']}, "
        f"{summary['tokens_per_s'] or 0:.0f} non-pad tokens/s; adapter in {run.adapter}")
    return run.set_status(state, finished_at=time.time(), phase=state, step=trainer.state.global_step)


def _estimate_vs_measured(cfg: TrainConfig, lora: dict, arch, plan: DevicePlan, peak: dict, log,
                          grad_checkpointing: bool) -> dict | None:
    """The estimator's peak for this run's settings next to the measured one; on CUDA the pair is
    recorded so the estimator can calibrate itself to this machine."""
    from .estimator import record_measurement

    try:
        if arch is None:
            raise ValueError("the catalog cannot read its config")
        est = run_estimate(cfg, arch, lora, plan, grad_checkpointing)
    except Exception as e:  # an architecture the estimator does not know: no comparison, no failure
        log(f"no memory estimate for this model ({e})")
        return None
    out = {"estimated_bytes": est.total_bytes, "breakdown": est.breakdown}
    if plan.device == "cuda" and peak.get("memory_reserved_mb"):
        import torch

        measured = int(peak["memory_reserved_mb"] * 2**20)
        out.update(measured_bytes=measured, error=(est.total_bytes - measured) / measured)
        record_measurement(est.total_bytes, measured, torch.cuda.get_device_name(0), model=str(cfg.model),
                           batch=cfg.batch_size, seq=cfg.max_seq_len, quant=cfg.quant)
        log(f"memory: estimated {est.total_bytes / 2**30:.2f} GiB, measured peak {measured / 2**30:.2f} GiB reserved")
    return out
