"""4-bit base weights decoded once and kept, for training on the CPU (``decoded_weights``).

bitsandbytes decodes a 4-bit weight every time it is used: in each layer's forward (its double-quantized
scales first, then the NF4/FP4 values) and again in backward, for the gradient of the layer's input. On a GPU
that is what QLoRA is for: the decoded matrix lives for one matmul, so the base costs half a byte a weight.
On the CPU, RAM is rarely the limit for a model small enough to train there, and the decoding, with
bitsandbytes' Python around each call, is time the cores spend on every step. `keep_decoded` gives each
4-bit layer a forward that decodes its weight once, into the compute dtype, keeps it, and runs
``F.linear`` on it; autograd keeps a reference to it for backward instead of decoding it again.

The numbers are the same: the kept matrix is the one bitsandbytes decodes (its own ``dequantize_4bit``,
cast to the compute dtype as its backward does), the same weights QLoRA trains against, and the layer
computes ``linear(x, W, bias)`` as its forward does. The losses and every adapter gradient are bit for bit
those of bitsandbytes' path (tests/test_decoded.py). The cost is the 16-bit (or fp32) copy of every 4-bit
weight, which the plan's memory estimate counts (`estimator.estimate(decoded_weights=True)`).

Measured on a 2-core AVX512-BF16 EPYC under bf16 autocast, the embedded model with every linear layer
adapted, batches of 4 alpaca rows (benchmarks/lever_ab.py --lever decoded: the same 4 batches trained in
one process, alternating, 8 samples each): 0.921 +- 0.012 and 0.922 +- 0.019 of bitsandbytes' time (mean +- standard
error of the pairs' ratios; two sittings), every sample faster; 210 layers keep 0.2 GiB of bf16 weights.
On throughput.py's levers-off settings (padded rows, checkpointing), where a step is 3.5x longer, 4 samples
each: 0.999 +- 0.017 and 0.967 +- 0.018, a smaller gain if any.

The kept matrix is checked against the weight before each use (its storage, version, shape and the dtype
asked for): a weight replaced or changed in place (merging an adapter into it, bitsandbytes' CPU repacking)
is decoded again. Weights that are not on the CPU, or are in bitsandbytes' CPU inference layout, take
bitsandbytes' own path.
"""

from __future__ import annotations

import types

_KEPT = "_studio_decoded"  # attribute holding (key, decoded weight) on each layer


def _is_4bit(module) -> bool:
    """bitsandbytes' own 4-bit layer (peft's LoRA layer around it is also named Linear4bit: not that)."""
    from bitsandbytes.nn import Linear4bit

    return isinstance(module, Linear4bit)


def _decoded(module, dtype):
    """The layer's weight decoded into ``dtype``, kept from the last use while the weight is unchanged;
    None where bitsandbytes' own path must run."""
    weight = module.weight
    state = weight.quant_state
    if weight.device.type != "cpu" or state is None or getattr(state, "packing_format_for_cpu", False):
        return None
    key = (weight.data_ptr(), weight._version, tuple(weight.shape), dtype)
    kept = getattr(module, _KEPT, None)
    if kept is not None and kept[0] == key:
        return kept[1]
    from bitsandbytes.functional import dequantize_4bit

    decoded = dequantize_4bit(weight.data, state).to(dtype)
    setattr(module, _KEPT, (key, decoded))
    return decoded


def _forward(self, x):
    """bitsandbytes' `Linear4bit.forward`, with the kept weight in place of decoding it for this call."""
    import torch

    if not self.compute_type_is_set:  # as bitsandbytes does on a layer's first forward
        self.set_compute_type(x)
        self.compute_type_is_set = True
    dtype = self.compute_dtype or x.dtype
    weight = _decoded(self, dtype)
    if weight is None:
        return type(self).forward(self, x)
    bias = None if self.bias is None else self.bias.to(dtype)
    return torch.nn.functional.linear(x.to(dtype), weight, bias).to(x.dtype)


def keep_decoded(model) -> int:
    """Give every 4-bit layer of ``model`` the forward that keeps its decoded weight; returns how many.
    Nothing is decoded until a layer's first forward."""
    layers = 0
    for module in model.modules():
        if _is_4bit(module):
            module.forward = types.MethodType(_forward, module)
            layers += 1
    return layers


def decoded_bytes(model) -> int:
    """Bytes of the decoded weights ``model``'s layers keep now."""
    total = 0
    for module in model.modules():
        kept = getattr(module, _KEPT, None)
        if kept is not None:
            total += kept[1].numel() * kept[1].element_size()
    return total
