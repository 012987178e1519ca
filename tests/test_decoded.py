"""4-bit weights kept decoded on the CPU (`decoded`): the plan's choice, its memory, and the same numbers
as bitsandbytes' decoding at each use."""

import pytest

from conftest import train_tiny
from qlora_studio.catalog import load_architecture
from qlora_studio.compat import keep_4bit_weights_trainable
from qlora_studio.config import TrainConfig
from qlora_studio.errors import ConfigError
from qlora_studio.loading import load_base_model
from qlora_studio.plan import Machine, plan_run
from qlora_studio.training import prepare_run, run_training


@pytest.fixture(scope="module")
def tiny_qwen(tiny_llama, tmp_path_factory):
    """A 2-layer Qwen2 (biases on q, k and v) with random weights and the embedded model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-qwen")
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # transformers starts biases at zero: give them values a layer must add
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _adapted(path, decoded: bool):
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora_studio.decoded import keep_decoded

    model = load_base_model(path, "nf4", "bf16", "cpu")
    keep_4bit_weights_trainable(model)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0,
                                             bias="none", task_type="CAUSAL_LM"))
    return model, keep_decoded(model) if decoded else 0


@pytest.mark.parametrize("autocast", [True, False])
def test_decoded_layers_give_bitsandbytes_losses_and_gradients_bit_for_bit(tiny_qwen, autocast):
    import contextlib

    import torch

    from qlora_studio.decoded import decoded_bytes

    ids = torch.randint(0, 500, (2, 24))
    results = {}
    for decoded in (False, True):
        model, layers = _adapted(tiny_qwen, decoded)
        assert layers == (14 if decoded else 0)  # 2 layers x 7 linear
        model.train()
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        losses, grads = [], []
        for _ in range(2):  # the second pass uses the kept weights
            with context:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            losses.append(loss.item())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            model.zero_grad()
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        results[decoded] = losses, grads, logits
        if decoded:  # every 4-bit weight, in bf16
            from bitsandbytes.nn import Linear4bit

            n = sum(m.weight.quant_state.shape.numel() for m in model.modules() if isinstance(m, Linear4bit))
            assert decoded_bytes(model) == 2 * n > 0
    (losses_a, grads_a, logits_a), (losses_b, grads_b, logits_b) = results[False], results[True]
    assert losses_a == losses_b
    for a, b in zip(grads_a, grads_b):
        assert a.keys() == b.keys() and len(a) == 28 and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits_a, logits_b)


def test_a_changed_weight_is_decoded_again(tiny_qwen):
    """Merging an adapter rewrites the 4-bit weights: the layers then compute with the merged ones."""
    import torch

    ids = torch.randint(0, 500, (1, 16))
    outputs = {}
    for decoded in (False, True):
        model, _ = _adapted(tiny_qwen, decoded)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
            model.eval()
            before = model(input_ids=ids).logits
            merged = model.merge_and_unload()
            outputs[decoded] = before, merged(input_ids=ids).logits
    assert torch.equal(outputs[False][0], outputs[True][0])
    assert torch.equal(outputs[False][1], outputs[True][1])
    assert not torch.equal(outputs[True][0], outputs[True][1])  # the merge changed the weights


def test_the_plan_keeps_the_weights_decoded_on_the_cpu_when_the_copy_fits_and_counts_it(tiny_llama):
    arch = load_architecture(tiny_llama)
    cpu = Machine("cpu", ram_available_bytes=8 * 2**30)
    cfg = dict(model=str(tiny_llama), data="x.jsonl")
    plan = plan_run(TrainConfig(**cfg), cpu, arch)
    assert plan.decoded_weights and "under half of the RAM free now" in plan.reasons["decoded_weights"]
    assert any(line.startswith("4-bit weights: decoded once and kept in ") for line in plan.lines())
    off = plan_run(TrainConfig(**cfg, decoded_weights=False), cpu, arch)
    assert not off.decoded_weights and "decoded_weights" not in off.reasons
    assert "4-bit weights: decoded at each use" in off.lines()
    copy = (2 if plan.precision == "bf16" else 4) * arch.param_counts().quantizable
    assert plan.memory["breakdown"]["weights"] - off.memory["breakdown"]["weights"] == copy
    assert plan.memory["estimate_bytes"] - off.memory["estimate_bytes"] == copy

    # RAM for the run without the copy, not with it: decoded at each use, checkpointing still off
    tight = Machine("cpu", ram_available_bytes=2 * off.memory["estimate_bytes"] + copy)
    planned = plan_run(TrainConfig(**cfg), tight, arch)
    assert not planned.decoded_weights and not planned.gradient_checkpointing
    assert "more than half of the RAM free now" in planned.reasons["decoded_weights"]

    gpu = Machine("cuda", "RTX 3060", (8, 6), 12 * 2**30, 12 * 2**30)
    on_gpu = plan_run(TrainConfig(**cfg), gpu, arch)
    assert not on_gpu.decoded_weights and "GPU memory" in on_gpu.reasons["decoded_weights"]
    with pytest.raises(ConfigError) as e:
        plan_run(TrainConfig(**cfg, decoded_weights=True), gpu, arch)
    assert e.value.field == "decoded_weights"
    sixteen_bit = plan_run(TrainConfig(**cfg, quant="none"), cpu, arch)
    assert not sixteen_bit.decoded_weights and not any(line.startswith("4-bit") for line in sixteen_bit.lines())
    with pytest.raises(ConfigError) as e:
        plan_run(TrainConfig(**cfg, quant="none", decoded_weights=True), cpu, arch)
    assert e.value.field == "decoded_weights"
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"data": "x.jsonl", "decoded_weights": "sometimes"})
    assert "decoded_weights" in str(e.value)


def test_a_cpu_run_with_decoded_weights_learns_exactly_as_with_decoding_at_each_use(studio_home, tiny_llama, toy_data):
    losses = {}
    for name, decoded in (("auto", None), ("each-use", False)):
        run, log, losses[name] = train_tiny(tiny_llama, toy_data, f"decoded-{name}", decoded_weights=decoded)
        assert ("4-bit weights: kept decoded in 14 layers" in log) == (decoded is None)
        assert run.plan()["plan"]["decoded_weights"] is (decoded is None)
    assert len(losses["auto"]) >= 2 and losses["auto"] == losses["each-use"]


def test_out_of_memory_on_the_cpu_offers_decoding_at_each_use_first_and_the_fix_run_does(studio_home, tiny_llama, toy_data):
    from qlora_studio.diagnose import oom_findings, settings_view
    from qlora_studio.recovery import prepare_fix_run
    from qlora_studio.runs import RunFolder

    cfg = TrainConfig(model=str(tiny_llama), data=str(toy_data), max_steps=2, batch_size=2, max_seq_len=128,
                      eval_fraction=0.0, name="oom-parent")
    run = prepare_run(cfg)
    view = settings_view(run.config(), run.plan())
    assert view["decoded_weights"] is True and run.config().get("decoded_weights") is None
    [finding] = oom_findings({"error_kind": "oom", "step": 1}, view)
    fix = finding.fixes[0]
    assert (fix.title, fix.changes) == ("Decode the 4-bit weights at each use", {"decoded_weights": False})
    child = RunFolder(prepare_fix_run(run, fix, reason=finding.message).path)
    assert child.config()["decoded_weights"] is False and child.plan()["plan"]["decoded_weights"] is False
    assert run_training(child)["state"] == "completed"
    assert "kept decoded" not in (child.path / "train.log").read_text()


def test_a_cpu_allocation_failure_is_recovered_by_giving_the_decoded_copy_up_first(studio_home, tiny_llama, toy_data):
    """torch's CPU allocator refusing an allocation (a real one, far beyond any RAM) is an out-of-memory error:
    the run retries from its checkpoint without the kept copy, the micro-batch as it was, and completes."""
    import torch
    from transformers import TrainerCallback

    from qlora_studio.diagnose import diagnose_run

    class AllocationFailsAt(TrainerCallback):
        def __init__(self, step):
            self.step, self.fired = step, False

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == self.step and not self.fired:
                self.fired = True
                torch.empty(2**60, dtype=torch.uint8)  # DefaultCPUAllocator: can't allocate memory

    cfg = TrainConfig(model=str(tiny_llama), data=str(toy_data), max_steps=8, batch_size=4, max_seq_len=128,
                      learning_rate=3e-3, eval_fraction=0.0, save_steps=3, name="cpu-oom")
    run = prepare_run(cfg)
    status = run_training(run, extra_callbacks=[AllocationFailsAt(5)])
    assert status["state"] == "completed", status.get("error")
    [rec] = status["recoveries"]
    assert (rec["step"], rec["decoded_weights"], rec["resumed_from"]) == (5, [True, False], "checkpoint-3")
    assert "can't allocate memory" in rec["error"] and "batch_size" not in rec
    plan = run.plan()["plan"]
    assert (plan["decoded_weights"], plan["batch_size"], plan["grad_accum"]) == (False, 4, 1)
    log = (run.path / "train.log").read_text()
    assert log.count("4-bit weights: kept decoded in 14 layers") == 1  # the retry decodes at each use
    assert "the 4-bit weights are decoded at each use from now on" in log
    [note] = [f for f in diagnose_run(run.path) if f.kind == "oom"]
    assert note.severity == "info" and "decoded at each use instead of kept decoded" in note.message
