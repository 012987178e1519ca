"""What to train on a card: the largest catalog model that fits with headroom, and its settings.

`recommend` tries the catalog's models from the largest down with the settings a newcomer should use
(NF4 + double quantization, LoRA r16 on all linear layers, gradient checkpointing, paged 8-bit AdamW,
the card's precision from `plan.precision_for`) and returns a `Recommendation`. It proposes the instruct
model of an entry, and prefers models that download without an account: a gated one (Llama, Gemma,
Mistral: accept the licence on the Hub first) is proposed only when no open model fits, and is marked so;
a larger gated model that also fits is mentioned in a note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .catalog import CATALOG, GATED_NOTE, Architecture
from .estimator import HEADROOM, GiB, MemoryBreakdown, _gib, calibration_summary, estimate, fits


@dataclass
class Recommendation:
    """What to train on a card: the largest catalog model that fits with headroom, and its settings.
    ``model`` is None when nothing fits; ``suggestions`` then says what to change."""

    gpu_name: str | None
    vram_bytes: int  # the card's total memory
    usable_bytes: int  # what the plan may use: free memory when known, else total
    headroom: float
    model: str | None = None
    params: int | None = None
    hub_id: str | None = None  # the instruct model to download
    licence: str | None = None
    gated: bool = False  # the Hub asks you to accept the licence before the download
    method: str = "qlora"
    quant: str = "nf4"
    double_quant: bool = True
    rank: int = 16
    targets: str = "all"
    batch: int = 1
    grad_accum: int = 16
    seq: int = 512
    grad_checkpointing: bool = True
    optimizer: str = "paged_adamw_8bit"
    compute_dtype: str = "bf16"
    estimate: MemoryBreakdown | None = None
    notes: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.model is not None

    def to_dict(self) -> dict:
        return {
            "gpu": self.gpu_name,
            "vram_bytes": self.vram_bytes,
            "usable_bytes": self.usable_bytes,
            "headroom": self.headroom,
            "model": self.model,
            "params": self.params,
            "hub_id": self.hub_id,
            "licence": self.licence,
            "gated": self.gated,
            "method": self.method,
            "quant": self.quant,
            "double_quant": self.double_quant,
            "rank": self.rank,
            "targets": self.targets,
            "batch": self.batch,
            "grad_accum": self.grad_accum,
            "seq": self.seq,
            "grad_checkpointing": self.grad_checkpointing,
            "optimizer": self.optimizer,
            "compute_dtype": self.compute_dtype,
            "estimate": self.estimate.to_dict() if self.estimate else None,
            "notes": list(self.notes),
            "suggestions": list(self.suggestions),
        }

    def text(self) -> str:
        card = f"{self.gpu_name}, " if self.gpu_name else ""
        lines = [f"Card: {card}{_gib(self.vram_bytes)} total, {_gib(self.usable_bytes)} usable"]
        if self.fits:
            assert self.estimate is not None
            lines += [
                f"Recommended: {self.model} ({self.params / 1e9:.2f}B params)"
                + (f"; {GATED_NOTE}" if self.gated else ""),
                f"  download: {self.hub_id} ({self.licence or 'licence unknown'}"
                + (" licence)" if self.gated else ", open download)"),
                f"  {self.quant.upper()}{' + double quant' if self.double_quant else ''}, LoRA r={self.rank} on "
                f"{self.targets} linear layers, {self.compute_dtype} compute",
                f"  batch {self.batch} x grad accumulation {self.grad_accum} (effective {self.batch * self.grad_accum}), "
                f"seq {self.seq}, gradient checkpointing {'on' if self.grad_checkpointing else 'off'}, {self.optimizer}",
                f"  estimated peak {_gib(self.estimate.total_bytes)} of {_gib(self.usable_bytes)} "
                f"({self.estimate.total_bytes / self.usable_bytes:.0%})",
            ]
        else:
            lines.append("Nothing in the catalog fits.")
        lines += [f"Note: {n}" for n in self.notes]
        lines += [f"Try: {s}" for s in self.suggestions]
        return "\n".join(lines)


def _recommendable(prefer_open: bool = True) -> list[Architecture]:
    """The candidates in the order they are tried: largest first; open downloads before gated ones."""
    by_size = sorted((a for a in CATALOG if a.recommendable), key=lambda a: a.total_params, reverse=True)
    if not prefer_open:
        return by_size
    return [a for a in by_size if not a.gated] + [a for a in by_size if a.gated]


def recommend(
    gpu_or_vram_bytes,
    *,
    seq: int = 512,
    free_bytes: int | None = None,
    headroom: float = HEADROOM,
    effective_batch: int = 16,
    prefer_open: bool = True,
) -> Recommendation:
    """The largest catalog model that trains on this card with ``headroom`` to spare (estimate x 1.25 <=
    usable memory by default, i.e. 20% of the card left free), in NF4 with double quantization, LoRA r=16
    on all linear layers, gradient checkpointing and paged 8-bit AdamW; with the largest batch (up to 8)
    that still fits and gradient accumulation up to ``effective_batch``.

    ``gpu_or_vram_bytes`` is a detected :class:`~qlora_studio.hardware.GpuInfo` (its free memory counts),
    a catalog :class:`~qlora_studio.hardware.GpuSpec`, or a number of bytes. ``free_bytes``, when given,
    replaces the total as the usable memory. More memory never yields a smaller model: the candidates are
    tried from the largest down with the same settings, so the set that fits only grows with memory.

    ``prefer_open`` (the default) tries every model that downloads without an account before any gated one,
    so a gated model is recommended only when no open one fits; False ranks them by size alone. Either way a
    gated recommendation carries ``gated=True`` and its text says to accept the licence on the Hub first.
    """
    from .hardware import GpuInfo, GpuSpec
    from .plan import precision_for

    gpu_name = None
    cc = None
    other = None
    if isinstance(gpu_or_vram_bytes, GpuInfo):
        g = gpu_or_vram_bytes
        gpu_name, total, cc, other = g.name, g.total_bytes, g.compute_capability, g.other_processes_bytes
        if free_bytes is None:
            free_bytes = g.free_bytes
    elif isinstance(gpu_or_vram_bytes, GpuSpec):
        gpu_name, total, cc = gpu_or_vram_bytes.label, gpu_or_vram_bytes.vram_bytes, gpu_or_vram_bytes.compute_capability
    elif isinstance(gpu_or_vram_bytes, (int, float)) and not isinstance(gpu_or_vram_bytes, bool):
        total = int(gpu_or_vram_bytes)
    else:
        raise TypeError(f"expected a GpuInfo, a GpuSpec or a number of bytes, got {type(gpu_or_vram_bytes).__name__}")
    if total <= 0:
        raise ValueError("the card's memory must be positive")
    usable = min(total, free_bytes) if free_bytes is not None else total
    compute_dtype = precision_for("cuda", cc) if cc is not None else "bf16"

    plan = Recommendation(gpu_name=gpu_name, vram_bytes=total, usable_bytes=usable, headroom=headroom, seq=seq,
                compute_dtype=compute_dtype)
    base = dict(method="qlora", quant="nf4", double_quant=True, rank=plan.rank, targets=plan.targets,
                seq=seq, grad_checkpointing=True, optimizer=plan.optimizer, compute_dtype=compute_dtype)
    calibration = calibration_summary(gpu_name) if gpu_name else None
    if calibration:  # this card's finished runs correct every estimate below
        base.update(calibrated=True, gpu_name=gpu_name)
        plan.notes.append(f"estimates {calibration}")

    held = total - usable
    if held > max(1 * GiB, 0.10 * total):
        who = f"other processes hold {_gib(other)}" if other else f"{_gib(held)} is already in use"
        plan.notes.append(f"{who} of {_gib(total)}: the plan uses the {_gib(usable)} that are free; "
                          "closing other programs (browser, games, a second model) frees more")
    if cc is not None and tuple(cc) < (6, 0):
        plan.notes.append("bitsandbytes 4-bit needs compute capability 6.0 or newer; this card is older")
    if compute_dtype != "bf16":
        plan.notes.append(f"this card has no native bf16: train in {compute_dtype}")

    chosen = None
    for arch in _recommendable(prefer_open):
        est = estimate(arch, batch=1, **base)
        if fits(est.total_bytes, usable, headroom):
            chosen = arch
            break
    if chosen is None:
        need, plan.suggestions = _what_to_change(usable, total, seq, headroom, base)
        plan.notes.append(need)
        return plan

    batch, est = 1, estimate(chosen, batch=1, **base)
    for b in (2, 4, 8):
        candidate = estimate(chosen, batch=b, **base)
        if not fits(candidate.total_bytes, usable, headroom):
            break
        batch, est = b, candidate
    plan.model, plan.params, plan.batch, plan.estimate = chosen.name, chosen.total_params, batch, est
    plan.hub_id, plan.licence, plan.gated = chosen.instruct_id or chosen.name, chosen.licence, chosen.gated
    if not chosen.gated:
        larger = next((a for a in _recommendable(prefer_open=False) if a.gated and a.total_params > chosen.total_params
                       and fits(estimate(a, batch=1, **base).total_bytes, usable, headroom)), None)
        if larger is not None:
            plan.notes.append(f"{larger.name} ({larger.total_params / 1e9:.2f}B, {larger.instruct_id}) also fits; "
                              f"{GATED_NOTE}")
    plan.grad_accum = max(1, effective_batch // batch)
    no_ckpt = estimate(chosen, batch=batch, **{**base, "grad_checkpointing": False})
    if fits(no_ckpt.total_bytes, usable, headroom):
        plan.notes.append(f"it also fits without gradient checkpointing ({_gib(no_ckpt.total_bytes)}), "
                          "which trains about a third faster")
    plan.notes.append("NF4 is the default; if the loss spikes or turns NaN with NF4, FP4 is the fallback "
                      "(same memory)")
    return plan


def _what_to_change(usable: int, total: int, seq: int, headroom: float, base: dict) -> tuple[str, list[str]]:
    """Why nothing fits (a sentence), and what to change (a list)."""
    smallest = min((a for a in CATALOG if a.recommendable), key=lambda a: a.total_params)
    need = estimate(smallest, batch=1, **base).total_bytes
    why = (f"the smallest catalog model, {smallest.name}, needs {_gib(need)} at seq {seq} "
           f"(+{headroom:.0%} headroom = {_gib(int(need * (1 + headroom)))}); this card offers {_gib(usable)}")
    out = []
    for shorter in (1024, 512, 256, 128):
        if shorter < seq and fits(estimate(smallest, batch=1, **{**base, "seq": shorter}).total_bytes, usable, headroom):
            out.append(f"shorten sequences to {shorter} tokens: {smallest.name} then fits")
            break
    if usable < total:
        out.append(f"close other programs: {_gib(total - usable)} of this card is in use")
    out.append("train the demo model on the CPU (slow, but it works without a GPU)")
    out.append(f"use a card with at least {math.ceil(need * (1 + headroom) / GiB)} GB")
    return why, out
