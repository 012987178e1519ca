"""The speed levers of the trainer: padding-free packing (checked against the model's attention),
length-grouped batches, the attention implementation and automatic gradient checkpointing; none of
them may change what is learned."""

import json

import pytest

from qlora_studio.batching import PackedBatches, packing_respected
from qlora_studio.compat import keep_4bit_weights_trainable
from qlora_studio.config import TrainConfig
from qlora_studio.errors import ConfigError
from qlora_studio.loading import load_base_model
from qlora_studio.plan import Machine, plan_run
from qlora_studio.training import prepare_run, run_training


def _varied_data(path, n=24):
    """Chat rows of very different lengths, so padding would be a large share of a padded batch."""
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(f"w{(i * 7 + j) % 50}" for j in range(3 + (i * 13) % 30))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Repeat: {words}"},
                                             {"role": "assistant", "content": words}]}) + "\n")
    return path


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_keep_examples_apart_in_4bit(tiny_llama, attention):
    model = load_base_model(tiny_llama, "nf4", "bf16", "cpu", attention=attention)
    keep_4bit_weights_trainable(model)
    ok, why = packing_respected(model)
    assert ok, why
    assert model.config._attn_implementation == attention


def test_packed_batches_restart_positions_mark_real_tokens_and_pick_the_cheaper_layout():
    feats = [{"input_ids": list(range(10, 10 + n)), "labels": [-100] * 2 + list(range(12, 10 + n))} for n in (7, 3, 5, 2, 6)]
    # attention dear (short span): rows of at most the longest example's length
    batch = PackedBatches(pad_id=0, attention_span=4)(feats)
    ids, labels, pos, real = (batch[k] for k in ("input_ids", "labels", "position_ids", "attention_mask"))
    assert ids.shape == labels.shape == pos.shape == real.shape
    assert tuple(ids.shape) == (4, 7)  # 7 | 6 | 5+2 | 3 (+ fill)
    assert int(real.sum()) == 23 and int((labels != -100).sum()) == sum(n - 2 for n in (7, 3, 5, 2, 6))
    for row in range(ids.shape[0]):
        starts = [i for i in range(ids.shape[1]) if pos[row, i] == 0]
        assert labels[row, starts].eq(-100).all()  # no example learns from the one before it
        n_real = int(real[row].sum())
        assert ids[row, n_real:].eq(0).all() and labels[row, n_real:].eq(-100).all()
        if n_real < ids.shape[1]:
            assert pos[row, n_real] == 0  # the fill is a sequence of its own
    kept = sorted(int(x) for r in range(ids.shape[0]) for x in ids[r][real[r] == 1])
    assert kept == sorted(x for f in feats for x in f["input_ids"])
    # attention cheap (long span): one row, no fill at all
    one = PackedBatches(pad_id=0, attention_span=10**6)(feats)
    assert tuple(one["input_ids"].shape) == (1, 23) and int(one["attention_mask"].sum()) == 23
    assert one["position_ids"][0].tolist() == [*range(7), *range(3), *range(5), *range(2), *range(6)]


def test_a_model_that_takes_no_position_ids_is_not_packed(tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(vocab_size=300, hidden_size=32, n_layer=2, n_head=4)
    model = BloomForCausalLM(cfg).eval()
    ok, why = packing_respected(model)
    assert not ok and why


def test_packed_and_padded_batches_learn_the_same(studio_home, tiny_llama, tmp_path):
    """Same examples per step, same order: the first loss is the same and the losses stay together;
    a packed run counts exactly the tokens a padded run counts without its padding."""
    data = _varied_data(tmp_path / "varied.jsonl")
    runs = {}
    for batching in ("packed", "padded"):
        cfg = TrainConfig(model=str(tiny_llama), data=str(data), epochs=1, batch_size=4, learning_rate=3e-3,
                          max_seq_len=256, eval_fraction=0.0, quant="nf4", batching=batching, name=f"b-{batching}")
        run = prepare_run(cfg)
        status = run_training(run)
        assert status["state"] == "completed", status.get("error")
        runs[batching] = run
    packed, padded = ([r for r in runs[b].metrics() if r["type"] == "train"] for b in ("packed", "padded"))
    assert runs["packed"].plan()["plan"]["batching"] == "packed" and runs["packed"].plan()["adjustments"] == []
    assert runs["padded"].plan()["plan"]["batching"] == "padded"
    assert len(packed) == len(padded) == 6
    assert packed[0]["loss"] == pytest.approx(padded[0]["loss"], rel=0.02)
    for a, b in zip(packed, padded):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.05), (a["step"], a["loss"], b["loss"])
    assert runs["packed"].summary()["non_pad_tokens"] == runs["padded"].summary()["non_pad_tokens"] > 0


def test_grouped_batches_are_recorded_and_train(studio_home, tiny_llama, tmp_path):
    data = _varied_data(tmp_path / "varied.jsonl", n=16)
    cfg = TrainConfig(model=str(tiny_llama), data=str(data), max_steps=3, batch_size=4, max_seq_len=128,
                      eval_fraction=0.0, quant="nf4", batching="grouped", attention="sdpa", gradient_checkpointing=True)
    run = prepare_run(cfg)
    assert run_training(run)["state"] == "completed"
    plan = run.plan()["plan"]
    assert plan == {**plan, "batching": "grouped", "attention": "sdpa", "gradient_checkpointing": True}
    assert "speed: attention sdpa; gradient checkpointing on (as configured); batching grouped (as configured)" in \
        (run.path / "train.log").read_text()


def test_checkpointing_is_automatic_on_the_cpu_and_stays_on_for_a_gpu(tiny_llama):
    from qlora_studio.catalog import load_architecture
    from qlora_studio.hardware import ram_bytes

    arch = load_architecture(tiny_llama)
    cfg = TrainConfig(model=str(tiny_llama), data="x.jsonl")
    _, available = ram_bytes()
    cpu = Machine("cpu", ram_available_bytes=available)
    plan = plan_run(cfg, cpu, arch)
    assert plan.gradient_checkpointing is False and "under half" in plan.reasons["gradient_checkpointing"]
    assert plan.attention == "eager"
    huge = TrainConfig(model=str(tiny_llama), data="x.jsonl", batch_size=4096, max_seq_len=65536)
    big = plan_run(huge, cpu, arch)
    assert big.gradient_checkpointing is True and "GiB" in big.reasons["gradient_checkpointing"] and available
    gpu = Machine("cuda", "RTX 3060", (8, 6), 12 * 2**30, 12 * 2**30)
    assert plan_run(cfg, gpu, arch).gradient_checkpointing is True and plan_run(cfg, gpu, arch).attention == "sdpa"
    off = TrainConfig(model="m", data="x", gradient_checkpointing=False)
    assert plan_run(off, gpu, arch).gradient_checkpointing is False
    unknown = plan_run(cfg, cpu, None, module_names=["q_proj", "v_proj"], n_params=10**6)
    assert unknown.gradient_checkpointing is True and unknown.memory is None  # unknown size: the safe choice


def test_speed_settings_are_validated():
    for bad in ({"batching": "sorted"}, {"attention": "flash"}, {"gradient_checkpointing": "maybe"}):
        with pytest.raises(ConfigError) as e:
            TrainConfig.from_dict({"data": "x.jsonl", **bad})
        assert next(iter(bad)) in str(e.value)


def test_the_lm_head_at_trained_positions_only_gives_the_same_loss_and_gradients(tiny_llama):
    """`labelled_positions_only`: the logits of prompt and padding positions are never computed, and the
    loss and every gradient are those of the whole batch (with and without ``num_items_in_batch``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_studio.batching import labelled_logits_supported, labelled_positions_only

    class OwnHead(torch.nn.Module):  # a model with its own code: every position
        def forward(self, input_ids, labels=None):
            return input_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert labelled_logits_supported(model)[0] and not labelled_logits_supported(OwnHead())[0]
    g = torch.Generator().manual_seed(1)
    features = []
    for n, prompt in ((40, 25), (17, 9), (30, 30 - 6)):  # each: a prompt (masked) and an answer
        ids = torch.randint(10, 2000, (n,), generator=g).tolist()
        features.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    batch = PackedBatches(pad_id=0, attention_span=64)(features)
    batch.pop("attention_mask")
    trained = int((batch["labels"][:, 1:] != -100).sum())

    def loss_and_grads(inputs, **kw):
        model.zero_grad()
        out = model(**inputs, **kw)
        out.loss.backward()
        return out, out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    for kw in ({}, {"num_items_in_batch": torch.tensor(trained + 7)}):
        _, full, full_grads = loss_and_grads(batch, **kw)
        out, kept, kept_grads = loss_and_grads(labelled_positions_only(batch), **kw)
        assert out.logits.shape == (trained, model.config.vocab_size), "only trained positions are projected"
        assert kept.item() == pytest.approx(full.item(), rel=1e-5)
        for a, b in zip(full_grads, kept_grads):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    unlabelled = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    assert labelled_positions_only(unlabelled) is unlabelled  # nothing to train: left as it is
