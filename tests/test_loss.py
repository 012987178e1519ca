"""The chunked cross-entropy (`loss`): torch's loss and gradients up to fp32 rounding, the model hook, the plan."""

import pytest

from qlora_studio.config import TrainConfig
from qlora_studio.errors import ConfigError
from conftest import train_tiny


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows for a 1000-token vocabulary, so a batch spans several chunks and a partial last one."""
    from qlora_studio import loss

    monkeypatch.setattr(loss, "CHUNK_BYTES", 3 * 4 * 1000)
    assert loss.rows_per_chunk(1000) == 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("divisor", [None, 7])
def test_chunked_cross_entropy_is_torchs_up_to_fp32_rounding(small_chunks, dtype, divisor):
    import torch
    import torch.nn.functional as F

    from qlora_studio.loss import cross_entropy

    torch.manual_seed(0)
    base = (torch.randn(11, 1000) * 4).to(getattr(torch, dtype))
    targets = torch.randint(0, 1000, (11,))
    targets[[2, 9]] = -100  # positions the loss does not count
    x, y = base.clone().requires_grad_(), base.clone().requires_grad_()
    reduction = "mean" if divisor is None else "sum"
    expected = F.cross_entropy(x.float(), targets, ignore_index=-100, reduction=reduction)
    if divisor is not None:
        expected = expected / divisor
    got = cross_entropy(y, targets, divisor)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    (expected * 3).backward()
    (got * 3).backward()
    assert y.grad.dtype == base.dtype
    assert torch.all(y.grad[[2, 9]] == 0)
    tolerance = 1e-6 if dtype == "float32" else 2e-3  # bf16: a last-bit rounding of a few elements
    assert torch.allclose(y.grad.float(), x.grad.float(), rtol=tolerance, atol=1e-7)
    exact = (F.cross_entropy(base.double(), targets, reduction="sum") / (divisor or 9)).item()
    assert abs(got.item() - exact) <= abs(expected.item() - exact) + 1e-6  # as close to fp64 as torch's


def test_the_hook_gives_the_models_own_loss_and_gradients(small_chunks, tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_studio import loss

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert loss.supported(model)[0]
    ids = torch.randint(0, 500, (2, 20))
    labels = ids.clone()
    labels[0, :6] = -100
    results = []
    for chunked in (False, True):
        if chunked:
            loss.install(model)
        model.zero_grad()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        results.append((out.loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert model.loss_function is loss.causal_lm_loss
    (a, ga), (b, gb) = results
    assert b == pytest.approx(a, rel=1e-6)
    assert len(ga) == len(gb) > 0 and all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(ga, gb))
    loss.uninstall(model)
    assert model.loss_function is not loss.causal_lm_loss


def test_a_model_with_its_own_loss_keeps_it(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_studio import loss

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)

    def own_loss(logits, labels, vocab_size, **kwargs):
        return logits.sum()

    model.loss_function = own_loss
    ok, why = loss.supported(model)
    assert not ok and "own_loss" in why
    with pytest.raises(ValueError):
        loss.install(model)


def test_an_unknown_cross_entropy_is_refused_naming_the_field():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"data": "x.jsonl", "cross_entropy": "fused"})
    assert "cross_entropy" in str(e.value)


def test_a_cpu_run_with_the_chunked_loss_learns_as_with_torchs(studio_home, tiny_llama, toy_data):
    losses = {}
    for name in ("chunked", "torch"):
        run, log, losses[name] = train_tiny(tiny_llama, toy_data, f"loss-{name}", cross_entropy=name,
                                            eval_fraction=0.2)
        assert ("cross-entropy: chunked" in log) == (name == "chunked")
        assert run.plan()["plan"]["cross_entropy"] == name
        assert any(r["type"] == "eval" and "eval_loss" in r for r in run.metrics())  # evaluation takes it too
    assert len(losses["chunked"]) == len(losses["torch"]) >= 3
    assert losses["chunked"] == pytest.approx(losses["torch"], rel=2e-3)
