"""Batches without padding: a step's examples packed into rows, told apart by their position ids.

`packing_respected` checks, on the loaded model, that its attention keeps packed examples apart;
`PackedBatches` collates; `StudioTrainer` takes the packed batch's attention mask out before the model
sees it. `pack_sequences` packs the whole data set into sequences beforehand, when the batch size counts
sequences (``batch_unit: sequences``). `benchmarks/throughput.py` measures packing against padded and
length-grouped batches.
"""

from __future__ import annotations


def first_fit(lengths: list[int], cap: int) -> tuple[list[list[int]], int]:
    """Indices placed in bins of at most ``cap`` (an item longer than ``cap`` gets a bin of its own),
    longest first, each into the first bin it fits; the bins and the fullest bin's load."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, load in enumerate(loads):
            if load + lengths[i] <= cap:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return [sorted(b) for b in bins], max(loads)


def pack_sequences(dataset, max_seq_len: int):
    """The examples of ``dataset`` packed into sequences of at most ``max_seq_len`` tokens (first-fit,
    longest first; an example is never split), for ``batch_unit: sequences``. Each sequence's
    ``position_ids`` restart at every example, and the first token of each example has no label, so the
    examples stay apart exactly as in a packed batch. ``examples`` counts the examples in each."""
    from datasets import Dataset

    ids, labels = dataset["input_ids"], dataset["labels"]
    bins, _ = first_fit([len(x) for x in ids], max_seq_len)
    rows = []
    for b in bins:
        row = {"input_ids": [], "labels": [], "position_ids": [], "examples": len(b)}
        for i in b:
            row["input_ids"] += ids[i]
            row["labels"] += [-100] + list(labels[i][1:])
            row["position_ids"] += range(len(ids[i]))
        row["attention_mask"] = [1] * len(row["input_ids"])
        rows.append(row)
    return Dataset.from_list(rows)


class PackedBatches:
    """Collates a step's examples into rows without padding between them.

    Each example's position ids restart at 0, which is how the attention (checked by
    `packing_respected`) tells them apart. How many rows: attention makes a token's cost grow with the
    length of its row, so one long row of the whole batch is not always cheapest. For row capacities
    from the longest example up to the whole batch (doubling), examples are placed first-fit, longest
    first, and the layout with the lowest ``rows x width x (1 + width / attention_span)`` wins.
    ``attention_span`` is the row length at which attention costs as much per token as the rest of the
    model (None: attention runs per example, so the whole batch goes in one row): about 2.2 x hidden size measured on the CPU (eager attention, bf16; one 750-token row of
    eight SQL examples ran 9% slower than padding them), 6 x hidden size by counting FLOPs for a GPU.
    The end of a shorter row is filled with pad tokens forming a sequence of their own, with no labels;
    ``attention_mask`` marks the real tokens for counting only (`StudioTrainer` takes it out before
    the model sees it, so the packed positions decide the attention)."""

    def __init__(self, pad_id: int, attention_span: float | None):
        self.pad_id = pad_id
        self.attention_span = attention_span

    def rows(self, lengths: list[int]) -> list[list[int]]:
        if self.attention_span is None:  # attention per example (`attention.packed_sdpa_forward`): one row
            return [list(range(len(lengths)))]
        total, cap = sum(lengths), max(lengths)
        best = None
        while True:
            bins, width = first_fit(lengths, cap)
            cost = len(bins) * width * (1 + width / self.attention_span)
            if best is None or cost < best[0]:
                best = (cost, bins)
            if cap >= total:
                return best[1]
            cap = min(total, cap * 2)

    def __call__(self, features: list[dict]) -> dict:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        rows = self.rows(lengths)
        width = max(sum(lengths[i] for i in row) for row in rows)
        out = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
        for row in rows:
            ids, labels, pos, real = [], [], [], []
            for i in row:
                x = list(features[i]["input_ids"])
                y = list(features[i].get("labels", x))
                ids += x
                labels += [-100] + y[1:]
                pos += features[i].get("position_ids") or range(len(x))  # a packed sequence (`pack_sequences`) keeps its own
                real += [1] * len(x)
            fill = width - len(ids)
            ids += [self.pad_id] * fill
            labels += [-100] * fill
            pos += range(fill)
            real += [0] * fill
            for key, values in zip(("input_ids", "labels", "position_ids", "attention_mask"), (ids, labels, pos, real)):
                out[key].append(values)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def studio_trainer_class():
    from transformers import Trainer

    class StudioTrainer(Trainer):
        """The Trainer, except that a packed batch's ``attention_mask`` (real tokens, for the token
        count) is taken out before the model sees it: packed rows are told apart by their position ids;
        and, with ``labelled_logits``, the LM head and the loss see only the trained positions
        (`labelled_positions_only`)."""

        packed = False
        labelled_logits = False

        def compute_loss(self, model, inputs, *args, **kwargs):
            if self.packed and "position_ids" in inputs:
                inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
            if self.labelled_logits:
                inputs = labelled_positions_only(inputs)
            return super().compute_loss(model, inputs, *args, **kwargs)

    return StudioTrainer


def labelled_positions_only(inputs: dict) -> dict:
    """The batch with the LM head and the loss limited to the positions whose next token is trained.

    Prompt tokens of chat data (and the pad tail of a packed row) carry the label -100: their logits
    are computed and thrown away. ``logits_to_keep`` as a (batch, sequence) boolean mask makes the model
    project only the kept positions (transformers flattens them to (kept, vocabulary)), and
    ``shift_labels`` gives the loss their targets in the same order, so the loss and its gradients are
    those of the whole batch (the sum over trained tokens divided by their count, or by the Trainer's
    ``num_items_in_batch`` under gradient accumulation: the same count). A batch with nothing to train
    is left as it is."""
    import torch

    labels = inputs.get("labels")
    if labels is None:
        return inputs
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
    keep = targets != -100
    if not bool(keep.any()):
        return inputs
    return {**inputs, "logits_to_keep": keep, "shift_labels": targets[keep]}


def labelled_logits_supported(model) -> tuple[bool, str]:
    """Whether the model's forward takes a boolean ``logits_to_keep`` mask: it does when it slices its
    hidden states with transformers' own `slice_logits_to_keep` (Llama, Qwen2/3, Gemma, Mistral, Phi-3
    and most causal LMs in transformers 5); a model with its own code gets every position."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        source = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return False, f"{type(base).__name__}'s forward cannot be read"
    if "slice_logits_to_keep" in source:
        return True, "the model computes the LM head and the loss only at trained positions"
    return False, f"{type(base).__name__} does not take a mask of positions for its LM head"


def packing_respected(model) -> tuple[bool, str]:
    """Whether this model's attention keeps packed examples apart (position ids restarting per example).

    Two short sequences go through the model separately and packed in one row. If the packed row's
    second half matches the separate run far better than a row whose positions run on (attention
    crossing the boundary), the attention respects the packing."""
    import torch

    vocab = getattr(model.config, "vocab_size", 1000)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(10, vocab - 1, (1, 12), generator=g)
    b = torch.randint(10, vocab - 1, (1, 9), generator=g)
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    a, b = a.to(device), b.to(device)
    row = torch.cat([a, b], dim=1)
    packed_pos = torch.cat([torch.arange(12), torch.arange(9)]).unsqueeze(0).to(device)
    running_pos = torch.arange(21).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=b, use_cache=False).logits.float()
            packed = model(input_ids=row, position_ids=packed_pos, use_cache=False).logits[:, 12:].float()
            crossing = model(input_ids=row, position_ids=running_pos, use_cache=False).logits[:, 12:].float()
    except Exception as e:  # a model that does not take position ids
        return False, f"the model failed on a packed row ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
    err = (packed - alone).abs().max().item()
    leak = (crossing - alone).abs().max().item()
    if leak > 0 and err < 0.05 * leak:
        return True, f"packed logits match separate ones (max diff {err:.3g} vs {leak:.3g} when attention crosses)"
    return False, (f"{model.config._attn_implementation} attention does not keep packed examples apart "
                   f"(max diff {err:.3g} vs {leak:.3g} when attention crosses)")
