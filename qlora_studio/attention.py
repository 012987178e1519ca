"""``packed_sdpa``: attention for packed rows, run on each packed example alone.

`batching.PackedBatches` puts a step's examples one after another in a row, their position ids restarting
at each. transformers keeps them apart with a block-diagonal mask, but its CPU kernels (eager and SDPA)
still compute the whole row-by-row score matrix, most of it masked out: four examples of equal length
need a quarter of it. Here transformers' own SDPA attention runs once per example, causal
and without a mask, so attention costs the sum of the examples' squared lengths, not the row's.
benchmarks/throughput.py ("ours, eager attention") measures it against eager attention in the trainer.

It is registered with transformers' AttentionInterface, which is how transformers takes an attention
implementation of one's own, and loaded with ``attn_implementation="packed_sdpa"``. transformers treats a
name containing "sdpa" as an SDPA implementation (a model without SDPA support is refused when it loads),
and it builds SDPA's masks for it. Each forward that is not a packed row goes to plain SDPA with that mask:
generation with a cache, rows of one sequence, and features the per-example path
does not handle (a sliding window shorter than an example, soft-capping, attention sinks). The first forward
of a generation (the prompt, with a cache) is split too when left padding makes its positions restart;
each pad then attends to itself and the prompt's tokens to the prompt, as the padding mask has it.

On the CPU, 16-bit queries, keys and values are attended in fp32 and the result cast back (both paths, so
that a packed row and its examples alone still agree; CPU autocast is switched off around the call, since
it would cast SDPA's inputs back to bf16). torch's CPU flash-attention kernel runs slower in bf16 than in
fp32: forward and backward of eight examples of 42-226 tokens in one layer of the embedded model (9 heads,
3 key/value heads) took 22.0 and 23.9 ms in bf16, 15.5 and 13.9 ms with the fp32 casts included (best of 5,
alternating, two sittings on a 2-core AVX512-BF16 EPYC). In the profile of six training steps, the kernel's
backward took 1.16 s instead of 2.25 s; whole steps differed by less than this machine's noise (medians of
16 alternating steps: 4.37 s with fp32 attention, 4.30 s with bf16). `CPU_FP32` is the switch
benchmarks/throughput.py turns off ("ours, attention in bf16")."""
from __future__ import annotations

NAME = "packed_sdpa"
CPU_FP32 = True  # 16-bit attention computed in fp32 on the CPU (see above)


def example_bounds(positions) -> list[tuple[int, int]]:
    """(start, end) of each sequence in a row of position ids: one starts wherever a position does not
    follow the one before it (the rule transformers' mask code uses to find packed sequences)."""
    import torch

    starts = ((torch.diff(positions) != 1).nonzero().flatten() + 1).tolist()
    return list(zip([0] + starts, starts + [positions.numel()]))


def packed_sdpa_forward(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers' attention-interface signature: query (batch, heads, length, head_dim), key and value
    (batch, kv_heads, length, head_dim); returns (batch, length, heads, head_dim) and no weights."""
    import contextlib

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    length = query.shape[2]
    rows = None
    if (position_ids is not None and position_ids.dim() == 2 and position_ids.shape[0] == query.shape[0]
            and key.shape[2] == length > 1 and getattr(module, "is_causal", True)
            and kwargs.get("softcap") is None and kwargs.get("s_aux") is None):
        rows = [example_bounds(p) for p in position_ids]
        longest = max(e - s for bounds in rows for s, e in bounds)
        window = kwargs.get("sliding_window")
        if all(len(bounds) == 1 for bounds in rows) or (window and longest > window):
            rows = None
    dtype, upcast = query.dtype, contextlib.nullcontext()
    if CPU_FP32 and query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        query, key, value = query.float(), key.float(), value.float()
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        upcast = torch.autocast("cpu", enabled=False)  # CPU autocast casts SDPA's inputs to bf16 otherwise
    with upcast:
        if rows is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)[0].to(dtype), None
        out = []
        for b, bounds in enumerate(rows):
            parts = [sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e],
                                            value[b:b + 1, :, s:e], None, is_causal=True, **kwargs)[0]
                     for s, e in bounds]
            out.append(torch.cat(parts, dim=1))
    return torch.cat(out, dim=0).to(dtype), None


def register() -> None:
    """Make ``attn_implementation="packed_sdpa"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
