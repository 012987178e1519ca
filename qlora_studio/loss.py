"""The causal LM loss computed a few rows of logits at a time (``cross_entropy: chunked``).

transformers' ``ForCausalLMLoss`` copies the whole (positions x vocabulary) logits to fp32, keeps torch's
log-softmax of them for the backward pass, and there fills a zero tensor of the same size, writes the
gradient into it and copies that back to the logits' dtype: with the embedded model's 49,152-token
vocabulary that is a 40 MB fp32 tensor per 200 trained positions, written or read about eight times per
step. `causal_lm_loss` computes the same loss, the sum over trained positions of ``logsumexp(logits) -
logits[target]`` divided by the same count, reading the logits a few rows at a time (each chunk converted to
fp32 while it is in the cache) and keeping only one fp32 number per position for the backward pass, which
writes the gradient ``(softmax - one_hot) * scale`` straight into the logits' dtype. The loss and the
gradients are those of torch's cross-entropy up to fp32 rounding (the same formula, summed in another order).

Measured on a 2-core AVX512-BF16 EPYC under bf16 autocast: the loss and its backward for 205 positions of
the embedded model's vocabulary took 21-23 ms against 57-62 ms for transformers' (the LM head left out); in
training (benchmarks/lever_ab.py --lever loss, three processes of 6, 10 and 10 samples) 1.056 +- 0.025,
0.957 +- 0.013 and 0.980 +- 0.014 of the time with transformers' loss, a gain of 1-2% at most, at this
machine's noise; a step's memory loses the fp32 logits and log-probabilities. On the embedded model's bf16
logits (300 positions) the loss was 2.7e-7 from the fp64 one, transformers' 3.1e-6.

Used where the model computes the causal LM loss with transformers' ``ForCausalLMLoss`` through its loss
hook (``loss_function``): `supported` checks, `install` sets it.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 4 << 20  # fp32 bytes of logits converted at a time: a few rows, in the cache


def rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(1, vocab)))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, valid, divisor):
        n = logits.shape[0]
        step = rows_per_chunk(logits.shape[1])
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for i in range(0, n, step):
            lse[i:i + step] = torch.logsumexp(logits[i:i + step].float(), dim=-1)
        picked = logits.gather(1, targets[:, None]).squeeze(1).float()
        loss = torch.where(valid, lse - picked, 0.0).sum() / divisor
        ctx.save_for_backward(logits, targets, valid, lse, divisor)
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, targets, valid, lse, divisor = ctx.saved_tensors
        step = rows_per_chunk(logits.shape[1])
        scale = valid.float() * (grad.float() / divisor)  # 0 for the positions the loss does not count
        out = torch.empty_like(logits)
        for i in range(0, logits.shape[0], step):
            p = logits[i:i + step].float().sub_(lse[i:i + step, None]).exp_()  # softmax
            s = scale[i:i + step, None]
            p.scatter_add_(1, targets[i:i + step, None], -torch.ones_like(s))  # minus the one-hot target
            out[i:i + step] = p.mul_(s)
        return out, None, None, None


def cross_entropy(logits, targets, divisor=None, ignore_index: int = -100):
    """The sum of the cross-entropy over the rows of ``logits`` (N, V) whose target is not ``ignore_index``,
    divided by ``divisor`` (a number or tensor; default: the count of those rows, torch's "mean"). A float32
    scalar, as torch's cross-entropy of the fp32 logits gives."""
    valid = targets != ignore_index
    if divisor is None:
        divisor = valid.sum()
    divisor = torch.as_tensor(divisor, dtype=torch.float32, device=logits.device)
    return _ChunkedCrossEntropy.apply(logits, torch.where(valid, targets, 0), valid, divisor)


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels=None, **kwargs):
    """transformers' ``ForCausalLMLoss`` (same arguments, same result up to fp32 rounding), chunked."""
    if shift_labels is None:  # position t predicts token t + 1
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(logits.device)
    return cross_entropy(logits, targets, num_items_in_batch, ignore_index)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supported(model) -> tuple[bool, str]:
    """Whether the model computes its causal LM loss with transformers' ``ForCausalLMLoss`` through its
    ``loss_function`` hook, which `install` replaces."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    base = _base(model)
    current = getattr(base, "loss_function", None)
    if current is causal_lm_loss or current is LOSS_MAPPING.get("ForCausalLM"):
        return True, "the model computes its loss through transformers' loss hook"
    name = getattr(current, "__name__", None) or "its own code"
    return False, f"{type(base).__name__} computes its loss with {name}, not transformers' causal LM loss"


def install(model) -> None:
    """Compute the model's causal LM loss with `causal_lm_loss` (where `supported`)."""
    ok, why = supported(model)
    if not ok:
        raise ValueError(why)
    _base(model).loss_function = causal_lm_loss


def uninstall(model) -> None:
    """transformers' own loss again."""
    base = _base(model)
    if getattr(base, "_loss_function", None) is causal_lm_loss:
        del base._loss_function
