"""LoRA dropout whose masks cost a fraction of torch's on the CPU (``dropout_masks: 16bit``).

peft applies ``nn.Dropout`` to each adapter's input: one fresh mask per adapted layer per forward, 210 of
them a step for the embedded model with every linear layer adapted. On the CPU, torch draws each mask
element from its Mersenne Twister one at a time (``bernoulli_``, on one thread): LoRA dropout 0.05 made the
embedded model's forward and backward passes 1.4x slower than no dropout. `Dropout16` reads each 64-bit
random number as four 16-bit numbers: an element is dropped when its number falls under
``round(p * 65536)``. So the drop probability is ``p`` rounded to 1/65536 (0.05 becomes 0.0500031), the
kept elements are scaled by 1 / (1 - that probability), so the expected output is the input exactly, and
each element is dropped independently, as with ``nn.Dropout``.

The 64-bit numbers are SplitMix64's (`random_bits`): its mixing function applied to the counters
``seed + i * gamma``, the way Java's SplittableRandom draws, computed with torch's elementwise kernels, which
run on every core where the Mersenne Twister runs on one. The seed is one draw from torch's default generator
per mask, so a run's seed and a resumed checkpoint's saved RNG state decide the masks, as they do torch's. For
a 16-bit input the mask is made in its dtype (0 and 1, exact), so that neither pass casts it; wider inputs
keep it as one byte an element (bytes, not bools: torch's CPU kernels for bools are not vectorized; for 700 x
576 elements the comparison took 31-33 us into bytes, 106-113 us into bools). The fused LoRA update
(`lora_update`) applies the 1 / (1 - p) to the adapter's small products (`Dropout16.unscaled`) instead of a
pass over the input each way.

Measured on a 2-core AVX512-BF16 EPYC, a mask for 878 tokens x 576 features (126,000 64-bit numbers): the
Mersenne Twister's 64-bit draws 363-411 us, SplitMix64 240-241 us. Drawing the mask and applying it forward
and backward, three runs of the same alternating comparison: 1,575, 1,739 and 792 us the previous way
(Mersenne Twister, a byte mask cast to bf16 and a scaling pass each way), 468, 496 and 457 us now (the
machine's speed varied between the runs). Training (benchmarks/lever_ab.py, the embedded model under bf16
autocast, 4 batches of alpaca rows per sample, 8 samples alternating): 0.949 +- 0.015 of the time with the
previous masks (Mersenne Twister draws, a byte mask, the scaling as a pass); 0.805 +- 0.003 of the time
with torch's ``nn.Dropout`` (6 samples, every one faster).
"""

from __future__ import annotations

import torch

SCALE = 1 << 16  # 16-bit draws

# SplitMix64 (Steele, Lea and Flood 2014; the mixing constants of Stafford's "Mix13"), in int64 two's complement
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIXES = ((30, 0xBF58476D1CE4E5B9 - (1 << 64)), (27, 0x94D049BB133111EB - (1 << 64)), (31, None))
_COUNTERS: dict = {}  # CPU: arange(n) * golden gamma, kept and grown as needed


def random_bits(n: int, device, seed: int | None = None):
    """``n`` random 64-bit numbers (int64): SplitMix64's output for the counters ``seed + i * gamma``, computed
    with torch's elementwise kernels (on every core). The seed is one draw from torch's default generator, so
    ``torch.manual_seed`` and a checkpoint's saved RNG state decide the numbers."""
    if seed is None:
        seed = int(torch.empty((), dtype=torch.int64).random_(-2**63, None))
    device = torch.device(device)
    if device.type == "cpu":
        base = _COUNTERS.get("cpu")
        if base is None or base.numel() < n:
            base = _COUNTERS["cpu"] = torch.arange(max(n, 2 * (0 if base is None else base.numel())),
                                                   dtype=torch.int64).mul_(_GOLDEN)
        z = base[:n] + seed
    else:
        z = torch.arange(n, dtype=torch.int64, device=device).mul_(_GOLDEN).add_(seed)
    shifted = torch.empty_like(z)
    for shift, mix in _MIXES:  # z ^= z >> shift (logical: the arithmetic shift's sign bits masked off)
        z.bitwise_xor_(torch.bitwise_right_shift(z, shift, out=shifted).bitwise_and_((1 << (64 - shift)) - 1))
        if mix is not None:
            z.mul_(mix)
    return z


def keep_mask(x, threshold: int):
    """0/1 per element of ``x``, 1 where its 16-bit number is at least ``threshold`` (numbers uniform on
    [-32768, 32767]): in x's dtype for 16-bit x (multiplied without a cast), else one byte an element."""
    n = x.numel()
    bits = random_bits((n + 3) // 4, x.device)
    dtype = x.dtype if x.element_size() <= 2 else torch.uint8
    return torch.ge(bits.view(torch.int16)[:n].view(x.shape), threshold,
                    out=torch.empty(x.shape, dtype=dtype, device=x.device))


class _Dropout16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold: int, scale: float):
        keep = keep_mask(x, threshold)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked(x, keep, scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _masked(grad, keep, ctx.scale), None, None


def _masked(x, keep, scale: float):
    """``x * keep * scale``, the byte mask cast to x's dtype so that both products are same-dtype kernels; no
    scaling pass when ``scale`` is 1 (the fused LoRA update applies it to the small products instead)."""
    out = torch.mul(x, keep if keep.dtype == x.dtype else keep.to(x.dtype))
    return out if scale == 1 else out.mul_(scale)


class Dropout16(torch.nn.Module):
    """Dropout with probability ``p`` rounded to 1/65536, drawn 16 bits per element (see the module)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability {p} is not in [0, 1)")
        self.dropped = round(p * SCALE)
        self.p = self.dropped / SCALE
        self.scale = 1 / (1 - self.p)

    def forward(self, x):
        if not self.training or self.dropped == 0:
            return x
        return _Dropout16.apply(x, self.dropped - SCALE // 2, self.scale)

    def unscaled(self, x):
        """``(x * mask, scale)``: the dropout without its 1 / (1 - p), for a caller that applies it later."""
        if not self.training or self.dropped == 0:
            return x, 1.0
        return _Dropout16.apply(x, self.dropped - SCALE // 2, 1.0), self.scale

    def extra_repr(self) -> str:
        return f"p={self.p:.7g}"


def use_16bit_masks(model) -> int:
    """Replace the ``nn.Dropout`` in each peft LoRA layer (its ``lora_dropout`` ModuleDict) with `Dropout16`
    of the same probability; returns how many were replaced. Layers without dropout (``nn.Identity``) stay."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is torch.nn.Dropout:
                dropouts[name] = Dropout16(dropout.p)
                replaced += 1
    return replaced
