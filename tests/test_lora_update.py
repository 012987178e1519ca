"""The fused LoRA update (`lora_update`): peft's sum up to one rounding, peft's own forward where it does not
apply, the plan's choice and a run."""

import contextlib

import pytest

from qlora_studio.compat import keep_4bit_weights_trainable
from qlora_studio.loading import load_base_model
from conftest import train_tiny


def _adapted(path, quant: str, precision: str = "bf16", **lora):
    import torch
    from peft import LoraConfig, get_peft_model

    model = load_base_model(path, quant, precision, "cpu")
    if quant != "none":
        keep_4bit_weights_trainable(model)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear",
                                                "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
                                                **lora}))
    with torch.no_grad():  # peft starts B at zero: give the update a value to add
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _loss_and_grads(model, ids, autocast: bool):
    import torch

    model.zero_grad()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.fixture
def fused_calls(monkeypatch):
    """How many layer forwards took the fused path."""
    from qlora_studio import lora_update

    calls = []
    original = lora_update._fusable

    def counted(*args):
        name = original(*args)
        calls.append(name is not None)
        return name

    monkeypatch.setattr(lora_update, "_fusable", counted)
    return calls


@pytest.mark.parametrize("quant,precision,autocast", [("nf4", "bf16", True), ("nf4", "fp32", False),
                                                      ("none", "fp32", False), ("none", "bf16", True)])
def test_the_fused_update_is_pefts_sum_up_to_rounding(tiny_llama, fused_calls, quant, precision, autocast):
    import torch

    from qlora_studio.lora_update import fuse, unfuse

    model = _adapted(tiny_llama, quant, precision)
    ids = torch.randint(0, 500, (2, 24))
    peft_loss, peft_grads = _loss_and_grads(model, ids, autocast)
    assert fuse(model) == 14
    fused_loss, fused_grads = _loss_and_grads(model, ids, autocast)
    assert len(fused_calls) == 14 and all(fused_calls)  # every layer took the fused path
    assert len(fused_grads) == len(peft_grads) == 28
    if not autocast:  # fp32: the same numbers bit for bit
        assert fused_loss == peft_loss
        assert all(torch.equal(a, b) for a, b in zip(fused_grads, peft_grads))
    else:  # bf16 sums: rounded once where peft rounds the product and the sum
        assert fused_loss == pytest.approx(peft_loss, rel=2e-3)
        for a, b in zip(fused_grads, peft_grads):
            err = float((a - b).abs().max() / b.abs().max())
            assert err < 0.08, err
    unfuse(model)
    assert _loss_and_grads(model, ids, autocast)[0] == peft_loss


@pytest.mark.parametrize("autocast", [False, True])
def test_with_16bit_dropout_the_fused_update_scales_the_small_products_and_matches_pefts(tiny_llama, autocast):
    """`Dropout16.unscaled` leaves 1 / (1 - p) to the addmm's alpha: the same masks (the same seed), the same
    sum up to rounding, where peft's layer scales the dropped input."""
    import torch

    from qlora_studio.dropout import use_16bit_masks
    from qlora_studio.lora_update import fuse

    model = _adapted(tiny_llama, "nf4", "bf16" if autocast else "fp32", lora_dropout=0.3)
    assert use_16bit_masks(model) == 14
    model.train()
    ids = torch.randint(0, 500, (2, 24))
    results = {}
    for fused in (False, True):
        if fused:
            fuse(model)
        torch.manual_seed(5)
        results[fused] = _loss_and_grads(model, ids, autocast)
    torch.manual_seed(6)  # other masks: another loss (the dropout is drawn)
    other = _loss_and_grads(model, ids, autocast)[0]
    (peft_loss, peft_grads), (fused_loss, fused_grads) = results[False], results[True]
    assert other != fused_loss
    tolerance = 2e-3 if autocast else 1e-5
    assert fused_loss == pytest.approx(peft_loss, rel=tolerance)
    for a, b in zip(fused_grads, peft_grads, strict=True):
        err = float((a - b).abs().max() / b.abs().max())
        assert err < (0.08 if autocast else 1e-4), err


def test_the_fused_update_takes_pefts_forward_where_it_does_not_apply(tiny_llama, fused_calls):
    import torch

    from qlora_studio.lora_update import fuse

    model = _adapted(tiny_llama, "none", "fp32")
    ids = torch.randint(0, 500, (1, 16))
    fuse(model)
    with torch.no_grad():
        with model.disable_adapter():  # adapters off: the base alone, as peft gives it
            base = model(input_ids=ids).logits
        assert fused_calls == [False] * 14
        adapted = model(input_ids=ids).logits
    assert not torch.equal(base, adapted) and fused_calls[14:] == [True] * 14
    dora = _adapted(tiny_llama, "none", "fp32", use_dora=True)
    with torch.no_grad():
        expected = dora(input_ids=ids).logits
        fuse(dora)
        assert torch.equal(dora(input_ids=ids).logits, expected)  # DoRA: peft's own forward, bit for bit
    assert fused_calls[28:] == [False] * 14
    mixed = _adapted(tiny_llama, "none", "bf16")  # a bf16 base without autocast: peft converts, so peft's path
    fuse(mixed)
    with torch.no_grad():
        mixed(input_ids=ids)
    assert fused_calls[42:] == [False] * 14
    merged = model.merge_and_unload()  # the merge replaces the layers and the fused forward with them
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-4)  # fp32: the merged sum


def test_a_cpu_run_with_the_fused_update_learns_as_with_pefts(studio_home, tiny_llama, toy_data):
    losses = {}
    for name in ("fused", "peft"):
        run, log, losses[name] = train_tiny(tiny_llama, toy_data, f"update-{name}", lora_update=name)
        assert ("LoRA update: fused in 14 layers" in log) == (name == "fused")
        assert run.plan()["plan"]["lora_update"] == name
    assert len(losses["fused"]) == len(losses["peft"]) >= 3
    assert losses["fused"] == pytest.approx(losses["peft"], rel=1e-2)
