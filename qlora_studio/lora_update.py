"""The LoRA update added to the base layer's output in one matrix product (``lora_update: fused``).

peft's LoRA layer computes ``result = base(x)``, copies it (``result.clone()``, a defensive copy in its 4-bit
layer), computes ``lora_B(lora_A(dropout(x)))`` into a new tensor, multiplies that by the scaling into
another, and adds the two into a third: five passes over a (tokens x out_features) tensor after the base
layer's own, in the forward pass, and one more (the scaling) in backward. On the CPU these passes over
memory cost more than the adapters' small matrix products. `fused_forward` computes the same sum with one
``torch.addmm(base(x), h, B.T, alpha=scaling)``, ``h = lora_A(dropout(x))`` as peft computes it: the base
output is read once and the sum written once, and the scaling is applied to the small products in
backward. The sum is rounded once, where peft rounds the product and the sum (under bf16 autocast each is
a bf16 tensor), so results match peft's up to that rounding.

Measured on a 2-core AVX512-BF16 EPYC under bf16 autocast (benchmarks/lever_ab.py --lever fused, the
embedded model, 4 batches of alpaca rows per sample, two processes): 0.973 +- 0.020 (8 samples) and
0.982 +- 0.009 (10 samples, 9 faster) of the time with peft's layer, about 2%. In fp32 the two give the same
numbers bit for bit. Under bf16 autocast they differ by rounding: against the same model computed in fp32
(three texts of 400 tokens), the adapters' gradients were 0.058, 0.072 and 0.042 off (relative norm)
fused and 0.057, 0.089 and 0.045 with peft's layer; the losses 0.0023, 0.0026 and 0.0064 off fused and
0.0025, 0.0004 and 0.0012 with peft's: neither is the more accurate.

It is used for a layer with one active adapter of plain LoRA (no DoRA or other variant, no bias on B, not
merged, no per-example adapters); anything else takes peft's own forward, as does a layer whose inputs
peft would convert (no autocast and an input dtype other than the adapter's).
"""

from __future__ import annotations

import types

import torch

from .dropout import Dropout16


def _fusable(layer, x, args, kwargs) -> str | None:
    """The active adapter's name when the fused path computes what peft's would, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    if layer.lora_B[name].bias is not None:
        return None
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != layer.lora_A[name].weight.dtype:
        return None  # peft converts the input and the output here
    return name


def fused_forward(self, x, *args, **kwargs):
    name = _fusable(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    dropout = self.lora_dropout[name]
    if isinstance(dropout, Dropout16):  # its 1 / (1 - p) goes into alpha: one pass less each way
        dropped, scale = dropout.unscaled(x)
    else:
        dropped, scale = dropout(x), 1.0
    h = self.lora_A[name](dropped)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                      self.lora_B[name].weight.t(), alpha=self.scaling[name] * scale)
    return out.view(result.shape)


def fuse(model) -> int:
    """Give each peft LoRA linear layer (16-bit or bitsandbytes 4-bit base) `fused_forward`; the number of
    layers. Merging (``merge_and_unload``) replaces the layers, and the fused forward with them."""
    from peft.tuners.lora.layer import Linear

    kinds = [Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # bitsandbytes not installed
        pass
    else:
        kinds.append(Linear4bit)
    n = 0
    for module in model.modules():
        if type(module) in kinds:
            module.forward = types.MethodType(fused_forward, module)
            n += 1
    return n


def unfuse(model) -> None:
    """peft's own forward again (for comparisons)."""
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is fused_forward:
            del module.forward
