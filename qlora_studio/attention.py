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
each pad then attends to itself and the prompt's tokens to the prompt, as the padding mask has it."""
from __future__ import annotations

NAME = "packed_sdpa"


def example_bounds(positions) -> list[tuple[int, int]]:
    """(start, end) of each sequence in a row of position ids: one starts wherever a position does not
    follow the one before it (the rule transformers' mask code uses to find packed sequences)."""
    import torch

    starts = ((torch.diff(positions) != 1).nonzero().flatten() + 1).tolist()
    return list(zip([0] + starts, starts + [positions.numel()]))


def packed_sdpa_forward(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers' attention-interface signature: query (batch, heads, length, head_dim), key and value
    (batch, kv_heads, length, head_dim); returns (batch, length, heads, head_dim) and no weights."""
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
    if rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = []
    for b, bounds in enumerate(rows):
        parts = [sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                        None, is_causal=True, **kwargs)[0] for s, e in bounds]
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out, dim=0), None


def register() -> None:
    """Make ``attn_implementation="packed_sdpa"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
