"""LoRA dropout whose masks cost a third of torch's on the CPU (``dropout_masks: 16bit``).

peft applies ``nn.Dropout`` to each adapter's input: one fresh mask per adapted layer per forward, 210 of
them a step for the embedded model with every linear layer adapted. On the CPU, torch draws each mask
element from its Mersenne Twister one at a time (``bernoulli_``, on one thread): LoRA dropout 0.05 made the
embedded model's forward and backward passes 1.4x slower than no dropout. `Dropout16` draws 64
random bits at a time from the same generator and reads them as four 16-bit numbers: an element is dropped
when its number falls under ``round(p * 65536)``. So the drop probability is ``p`` rounded to 1/65536 (0.05
becomes 0.0500031), the kept elements are scaled by 1 / (1 - that probability), so the expected output
is the input exactly, and each element is dropped independently, as with ``nn.Dropout``. The mask is kept
for the backward pass as one byte per element (torch keeps a 4-byte float).

Measured on a 2-core AVX2 CPU, a mask for 600 tokens x 576 features: ``F.dropout`` 2.54 ms; 64-bit draws
0.46 ms, the comparison 0.11 ms, the scaling 0.18 ms. Forward and backward passes of the embedded model
(the same model, alternating): 1.19-1.23x torch's; one epoch of the demo data (benchmarks/throughput.py,
"ours, dropout masks from torch"): 1.09-1.11x.

The mask is kept as 0/1 bytes (uint8), not as bools: torch's CPU kernels for bool tensors are not
vectorized. On a 2-core AVX-512 CPU, 700 x 576 elements: the comparison written into bytes 31-33 us
against 106-113 us into bools; ``x * mask * scale`` with the byte mask cast to x's dtype 70-79 us in fp32
and 112-113 us in bf16, against 184-202 and 299-303 us for ``native_dropout_backward`` with the bool mask.
The outputs and gradients are bit for bit the same; whole training steps differed by less than that
machine's noise.

The random numbers come from torch's default generator, so a run's seed and a resumed checkpoint's saved
RNG state decide the masks, as they do torch's.
"""

from __future__ import annotations

import torch

SCALE = 1 << 16  # 16-bit draws


class _Dropout16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold: int, scale: float):
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
        # int16 draws are uniform on [-32768, 32767]; the mask is 0/1 bytes, not bools (see the module)
        keep = torch.ge(bits.view(torch.int16)[:n].view(x.shape), threshold,
                        out=torch.empty(x.shape, dtype=torch.uint8, device=x.device))
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked(x, keep, scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _masked(grad, keep, ctx.scale), None, None


def _masked(x, keep, scale: float):
    """``x * keep * scale``: the 0/1 mask cast to x's dtype, so both products are same-dtype kernels."""
    return torch.mul(x, keep.to(x.dtype)).mul_(scale)


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
