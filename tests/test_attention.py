"""packed_sdpa: SDPA on each packed example gives what a block-diagonal mask gives, and every other
forward (generation with a cache, a sliding window shorter than an example) goes to plain SDPA."""
import json

import pytest
import torch

from qlora_studio.attention import NAME, example_bounds, register
from qlora_studio.batching import PackedBatches, packing_respected
from qlora_studio.config import TrainConfig
from qlora_studio.loading import load_base_model
from qlora_studio.training import prepare_run, run_training


def test_examples_start_wherever_a_position_does_not_follow_the_one_before():
    assert example_bounds(torch.tensor([0, 1, 2, 0, 1, 0, 0, 1, 2, 3])) == [(0, 3), (3, 5), (5, 6), (6, 10)]
    assert example_bounds(torch.arange(5)) == [(0, 5)]
    # a left-padded prompt as generate numbers it: each pad on its own, then the prompt
    assert example_bounds(torch.tensor([1, 1, 1, 0, 1, 2])) == [(0, 1), (1, 2), (2, 3), (3, 6)]


def _features(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for n in lengths:
        ids = torch.randint(10, vocab - 1, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return feats


def _loss_grads_logits(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "attention_mask"}
    model.zero_grad(set_to_none=True)
    out = model(**inputs, use_cache=False)  # as the trainer runs it (transformers finds packing without a cache)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.item(), grads, out.logits.detach()


@pytest.mark.parametrize("span", [None, 12])  # one row; rows of several examples with a pad tail
def test_packed_rows_give_the_loss_gradients_and_logits_of_a_block_mask(tiny_llama, span):
    from transformers import AutoModelForCausalLM

    register()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="eager")
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    feats = _features(model.config.vocab_size, [9, 1, 14, 5, 7, 3])
    batch = PackedBatches(pad_id=0, attention_span=span)(feats)
    if span is None:
        assert batch["input_ids"].shape == (1, 39)
    else:
        assert batch["input_ids"].shape[0] > 1 and not bool(batch["attention_mask"].all())  # pad tails
    results = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        assert model.config._attn_implementation == impl
        results[impl] = _loss_grads_logits(model, batch)
    (loss_e, grads_e, logits_e), (loss_p, grads_p, logits_p) = results["eager"], results[NAME]
    assert loss_p == pytest.approx(loss_e, rel=1e-5)
    assert grads_p.keys() == grads_e.keys() and len(grads_e) > 10
    for name in grads_e:
        assert torch.allclose(grads_p[name], grads_e[name], atol=1e-5, rtol=1e-4), name
    real = batch["attention_mask"].bool()
    assert (logits_p[real] - logits_e[real]).abs().max() < 1e-4
    if span is None:  # and what each example gives alone
        start = 0
        for n in [len(f["input_ids"]) for f in feats]:
            with torch.no_grad():
                alone = model(input_ids=batch["input_ids"][:, start:start + n], use_cache=False).logits[0]
            assert (alone - logits_p[0, start:start + n]).abs().max() < 1e-4
            start += n


def test_a_sliding_window_shorter_than_an_example_goes_to_plain_sdpa(embedded_path):
    """Mistral's sliding window of 4 tokens: the per-example path would attend further back; the
    logits match eager attention's, which applies the window."""
    from transformers import MistralConfig, MistralForCausalLM

    register()
    cfg = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4, max_position_embeddings=128)
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    batch = PackedBatches(pad_id=0, attention_span=None)(_features(300, [9, 6, 11]))
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    logits = {}
    for impl in ("eager", NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(**inputs, use_cache=False).logits
    assert (logits[NAME] - logits["eager"]).abs().max() < 1e-4
    # without the window the two differ: the test would see the per-example path ignore it
    model.config.sliding_window = None
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    with torch.no_grad():
        unwindowed = model(**inputs, use_cache=False).logits
    assert (unwindowed - logits["eager"]).abs().max() > 1e-3


def test_generation_with_a_cache_and_left_padding_matches_sdpa(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.padding_side = "left"
    model = load_base_model(tiny_llama, "none", "fp32", "cpu", attention=NAME).eval()
    assert model.config._attn_implementation == NAME
    prompts = tok(["a short prompt", "a rather longer prompt with more words in it"], return_tensors="pt",
                  padding=True)
    assert not bool(prompts["attention_mask"].all())
    scores = {}
    for impl in (NAME, "sdpa"):
        model.set_attn_implementation(impl)
        out = model.generate(**prompts, max_new_tokens=5, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        scores[impl] = torch.stack(out.scores)
    assert (scores[NAME] - scores["sdpa"]).abs().max() < 1e-4


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # the compute dtypes a CPU trains in
def test_a_4bit_model_loads_with_it_and_keeps_packed_examples_apart(tiny_llama, precision):
    model = load_base_model(tiny_llama, "nf4", precision, "cpu", attention=NAME)
    assert model.config._attn_implementation == NAME
    ok, why = packing_respected(model)
    assert ok, why


def test_a_cpu_run_attends_per_example_in_one_row_and_learns_as_with_eager(studio_home, tiny_llama, tmp_path):
    data = tmp_path / "varied.jsonl"
    with open(data, "w") as f:
        for i in range(16):
            words = " ".join(f"w{(i * 7 + j) % 50}" for j in range(3 + (i * 13) % 30))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Repeat: {words}"},
                                             {"role": "assistant", "content": words}]}) + "\n")
    runs = {}
    for attention in (None, "eager"):
        cfg = TrainConfig(model=str(tiny_llama), data=str(data), max_steps=4, batch_size=4, max_seq_len=128,
                          eval_fraction=0.0, quant="nf4", lora_dropout=0.0, attention=attention,
                          name=f"attn-{attention}")
        run = prepare_run(cfg)
        status = run_training(run)
        assert status["state"] == "completed", status.get("error")
        runs[attention] = run
    auto = runs[None]
    assert auto.plan()["plan"]["attention"] == NAME
    assert f"speed: attention {NAME}" in (auto.path / "train.log").read_text()
    losses = {a: [r["loss"] for r in runs[a].metrics() if r["type"] == "train"] for a in runs}
    assert len(losses[None]) == 4
    assert losses[None] == pytest.approx(losses["eager"], rel=1e-3)


def test_on_the_cpu_16bit_attention_runs_in_fp32_on_both_paths_and_returns_16bit(tiny_llama):
    """Under CPU bf16 autocast, the per-example path and the plain path (one sequence) hand SDPA fp32
    queries, keys and values (torch's CPU flash kernel is faster in fp32), return bf16, and give what an
    fp32 model gives, to bf16's precision; with the switch off SDPA gets bf16."""
    import qlora_studio.attention as attention
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    seen = []

    class Kernels(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.__name__:
                seen.append((func.__name__, args[0].dtype))
            return func(*args, **(kwargs or {}))

    register()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16, attn_implementation=NAME)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="eager")
    feats = _features(model.config.vocab_size, [9, 14, 5])
    packed = {k: v for k, v in PackedBatches(pad_id=0, attention_span=None)(feats).items() if k != "attention_mask"}
    one = {"input_ids": packed["input_ids"][:, :9], "labels": packed["labels"][:, :9]}
    for batch, calls in ((packed, 3), (one, 1)):
        for fp32 in (True, False):
            attention.CPU_FP32, seen[:] = fp32, []
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16), Kernels():
                    out = model(**batch, use_cache=False)
                    out.loss.backward()
            finally:
                attention.CPU_FP32 = True
            forward = [dtype for name, dtype in seen if "backward" not in name]
            assert len(forward) == calls * model.config.num_hidden_layers
            assert set(forward) == {torch.float32 if fp32 else torch.bfloat16}
            assert any("backward" in name for name, _ in seen)
            assert out.logits.dtype == torch.bfloat16
            with torch.no_grad():
                exact = reference(**batch, use_cache=False).logits
            assert (out.logits.float() - exact).abs().max() < 0.05 * exact.abs().max()
