"""The run plan: every decision about how a run trains, made once, with the reason for each.

``plan_run(config, machine, architecture) -> RunPlan`` decides the device, the precision, the LoRA
rank/alpha/targets, batching, attention, gradient checkpointing, the optimizer and the memory estimate.
The trainer executes the plan (and records it in the run folder's plan.json, beside the user's
config.json); the Train tab's preview, the live view, diagnosis and the CLI (`qlora-studio plan`,
`train --dry-run`) only display it.

``precision_for(device, compute_capability)`` is the one precision rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import plan_memory
from .attention import NAME as PACKED_ATTENTION
from .config import TrainConfig
from .errors import ConfigError

GiB = 2**30

# Module names LoRA can adapt, by role, for models the catalog cannot describe (read from the loaded model).
ATTENTION_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn",
                     "Wqkv", "out_proj", "query", "key", "value", "dense"}
MLP_MODULES = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3",
               "dense_h_to_4h", "dense_4h_to_h", "c_proj"}
# Tasks that change the output format or need reasoning benefit from adapting the MLPs too.
FORMAT_TASKS = {"sql", "code", "json", "reasoning", "math", "format"}
# Measured on the CPU, the embedded model, batches of 4 alpaca examples (benchmarks/throughput.py, "ours, eager
# attention"): in fp32 on an AVX2 CPU (five runs each way); under bf16 autocast on an AVX512-BF16 one, two runs
# each (1.04x) and, with the attention in fp32 since, three each (medians 243.7 against 258.6 tok/s: 0.94x), both
# within that machine's noise.
PACKED_WHY = ("SDPA on each packed example alone, so no attention work across examples (one epoch of alpaca-like "
              "data trained 1.25x faster than with eager attention over whole rows in fp32; under bf16 autocast "
              "the two were within the noise, 0.94-1.04x)")
AUTO_OPTIMIZER = {"cpu": "adamw_torch_fused", "cuda": "paged_adamw_8bit"}
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# ------------------------------------------------------------------ precision


def precision_for(device: str, compute_capability: tuple[int, int] | None = None, training: bool = True,
                  cpu_bf16: bool = False) -> str:
    """The compute dtype ("bf16" | "fp16" | "fp32") for a device.

    - CUDA: bf16 on compute capability >= 8.0 (Ampere and newer); fp16 (with loss scaling) on Volta and
      Turing (7.x) and on the P100 (6.0); fp32 on consumer Pascal (6.1, 6.2), whose fp16 math runs at a
      small fraction of its fp32 speed. ``torch.cuda.is_bf16_supported()`` is not asked: it answers True
      on Turing, where bf16 is only emulated.
    - CPU: training runs under bf16 autocast where the CPU computes bf16 natively (``cpu_bf16``:
      AVX512-BF16 or AMX, `hardware.cpu_has_bf16`; on a 2-core AVX512-BF16 EPYC, one epoch of 64 alpaca-like
      rows in NF4 trained at 211-230 non-pad tokens/s against 169-176 in fp32, alternating runs),
      in fp32 elsewhere (an AVX2-only CPU emulates bf16: one step took 74 s instead of 5 s in fp32);
      inference (``training=False``: chat, evaluation, merging) in fp32, the CPU's fast and exact path.
    """
    if device == "cpu":
        return "bf16" if training and cpu_bf16 else "fp32"
    if compute_capability is None:
        return "fp32"
    cc = tuple(compute_capability)
    if cc >= (8, 0):
        return "bf16"
    if cc >= (7, 0) or cc == (6, 0):
        return "fp16"
    return "fp32"


def torch_dtype(precision: str):
    import torch

    return getattr(torch, TORCH_DTYPES[precision])


# ------------------------------------------------------------------ the machine a plan is for


@dataclass
class Machine:
    """What the planner needs to know about where a run trains."""

    device: str  # cuda | cpu
    gpu_name: str | None = None
    compute_capability: tuple[int, int] | None = None
    gpu_total_bytes: int | None = None
    gpu_free_bytes: int | None = None
    ram_available_bytes: int | None = None
    cpu_bf16: bool = False  # the CPU computes bf16 natively (AVX512-BF16 / AMX)
    here: bool = True  # this machine (False: a card planned for, e.g. from the Hardware tab)
    gpu_count: int = 0  # CUDA GPUs (of the kind described) a run may use

    @property
    def label(self) -> str:
        if self.device == "cpu":
            return "CPU (no CUDA GPU)"
        cc = ".".join(map(str, self.compute_capability)) if self.compute_capability else "?"
        return f"{self.gpu_name or 'CUDA GPU'} (compute capability {cc})"

    @classmethod
    def detect(cls, device: str | None = None) -> "Machine":
        """This machine, as torch sees it (the trainer runs on torch's view). ``device``: the user's
        choice (None: the GPU if there is one)."""
        import torch

        from .hardware import cpu_has_bf16, ram_bytes

        _, available = ram_bytes()
        has_cuda = torch.cuda.is_available()
        if device == "cuda" and not has_cuda:
            raise ConfigError("device: cuda was asked for, but torch sees no CUDA GPU (is a CUDA build of torch "
                              "installed?)", field="device", why="no CUDA GPU visible to torch")
        if not has_cuda or device == "cpu":
            return cls("cpu", ram_available_bytes=available, cpu_bf16=cpu_has_bf16())
        index = torch.cuda.current_device()  # a worker process's own GPU (its local rank), else GPU 0
        free, total = torch.cuda.mem_get_info(index)
        return cls("cuda", torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)), total,
                   free, available, gpu_count=torch.cuda.device_count())

    @classmethod
    def for_gpu(cls, spec, count: int = 1) -> "Machine":
        """``count`` cards from the catalog (`hardware.GpuSpec`) or a detected one (`hardware.GpuInfo`)."""
        total = getattr(spec, "vram_bytes", None) or getattr(spec, "total_bytes", None)
        free = getattr(spec, "free_bytes", None) or total
        name = getattr(spec, "label", None) or getattr(spec, "name", None)
        return cls("cuda", name, tuple(spec.compute_capability) if spec.compute_capability else None, total, free,
                   here=False, gpu_count=count)


# ------------------------------------------------------------------ the plan


@dataclass
class RunPlan:
    """How a run trains. ``reasons`` says why, for every choice that was automatic."""

    model: str
    architecture: str | None
    model_params: int | None
    device: str
    machine: str
    precision: str  # bf16 | fp16 | fp32
    quant: str  # nf4 | fp4 | none
    double_quant: bool
    rank: int
    alpha: int
    targets: list[str]
    lora_dropout: float
    batch_size: int
    grad_accum: int
    max_seq_len: int
    batching: str  # packed | grouped | padded
    attention: str  # packed_sdpa | sdpa | eager
    gradient_checkpointing: bool
    optimizer: str
    memory: dict | None = None  # estimate_bytes (per GPU), breakdown, available_bytes, fits, where, per_gpu
    reasons: dict = field(default_factory=dict)
    # where the LM head and the loss are computed: "labelled" (only positions whose next token is trained;
    # decided once the model is loaded, `batching.labelled_logits_supported`) or "all"
    logits: str = "all"
    # how the loss is computed from the logits: "chunked" (`loss.causal_lm_loss`, where the model takes
    # transformers' loss hook, checked when it loads) or "torch" (transformers' own)
    cross_entropy: str = "torch"
    # how the LoRA update joins the base output: "fused" (`lora_update.fused_forward`) or "peft"
    lora_update: str = "peft"
    # how LoRA dropout draws its masks: "16bit" (`dropout.Dropout16`) or "torch" (peft's nn.Dropout)
    dropout_masks: str = "torch"
    # torch threads on the CPU: a number as configured, or None: one per core other processes leave free,
    # checked between steps (`cpu_share`)
    cpu_threads: int | None = None
    # what batch_size counts: "examples", or "sequences" of max_seq_len tokens packed with whole examples
    batch_unit: str = "examples"
    processes: int = 1  # worker processes (one per GPU); batch_size and grad_accum are each one's
    parallel: str = "single"  # single | ddp | fsdp
    quant_storage: str | None = None  # FSDP: the dtype 4-bit weights are packed in (bf16 | fp32); None: uint8
    # the 4-bit weights kept decoded in the compute dtype (`decoded.keep_decoded`), not decoded at each use
    decoded_weights: bool = False

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.processes

    @property
    def sequences(self) -> bool:
        return self.batch_unit == "sequences"

    @property
    def torch_dtype(self):
        return torch_dtype(self.precision)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["effective_batch"] = self.effective_batch
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunPlan":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def lines(self) -> list[str]:
        """The plan for a person, one decision a line."""
        r = self.reasons
        mem = self.memory or {}
        out = [f"device: {self.machine}" + (f" -- {r['device']}" if r.get("device") else ""),
               f"precision: {self.precision}" + (f" -- {r['precision']}" if r.get("precision") else ""),
               f"base: {self.model} ({self.architecture or 'shape unknown until it loads'}), "
               f"{self.quant.upper() if self.quant != 'none' else '16-bit'}"
               + (" + double quant" if self.quant != "none" and self.double_quant else "")
               + (f", packed in {self.quant_storage} -- {r.get('quant_storage')}" if self.quant_storage else ""),
               f"LoRA: r={self.rank}, alpha={self.alpha}, on {', '.join(self.targets)}"
               + (f" -- {r['lora']}" if r.get("lora") else ""),
               f"batch: {self.batch_size} x {self.grad_accum} accumulation"
               + (f" x {self.processes} processes" if self.processes > 1 else "")
               + f" = {self.effective_batch} {'sequences' if self.sequences else 'examples'} per step, "
               f"seq {self.max_seq_len}, {self.batching}" + (f" -- {r['batching']}" if r.get("batching") else ""),
               f"attention: {self.attention}" + (f" -- {r['attention']}" if r.get("attention") else ""),
               f"gradient checkpointing: {'on' if self.gradient_checkpointing else 'off'}"
               + (f" -- {r['gradient_checkpointing']}" if r.get("gradient_checkpointing") else ""),
               f"optimizer: {self.optimizer}" + (f" -- {r['optimizer']}" if r.get("optimizer") else ""),
               f"LM head and loss: {'trained positions only' if self.logits == 'labelled' else 'every position'}"
               + (f" -- {r['logits']}" if r.get("logits") else ""),
               f"cross-entropy: {self.cross_entropy}" + (f" -- {r['cross_entropy']}" if r.get("cross_entropy") else ""),
               f"LoRA update: {self.lora_update}" + (f" -- {r['lora_update']}" if r.get("lora_update") else "")]
        if self.sequences:
            out.insert(5, f"batch unit: sequences -- {r.get('batch_unit', '')}")
        if self.quant != "none":
            out.append(("4-bit weights: decoded once and kept in " + self.precision if self.decoded_weights else
                        "4-bit weights: decoded at each use") + (f" -- {r['decoded_weights']}"
                                                                  if r.get("decoded_weights") else ""))
        if self.lora_dropout > 0:
            out.append(f"dropout masks: {self.dropout_masks}"
                       + (f" -- {r['dropout_masks']}" if r.get("dropout_masks") else ""))
        if self.device == "cpu":
            out.append(f"CPU threads: {self.cpu_threads or 'adaptive'}"
                       + (f" -- {r['cpu_threads']}" if r.get("cpu_threads") else ""))
        if self.processes > 1 or r.get("processes"):
            out.insert(1, f"processes: {self.processes}" + (f" ({self.parallel})" if self.processes > 1 else "")
                       + (f" -- {r['processes']}" if r.get("processes") else "")
                       + (f"; {r['parallel']}" if r.get("parallel") else ""))
        if mem.get("estimate_bytes"):
            line = f"memory: estimated peak {mem['estimate_bytes'] / GiB:.2f} GiB" + (
                " per GPU" if self.processes > 1 and self.device == "cuda" else
                " per process" if self.processes > 1 else "")
            if mem.get("per_gpu") and len(mem["per_gpu"]) > 1:
                line += " (" + ", ".join(f"{k} {v / GiB:.2f}" for k, v in mem["per_gpu"].items()) + " GiB)"
            if mem.get("where") == "cpu":
                line += " (as on a GPU; this run trains in RAM)"
            elif mem.get("available_bytes"):
                line += f" of {mem['available_bytes'] / GiB:.2f} GiB free" + ("" if mem.get("fits") else
                                                                             ": does NOT fit with headroom")
            if mem.get("calibration"):
                line += f" ({mem['calibration']})"
            out.append(line)
        elif r.get("memory"):
            out.append(f"memory: {r['memory']}")
        return out


def auto_lora(config: TrainConfig, module_names: list[str], attention_names: set[str] | None,
              n_params: int | None) -> tuple[int, int, list[str], str]:
    """(rank, alpha, targets, why): the config's choices, otherwise chosen by size and task.

    - Targets: attention projections by default; MLP projections too for models under 3B parameters
      (cheap, and small models need the capacity) and for format-shifting tasks (SQL, code, JSON).
    - Rank: 16 for most; 8 for attention-only on models of 13B and more (big models adapt with little);
      32 for format tasks on models of 13B and more.
    """
    if attention_names is None:  # names read from a loaded model: sorted by the known names
        attn = [n for n in module_names if n in ATTENTION_MODULES]
        mlp = [n for n in module_names if n in MLP_MODULES and n not in ATTENTION_MODULES]
    else:  # names from the architecture: every linear layer is attention or MLP
        attn = [n for n in module_names if n in attention_names]
        mlp = [n for n in module_names if n not in attention_names]
    if not attn:  # unknown architecture: adapt every linear layer
        attn, mlp = list(module_names), []
    params = n_params or 0
    format_task = (config.task or "").lower() in FORMAT_TASKS
    why = []
    if config.targets is None:
        use_all = params < 3e9 or format_task
        targets = attn + mlp if use_all else attn
        why.append(("attention + MLP projections" + (" (model under 3B)" if params < 3e9 else f" ({config.task} task)"))
                   if use_all else "attention projections (model of 3B or more)")
    elif config.targets == "all":
        targets = attn + mlp
    elif config.targets == "attention":
        targets = attn
    else:
        missing = [t for t in config.targets if t not in module_names]
        if missing:
            raise ConfigError(f"targets: {missing} are not linear layers of this model; it has {module_names}",
                              field="targets", why=f"{missing} are not linear layers of this model")
        targets = list(config.targets)
    if config.rank is None:
        rank = (32 if format_task else 8) if params >= 13e9 else 16
        why.append(f"rank {rank} for a {params / 1e9:.2f}B model")
    else:
        rank = config.rank
    alpha = config.alpha or 2 * rank
    if config.alpha is None:
        why.append("alpha = 2 x rank")
    return rank, alpha, sorted(targets), "; ".join(why)


def _attention(config: TrainConfig, device: str, architecture, batching: str) -> tuple[str, str | None]:
    """The attention implementation and why. On the CPU with packed batches, `attention.packed_sdpa_forward`
    runs SDPA on each packed example alone; eager attention otherwise (measured faster than SDPA on the CPU
    under bf16, and equal within noise in fp32: benchmarks/throughput.py). Gemma-2 keeps eager: its
    soft-capping has no SDPA path in transformers. A model the catalog cannot describe keeps eager too (its
    own code may not take an attention implementation). On a GPU, SDPA."""
    if config.attention:
        return config.attention, None
    if device == "cuda":
        return "sdpa", "fused SDPA kernels on the GPU"
    if architecture is None or architecture.model_type == "gemma2":
        return "eager", ("Gemma-2's soft-capping has no SDPA path" if architecture is not None
                         else "the model's config cannot be read: the attention every model has")
    if batching != "packed":
        return "eager", "padded batches: eager was measured fastest on the CPU"
    return PACKED_ATTENTION, PACKED_WHY


def plan_run(config: TrainConfig, machine: Machine, architecture=None, *, module_names: list[str] | None = None,
             n_params: int | None = None) -> RunPlan:
    """Every decision for ``config`` on ``machine``.

    ``architecture``: the model's `catalog.Architecture` (its layer names, size and shapes); None when
    it cannot be read, in which case ``module_names`` and ``n_params`` (read from the loaded model)
    stand in and there is no memory estimate.
    """
    if config.device == "cuda" and machine.device != "cuda":
        raise ConfigError("device: cuda was asked for, but this machine has no CUDA GPU", field="device",
                          why="no CUDA GPU")
    reasons: dict[str, str] = {}
    device = machine.device
    if config.device is None:
        reasons["device"] = "the CUDA GPU" if device == "cuda" else "no CUDA GPU: training runs on the CPU"
    precision = precision_for(device, machine.compute_capability, cpu_bf16=machine.cpu_bf16)
    reasons["precision"] = _precision_reason(device, machine.compute_capability, precision)

    if architecture is not None:
        layers = architecture.linear_layers()
        names = sorted({layer.name for layer in layers})
        attention_names = {layer.name for layer in layers if layer.group == "attention"}
        params = architecture.total_params
    else:  # the layers of the loaded model; none yet: the targets are chosen when it loads
        names, attention_names, params = sorted(module_names or []), None, n_params
    if names:
        rank, alpha, targets, lora_why = auto_lora(config, names, attention_names, params)
    else:
        rank, alpha, targets = config.rank or 16, config.alpha or 2 * (config.rank or 16), []
        lora_why = "targets chosen when the model loads (its config cannot be read before)"
    if lora_why:
        reasons["lora"] = lora_why
    optimizer = config.optimizer or AUTO_OPTIMIZER[device]
    if config.optimizer is None:
        reasons["optimizer"] = ("paged 8-bit AdamW: small states that can spill to RAM" if device == "cuda"
                                else "32-bit AdamW in torch's fused kernel (bitsandbytes' 8-bit optimizers need "
                                "a GPU; a step for the embedded model's 420 adapter tensors took 5.1 ms against 18.8 "
                                "ms for torch's default foreach step)")
    batching = config.batching or "packed"
    if config.batching is None:
        reasons["batching"] = ("no padding: examples packed into rows, used where the model's attention keeps them "
                               "apart (checked when it loads; otherwise padded and grouped by length)")
    attention, why = _attention(config, device, architecture, batching)
    if why:
        reasons["attention"] = why
    logits = config.logits or "labelled"
    if config.logits is None:
        reasons["logits"] = ("only at trained positions (prompt and padding skipped; the same loss), where the "
                             "model takes a mask of positions (checked when it loads)")
    cross_entropy = config.cross_entropy or ("chunked" if device == "cpu" else "torch")
    if config.cross_entropy is None:
        reasons["cross_entropy"] = (
            "a few rows of logits at a time, without an fp32 copy of all of them (the same loss up to fp32 "
            "rounding), where the model takes transformers' loss hook (checked when it loads)" if device == "cpu"
            else "transformers' cross-entropy (the chunked one is measured on the CPU only)")
    lora_update = config.lora_update or ("fused" if device == "cpu" else "peft")
    if config.lora_update is None:
        reasons["lora_update"] = (
            "one matrix product adds the adapters' update to the base output, where peft's layer copies that output "
            "and computes the product, the scaling and the sum in separate passes; the same sum, rounded once"
            if device == "cpu"
            else "peft's layer (the fused update is measured on the CPU only)")
    if config.batch_unit == "sequences":
        tokens = config.batch_size * config.grad_accum * config.max_seq_len
        reasons["batch_unit"] = (f"each step carries up to {tokens:,} tokens of whole examples packed into "
                                 f"{config.batch_size * config.grad_accum} sequences of {config.max_seq_len}, so "
                                 "more examples per step and fewer steps than counting examples; the learning rate "
                                 f"stays {config.learning_rate:g} (not scaled up for the bigger steps). How many "
                                 "examples a step holds is known once the data is tokenized")
    dropout_masks = config.dropout_masks or ("16bit" if device == "cpu" else "torch")
    if config.dropout_masks is None and config.lora_dropout > 0:
        reasons["dropout_masks"] = (
            "16-bit random numbers, four from each SplitMix64 number, computed on every core (the probability "
            "rounded to 1/65536): torch draws a CPU mask one element at a time, on one core (training steps "
            "took 0.81 of the time with torch's masks)" if device == "cpu"
            else "torch's fused dropout kernel on the GPU")
    if device == "cpu" and config.cpu_threads is None:
        reasons["cpu_threads"] = ("one per core that other processes leave free, checked between steps (beside one busy "
                                  "process on 2 cores, one thread trained 2.1x faster than two)")
    plan = RunPlan(model=config.model, architecture=architecture.name if architecture is not None else None,
                   model_params=params, device=device, machine=machine.label, precision=precision, quant=config.quant,
                   double_quant=config.double_quant, rank=rank, alpha=alpha, targets=targets,
                   lora_dropout=config.lora_dropout, batch_size=config.batch_size, grad_accum=config.grad_accum,
                   max_seq_len=config.max_seq_len, batching=batching, attention=attention,
                   gradient_checkpointing=True, optimizer=optimizer, reasons=reasons, logits=logits,
                   cpu_threads=config.cpu_threads, batch_unit=config.batch_unit, dropout_masks=dropout_masks,
                   cross_entropy=cross_entropy, lora_update=lora_update)
    plan.gradient_checkpointing, why = plan_memory.checkpointing(config, plan, architecture, machine)
    if why:
        reasons["gradient_checkpointing"] = why
    plan.decoded_weights, why = plan_memory.decoded_weights(config, plan, architecture, machine)
    if why:
        reasons["decoded_weights"] = why
    from .parallel import choose_parallel, split_processes

    split_processes(config, machine, plan)
    plan.memory = plan_memory.memory(plan, architecture, machine)
    if plan.processes > 1:
        choose_parallel(config, machine, plan, lambda: plan_memory.memory(plan, architecture, machine))
    if plan.memory is None:
        reasons["memory"] = "no estimate: the model's shape is not one the estimator knows"
    return plan


def _precision_reason(device: str, cc, precision: str) -> str:
    if device == "cpu":
        return ("bf16 autocast: this CPU computes bf16 natively" if precision == "bf16" else
                "fp32: this CPU has no native bf16 (no AVX512-BF16 or AMX), where bf16 autocast is many times slower")
    cc_text = ".".join(map(str, cc)) if cc else "unknown"
    return {"bf16": f"compute capability {cc_text} has native bf16",
            "fp16": f"compute capability {cc_text} has no native bf16: fp16 with loss scaling",
            "fp32": f"compute capability {cc_text}: fp16 math is slow on this card, so fp32"}[precision]


def plan_for(config: TrainConfig, machine: Machine | None = None) -> RunPlan:
    """The plan for ``config`` on this machine (or ``machine``), the model's shape read without loading or
    downloading it (`models.model_architecture`); a model whose shape cannot be read that way gets its
    LoRA targets when it loads."""
    from .errors import StudioError
    from .models import model_architecture

    machine = machine or Machine.detect(config.device)
    try:
        arch = None if str(config.model).lower().endswith(".gguf") else model_architecture(config.model)
    except (StudioError, OSError, ValueError):
        arch = None
    return plan_run(config, machine, arch)
