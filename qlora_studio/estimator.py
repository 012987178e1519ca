"""Peak GPU memory of a fine-tuning step, from a model's architecture alone; and a plan for a card.

``estimate`` returns a :class:`MemoryBreakdown` whose items add up to the total:

- weights      the frozen base: 4-bit blocks + their scales, and the modules that stay 16-bit
- adapters     LoRA A/B matrices (fp32 masters; compute runs in bf16/fp16 under autocast)
- optimizer    AdamW states for the trainable parameters (32-bit or 8-bit; paged or not)
- gradients    fp32 gradients of the trainable parameters
- activations  what backward needs: per layer per token, with or without gradient checkpointing
- logits       batch x seq x vocab, upcast to fp32 for the loss, plus its gradients
- overhead     CUDA context, the transient dequantized weight of a 4-bit layer, allocator slack

The per-token activation terms follow what PyTorch's autograd actually saves in the transformers
implementations (RMSNorm in fp32, SDPA saving q/k/v/out and a log-sum-exp, gated MLP); they were
checked by counting live tensors of tiny models on the CPU (see tests/test_estimator.py). The fixed
terms of a real GPU (CUDA context, allocator slack) are the part measured only on a GPU:
``benchmarks/vram_accuracy.py`` compares, and ``record_measurement`` / ``calibration_factor`` let a
machine correct the estimate with its own runs.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from .catalog import Architecture, LinearShape
from .runs import atomic_write_json

MiB = 1024**2
GiB = 1024**3

BREAKDOWN_KEYS = ("weights", "adapters", "optimizer", "gradients", "activations", "logits", "overhead")

METHODS = ("qlora", "lora", "full")
QUANTS = ("nf4", "fp4", "none")
OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit", "adamw_torch", "adamw_torch_fused")
ATTENTIONS = ("sdpa", "eager", "packed_sdpa")
TARGETS = ("attention", "all")
COMPUTE_DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}

# bitsandbytes 4-bit storage (Params4bit / QuantState)
QUANT_BLOCK = 64  # weights sharing one absmax scale
NESTED_BLOCK = 256  # with double quantization: 8-bit scales sharing one fp32 scale-of-scales
CODE_4BIT_BYTES = 16 * 4  # the 16-value NF4/FP4 code table (fp32) each quantized layer carries
CODE_8BIT_BYTES = 256 * 4 + 4  # double quant: the 256-value code of the 8-bit scales + an fp32 offset

# bitsandbytes 8-bit optimizers
OPT8_BLOCK = 256  # values per fp32 absmax of a blockwise 8-bit state
OPT8_MIN_SIZE = 4096  # smaller tensors keep 32-bit states (bitsandbytes' min_8bit_size)

# Loss: log_softmax output (fp32) + the gradient from nll_loss (fp32) + the gradient of its input (fp32)
# are alive together at the start of backward; the compute-dtype logits are gone by then when the loop
# drops the model output before backward, as the Trainer does.
LOGITS_BYTES_PER_ELEMENT = 12

CUDA_CONTEXT_BYTES = 500 * MiB  # CUDA context + kernels of torch and bitsandbytes (outside torch's allocator)
ALLOCATOR_SLACK = 0.10  # caching-allocator reserve beyond live tensors, as a share of activations + logits
HEADROOM = 0.25  # a plan keeps the estimate at most 1/(1+0.25) = 80% of the usable memory
CALIBRATION_CLAMP = (0.8, 1.5)


def fits(total_bytes: int, usable_bytes: int, headroom: float = HEADROOM) -> bool:
    """Whether a peak of ``total_bytes`` fits in ``usable_bytes`` with ``headroom`` to spare: the one rule
    the recommendation, the plan and the what-if panel use."""
    return total_bytes * (1 + headroom) <= usable_bytes


# ------------------------------------------------------------------ the result

@dataclass
class MemoryBreakdown:
    """Estimated peak GPU memory of one training step, item by item, with what was assumed."""

    model: str
    total_bytes: int
    breakdown: dict[str, int]
    assumptions: list[str]
    settings: dict = field(default_factory=dict)
    params_total: int = 0
    params_trainable: int = 0

    def to_dict(self) -> dict:
        """The CLI's JSON shape: total_bytes, breakdown (the seven keys), assumptions."""
        return {"total_bytes": self.total_bytes, "breakdown": dict(self.breakdown), "assumptions": list(self.assumptions)}

    def table(self) -> str:
        lines = [f"{self.model}: {_settings_line(self.settings)}",
                 f"parameters {self.params_total / 1e9:.3f}B, trainable {self.params_trainable / 1e6:.1f}M", ""]
        for key in BREAKDOWN_KEYS:
            lines.append(f"  {key:<12} {_gib(self.breakdown[key]):>9}")
        lines.append(f"  {'total':<12} {_gib(self.total_bytes):>9}")
        lines.append("")
        lines.append("Assumptions:")
        lines += [f"  - {a}" for a in self.assumptions]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _settings_line(s: dict) -> str:
    if not s:
        return ""
    quant = "16-bit base" if s["quant"] == "none" else s["quant"] + ("+dq" if s["double_quant"] else "")
    adapters = f"r={s['rank']} on {s['targets']}, " if s["method"] != "full" else ""
    ckpt = "checkpointing" if s["grad_checkpointing"] else "no checkpointing"
    return (f"{s['method']} ({quant}), {adapters}batch {s['batch']} x seq {s['seq']}, {ckpt}, "
            f"{s['optimizer']}, {s['attention']}, {s['compute_dtype']}")


# ------------------------------------------------------------------ byte formulas

def quantized_linear_bytes(n_weights: int, double_quant: bool) -> int:
    """Bytes of one bitsandbytes 4-bit (NF4 or FP4) weight matrix of ``n_weights`` values."""
    data = math.ceil(n_weights / 2)  # two 4-bit values per byte
    blocks = math.ceil(n_weights / QUANT_BLOCK)  # one absmax per 64 weights
    if double_quant:
        # absmax quantized to 8 bits (1 B per block) + one fp32 scale per 256 blocks + the 8-bit code
        scales = blocks * 1 + math.ceil(blocks / NESTED_BLOCK) * 4 + CODE_8BIT_BYTES
    else:
        scales = blocks * 4  # fp32 absmax per block
    return data + scales + CODE_4BIT_BYTES


def weights_bytes(arch: Architecture, quant: str = "nf4", double_quant: bool = True, dtype_bytes: int = 2) -> int:
    """The frozen base model in memory. With 4-bit, only the decoder's linear weights are quantized;
    embeddings, lm_head, norms and biases stay in the load dtype (``dtype_bytes``: 2 for bf16/fp16, 4 when
    a card without fast 16-bit math loads the model in fp32). Without quantization everything is in it.
    A vision encoder the checkpoint carries (Gemma 3 4B+) is loaded too, counted in the load dtype (an upper
    bound: 4-bit loading may quantize its linear layers)."""
    counts = arch.param_counts()
    vision = dtype_bytes * arch.vision_params
    if quant == "none":
        return dtype_bytes * counts.total + vision
    per_layer = sum(quantized_linear_bytes(m.weight_params, double_quant) for m in arch.linear_layers())
    return arch.num_layers * per_layer + dtype_bytes * counts.unquantized + vision


def target_modules(arch: Architecture, targets: str) -> list[LinearShape]:
    """The linear layers LoRA adapts: attention projections, or every linear layer of a block."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    return [m for m in arch.linear_layers() if targets == "all" or m.group == "attention"]


def lora_params(arch: Architecture, rank: int, targets: str = "attention") -> int:
    """LoRA adds A (rank x in) and B (out x rank) to each targeted linear layer of every block."""
    return arch.num_layers * sum(rank * (m.in_features + m.out_features) for m in target_modules(arch, targets))


def _lora_tensor_sizes(arch: Architecture, rank: int, targets: str) -> list[int]:
    sizes = []
    for m in target_modules(arch, targets):
        sizes += [rank * m.in_features, rank * m.out_features]
    return sizes * arch.num_layers


def optimizer_bytes(tensor_sizes: list[int], optimizer: str) -> int:
    """AdamW keeps two states per trainable value.

    adamw_torch: two fp32 states (8 B) + one fp32 temporary during the foreach step (4 B).
    adamw_torch_fused: two fp32 states (8 B); torch's fused kernel updates each tensor in place.
    adamw_8bit / paged_adamw_8bit: two 8-bit states (2 B) + one fp32 absmax per 256 values per state;
    tensors under 4096 values keep 32-bit states (8 B)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    total = 0
    for n in tensor_sizes:
        if optimizer == "adamw_torch":
            total += 8 * n + 4 * n
        elif optimizer == "adamw_torch_fused":
            total += 8 * n
        elif n < OPT8_MIN_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * math.ceil(n / OPT8_BLOCK)
    return total


def layer_activation_bytes_per_token(
    arch: Architecture, *, c: int, hb: int, rank: int, targets: str | None, attention: str, seq: int, padded: bool,
) -> int:
    """Bytes autograd keeps for backward per token in one decoder layer.

    c  = bytes of the compute dtype (2 for bf16/fp16 autocast, 4 for fp32)
    hb = bytes of the residual stream (the dtype the model is loaded in: c for (Q)LoRA, 4 for an fp32 full fine-tune)
    targets = the LoRA targets ("attention"/"all"), or None for a full fine-tune (every linear trains).

    A frozen linear (4-bit or 16-bit) keeps no input for backward (bitsandbytes' MatMul4Bit saves only the
    weight); an adapted one keeps its input for LoRA A, and a trained one for its weight gradient.
    """
    h, q, kv, inter, nh = arch.hidden_size, arch.q_dim, arch.kv_dim, arch.intermediate_size, arch.num_heads
    full = targets is None
    adapted = {m.name for m in arch.linear_layers()} if full else {m.name for m in target_modules(arch, targets)}
    attn_input_read = full or bool(adapted & {"q_proj", "k_proj", "v_proj", "qkv_proj"})
    mlp_input_read = full or bool(adapted & {"gate_proj", "up_proj", "gate_up_proj"})
    gqa = arch.num_kv_heads < arch.num_heads
    total = 0
    # Pre-norms (RMSNorm computes in fp32): the fp32 input (4 B), and the normed output when an adapted
    # or trained linear reads it.
    total += 4 * h + (hb * h if attn_input_read else 0)
    total += 4 * h + (hb * h if mlp_input_read else 0)
    # Gemma-2's post-norms add only their fp32 input (their output goes into the residual sum).
    total += (arch.norms_per_layer - 2) * 4 * h
    # Qwen3 q_norm/k_norm: fp32 copies of q and k.
    if arch.qk_norm:
        total += 4 * q + 4 * kv
    # Attention inputs kept for backward: q after RoPE; k and v, repeated to every head when a padding
    # mask makes transformers' SDPA path expand grouped-query heads (eager always expands).
    expand_kv = gqa and (attention == "eager" or padded)
    kv_kept = q if expand_kv else kv
    total += c * q + c * kv_kept  # q, k after RoPE
    total += c * (q + 2 * kv) if (arch.fused_qkv and not expand_kv) else c * kv_kept  # v (a view of qkv_proj's output for Phi-3)
    if attention in ("sdpa", "packed_sdpa"):
        total += c * q  # the attention output: SDPA keeps it for backward (o_proj reads the same tensor)
        total += 4 * nh  # log-sum-exp per head (fp32)
        if padded:
            total += c * seq  # the boolean padding mask becomes a float bias kept by each layer: b x s x s
        if attention == "packed_sdpa" and (full or "o_proj" in adapted):
            total += c * q  # SDPA keeps each example's output; o_proj reads their joined copy
    else:
        # eager: softmax probabilities in fp32 and their compute-dtype copy, b x heads x s x s
        total += (4 + c) * nh * seq
        if arch.final_logit_softcap:
            total += c * nh * seq  # Gemma-2 soft-capping: tanh output of the scores
        if full or "o_proj" in adapted:
            total += c * q  # the attention output, read by an adapted o_proj
    # Gated MLP: gate output, activation output, up output; their product when down_proj is adapted.
    total += 3 * c * inter + (c * inter if (full or "down_proj" in adapted) else 0)
    # LoRA: the rank-sized output of each A, read by B.
    if not full:
        total += c * rank * len(adapted)
    # Full fine-tune under autocast: each linear reading the fp32 normed stream keeps a compute-dtype copy.
    if full and hb != c:
        readers = sum(1 for m in arch.linear_layers() if m.in_features == h and m.name != "o_proj")
        total += c * h * readers
    return total


def layer_backward_transient_per_token(arch: Architecture, *, c: int, hb: int) -> int:
    """Gradients alive while one layer runs backward: the MLP's intermediate gradients (two of size
    intermediate in the compute dtype) and the residual-stream gradient and its update (two of size hidden)."""
    return 2 * c * arch.intermediate_size + 2 * hb * arch.hidden_size


def logits_bytes_per_element(arch: Architecture, c: int) -> int:
    """Bytes per batch x seq x vocab element at the loss peak. Gemma-2's soft-capping keeps one more
    compute-dtype tensor (the tanh output)."""
    return LOGITS_BYTES_PER_ELEMENT + (c if arch.final_logit_softcap else 0)


# ------------------------------------------------------------------ the estimate

def estimate(
    arch: Architecture,
    *,
    method: str = "qlora",
    quant: str | None = None,
    double_quant: bool = True,
    rank: int = 16,
    targets: str = "attention",
    batch: int = 1,
    seq: int = 512,
    grad_checkpointing: bool = True,
    optimizer: str = "paged_adamw_8bit",
    attention: str = "sdpa",
    compute_dtype: str = "bf16",
    calibrated: bool = False,
    gpu_name: str | None = None,
    decoded_weights: bool = False,
) -> MemoryBreakdown:
    """Peak GPU memory of a training step of ``arch`` with these settings.

    ``method`` says what trains: "qlora"/"lora" train LoRA adapters on a frozen base, "full" trains every
    weight. ``quant`` says how the base is stored: "nf4"/"fp4" (4-bit) or "none" (16-bit); None means
    nf4 for qlora and none otherwise. qlora with quant "none" is plain LoRA; lora with a 4-bit quant is
    QLoRA. A full fine-tune of a 4-bit base is refused.

    ``decoded_weights=True`` adds a copy of every 4-bit weight decoded into the compute dtype, as a
    run keeps them on the CPU (`decoded.keep_decoded`).

    ``calibrated=True`` scales every item by this machine's factor for ``gpu_name`` (or the first
    detected GPU) from :func:`calibration_factor`.

    One long function on purpose: the items are computed in the order of the module docstring, each
    from intermediate terms of the ones before (tokens, the compute dtype's bytes, the per-layer
    activations), and the ``assumptions`` list is written in the same order; split up, those terms
    would travel between a dozen small functions and the walk from settings to bytes would be harder
    to check against the tests' hand counts.
    """
    _check_choice("method", method, METHODS)
    if quant is None:
        quant = "nf4" if method == "qlora" else "none"
    _check_choice("quant", quant, QUANTS)
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("attention", attention, ATTENTIONS)
    _check_choice("targets", targets, TARGETS)
    _check_choice("compute_dtype", compute_dtype, tuple(COMPUTE_DTYPES))
    for name, value in (("rank", rank), ("batch", batch), ("seq", seq)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if method == "full" and quant != "none":
        raise ValueError("a full fine-tune trains every weight, which cannot stay 4-bit: use quant='none'")
    if method != "full":
        method = "lora" if quant == "none" else "qlora"

    c = COMPUTE_DTYPES[compute_dtype]
    full = method == "full"
    assumptions: list[str] = []
    if arch.model_type == "gemma2" and attention == "sdpa":
        attention = "eager"  # transformers refuses SDPA for Gemma-2 (soft-capping); flash-attn 2 is not assumed
        assumptions.append("Gemma-2 runs eager attention in transformers (its soft-capping has no SDPA path)")
    counts = arch.param_counts()
    L, h, V = arch.num_layers, arch.hidden_size, arch.vocab_size
    tokens = batch * seq
    padded = batch > 1 and attention != "packed_sdpa"  # a padded batch carries a mask; packed rows need none

    # ---- weights
    if full:
        hb = 4  # fp32 master weights: the residual stream is fp32, linears run in the compute dtype
        # fp32 masters (4 B) + the compute-dtype copies autocast makes and backward keeps: all layers,
        # or one layer at a time with checkpointing (+ the lm_head/embeddings outside the checkpoints).
        one_layer = counts.quantizable // L
        copies = (one_layer if grad_checkpointing else counts.quantizable) + counts.embeddings + counts.lm_head
        weights = 4 * counts.total + c * copies
        assumptions.append(
            f"full fine-tune: fp32 master weights (4 B/param) with {compute_dtype} autocast, whose weight copies "
            f"add {_gib(c * copies)} while backward needs them")
    else:
        hb = c
        weights = weights_bytes(arch, quant, double_quant, dtype_bytes=c)
        if arch.vision_params:
            assumptions.append(f"the checkpoint's vision encoder ({arch.vision_params / 1e6:.0f}M params) is loaded "
                               f"{8 * c}-bit and never run by text training")
        if quant == "none":
            assumptions.append(f"LoRA on a {8 * c}-bit base: every weight at {c} B/param")
        else:
            per_param = (quantized_linear_bytes(10**9, double_quant) / 1e9)
            scales = ("8-bit absmax per 64 weights + fp32 scale per 256 absmax (double quantization)"
                      if double_quant else "fp32 absmax per 64 weights")
            assumptions.append(
                f"{quant.upper()} base: {counts.quantizable / 1e9:.2f}B linear weights at {per_param:.4f} B/param "
                f"(0.5 B + {scales}); embeddings, lm_head, norms and biases "
                f"({counts.unquantized / 1e6:.0f}M params) stay {8 * c}-bit")
            if decoded_weights:
                weights += c * counts.quantizable
                assumptions.append(f"the 4-bit weights are also kept decoded, {8 * c}-bit: "
                                   f"+{_gib(c * counts.quantizable)}")
            if c == 2:
                assumptions.append(
                    "peft's prepare_model_for_kbit_training would upcast those 16-bit modules to fp32: "
                    f"+{_gib(2 * counts.unquantized)}")

    # ---- trainable parameters: adapters, gradients, optimizer
    if full:
        trainable = counts.total
        adapters = 0
        sizes = [trainable]  # one big group: every tensor is far above the 8-bit optimizer's minimum size
        assumptions.append("gradients fp32 (4 B/param)")
    else:
        trainable = lora_params(arch, rank, targets)
        # fp32 masters (4 B) + the compute-dtype copies autocast makes in the forward and backward keeps
        adapters = 4 * trainable + (c * trainable if c < 4 else 0)
        sizes = _lora_tensor_sizes(arch, rank, targets)
        modules = ", ".join(m.name for m in target_modules(arch, targets))
        assumptions.append(
            f"LoRA r={rank} on {modules} in every layer: {trainable / 1e6:.1f}M params kept fp32 (4 B)"
            + (f" plus the {compute_dtype} copies autocast makes for the forward ({c} B)" if c < 4 else "")
            + "; fp32 gradients; lora_dropout 0 (dropout > 0 keeps a copy of each adapted input)")
    gradients = 4 * trainable
    optimizer_total = optimizer_bytes(sizes, optimizer)
    if optimizer == "adamw_torch":
        assumptions.append("AdamW 32-bit: two fp32 states (8 B/param) + an fp32 temporary in the foreach step")
    elif optimizer == "adamw_torch_fused":
        assumptions.append("AdamW 32-bit, torch's fused kernel: two fp32 states (8 B/param), updated in place")
    else:
        assumptions.append("AdamW 8-bit (bitsandbytes): ~2 B/param + block scales")
        if optimizer.startswith("paged"):
            assumptions.append(
                "paged optimizer states live in CUDA unified memory: nvidia-smi counts them, "
                "torch.cuda.max_memory_reserved does not; under pressure they move to CPU RAM")

    # ---- activations
    per_layer = layer_activation_bytes_per_token(
        arch, c=c, hb=hb, rank=rank, targets=None if full else targets, attention=attention, seq=seq,
        padded=padded)
    transient = layer_backward_transient_per_token(arch, c=c, hb=hb)
    final_norm = 4 * h + hb * h  # the final RMSNorm's fp32 input and output
    rope = 2 * c * arch.head_dim  # cos and sin, shared by every layer
    shared_mask = (seq if attention != "eager" else c * seq) if padded else 0  # b x s x s mask, shared
    logits_per_token = logits_bytes_per_element(arch, c) * V
    if grad_checkpointing:
        kept = L * hb * h  # each layer's input, saved by its checkpoint
        recompute = per_layer + transient  # one layer re-run in backward, while its gradients flow
    else:
        kept = L * per_layer
        recompute = transient
    kept += final_norm + rope + shared_mask
    logits = tokens * logits_per_token
    # The loss peak (start of backward) and the layer-by-layer backward never coincide: the logits and
    # their gradients are freed before the first layer runs backward. Only the excess counts.
    recompute_excess = max(0, tokens * recompute - logits)
    activations = tokens * kept + recompute_excess

    if grad_checkpointing:
        assumptions.append(
            f"gradient checkpointing: each of the {L} layers keeps its {compute_dtype if hb == c else 'fp32'} input "
            f"({_gib(tokens * L * hb * h)}); one layer is recomputed at a time "
            f"({_gib(tokens * recompute)}, "
            + ("inside the logits peak)" if recompute_excess == 0 else "above the logits peak)"))
    else:
        assumptions.append(
            f"no gradient checkpointing: every layer keeps its activations ({per_layer / 1024:.0f} KiB per token per layer)")
    if attention == "packed_sdpa":
        assumptions.append("packed_sdpa: SDPA run on each packed example (no mask, no seq x seq scores kept)")
    elif attention == "sdpa":
        assumptions.append("SDPA attention (flash / memory-efficient kernels): no seq x seq scores kept")
    else:
        assumptions.append(
            f"eager attention: softmax scores b x heads x s x s kept in fp32 + {compute_dtype} "
            f"({_gib(batch * arch.num_heads * seq * seq * (4 + c))} per layer)")
    assumptions.append(
        f"every sequence padded to {seq} tokens (batch {batch}); dynamic padding or shorter samples use less"
        + ("; the padding mask makes SDPA expand k/v heads and keep a float mask per layer"
           if padded and attention == "sdpa" else ""))
    assumptions.append(
        f"loss: logits upcast to fp32; log-probs + their gradients ≈ {logits_bytes_per_element(arch, c)} B per "
        f"batch x seq x vocab element ({V} vocab); the loop drops the model output before backward, as the Trainer does")

    # ---- overhead
    if quant != "none":
        largest = max(m.weight_params for m in arch.linear_layers())
        dequant = c * largest  # a 4-bit layer is dequantized to the compute dtype for each matmul
    else:
        dequant = 0
    slack = int(ALLOCATOR_SLACK * (activations + logits))
    overhead = CUDA_CONTEXT_BYTES + dequant + slack
    assumptions.append(
        f"overhead: CUDA context {CUDA_CONTEXT_BYTES // MiB} MiB"
        + (f" + the largest layer dequantized for its matmul ({dequant / MiB:.0f} MiB)" if dequant else "")
        + f" + {ALLOCATOR_SLACK:.0%} allocator slack on activations and logits")

    breakdown = {
        "weights": int(weights),
        "adapters": int(adapters),
        "optimizer": int(optimizer_total),
        "gradients": int(gradients),
        "activations": int(activations),
        "logits": int(logits),
        "overhead": int(overhead),
    }
    if calibrated:
        factor, label = _factor_for(gpu_name)
        if factor != 1.0:
            breakdown = {k: int(round(v * factor)) for k, v in breakdown.items()}
        assumptions.append(label)

    settings = dict(method=method, quant=quant, double_quant=double_quant, rank=rank, targets=targets,
                    batch=batch, seq=seq, grad_checkpointing=grad_checkpointing, optimizer=optimizer,
                    attention=attention, compute_dtype=compute_dtype)
    return MemoryBreakdown(
        model=arch.name,
        total_bytes=sum(breakdown.values()),
        breakdown=breakdown,
        assumptions=assumptions,
        settings=settings,
        params_total=counts.total,
        params_trainable=trainable,
    )


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


# ------------------------------------------------------------------ calibration on this machine

CALIBRATION_FILE = "calibration.json"


def _calibration_path() -> Path:
    from .home import studio_home

    return studio_home() / CALIBRATION_FILE


def _read_measurements(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    items = data.get("measurements", []) if isinstance(data, dict) else []
    return [m for m in items if isinstance(m, dict)]


def record_measurement(estimated_bytes: int, measured_bytes: int, gpu_name: str, **details) -> None:
    """Append one finished run's estimate and measured peak to the studio home's calibration file."""
    if estimated_bytes <= 0 or measured_bytes <= 0:
        raise ValueError("estimated_bytes and measured_bytes must be positive")
    path = _calibration_path()
    items = _read_measurements(path)
    items.append({
        "gpu": gpu_name,
        "estimated_bytes": int(estimated_bytes),
        "measured_bytes": int(measured_bytes),
        "ratio": measured_bytes / estimated_bytes,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **details,
    })
    atomic_write_json(path, {"measurements": items})  # a crash never leaves half a file


def calibration_factor(gpu_name: str) -> float:
    """Median of measured/estimated over this GPU's recorded runs, clamped to [0.8, 1.5]; 1.0 without any."""
    wanted = gpu_name.strip().lower()
    ratios = [float(m["ratio"]) for m in _read_measurements(_calibration_path())
              if str(m.get("gpu", "")).strip().lower() == wanted and isinstance(m.get("ratio"), (int, float))
              and m["ratio"] > 0]
    if not ratios:
        return 1.0
    lo, hi = CALIBRATION_CLAMP
    return min(hi, max(lo, statistics.median(ratios)))


def calibration_summary(gpu_name: str) -> str | None:
    """How the estimate for ``gpu_name`` is calibrated, for a person; None when no run was recorded."""
    wanted = gpu_name.strip().lower()
    n = sum(1 for m in _read_measurements(_calibration_path()) if str(m.get("gpu", "")).strip().lower() == wanted)
    if not n:
        return None
    return (f"calibrated: scaled by {calibration_factor(gpu_name):.3f}, the median measured/estimated ratio of "
            f"{n} finished run{'s' if n != 1 else ''} on this card")


def _factor_for(gpu_name: str | None) -> tuple[float, str]:
    if gpu_name is None:
        from .hardware import detect_gpus

        gpus = detect_gpus()
        if not gpus:
            return 1.0, "no calibration: no GPU detected"
        gpu_name = gpus[0].name
    factor = calibration_factor(gpu_name)
    if factor == 1.0:
        return 1.0, f"no calibration recorded for {gpu_name} yet"
    return factor, f"scaled by {factor:.3f}, the median measured/estimated ratio of runs on {gpu_name}"
