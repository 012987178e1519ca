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
from conftest import train_tiny


def _varied_data(path, n=24):
    """Chat rows of very different lengths, so padding would be a large share of a padded batch."""
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(f"w{(i * 7 + j) % 50}" for j in range(3 + (i * 13) % 30))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Repeat: {words}"},
                                             {"role": "assistant", "content": words}]}) + "\n")
    return path


@pytest.mark.parametrize("attention", ["sdpa", "eager", "packed_sdpa"])
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
    assert plan.attention == "packed_sdpa"
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
    for bad in ({"batching": "sorted"}, {"attention": "flash"}, {"gradient_checkpointing": "maybe"},
                {"dropout_masks": "8bit"}):
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


def _busy_process():
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_other_processes_cores_are_measured_and_left_to_them():
    """A real busy process next to this one: `CoreShare` sees about one core used by others, and the
    thread count leaves that core to it; once it is gone the core comes back."""
    import time

    from qlora_studio.cpu_share import CHECK_SECONDS, CoreShare, threads_for

    assert [threads_for(x, 2) for x in (0.0, 0.4, 0.6, 1.0, 2.0)] == [2, 2, 1, 1, 1]
    assert [threads_for(x, 8) for x in (0.0, 1.2, 2.7, 7.9)] == [8, 7, 5, 1]
    share = CoreShare()
    assert share.others() is None  # too soon to say
    busy = _busy_process()
    try:
        time.sleep(CHECK_SECONDS + 0.5)
        with_busy = share.others()
    finally:
        busy.kill()
        busy.wait()
    time.sleep(CHECK_SECONDS + 0.5)
    without = share.others()
    assert with_busy is not None and without is not None
    assert with_busy >= 0.8, with_busy
    assert with_busy - without >= 0.6, (with_busy, without)


@pytest.mark.skipif(__import__("qlora_studio.cpu_share", fromlist=["cores"]).cores() < 2,
                    reason="needs a core to give up")
def test_a_cpu_run_gives_a_core_to_a_busy_process_and_takes_it_back(studio_home, tiny_llama, tmp_path):
    """A real run of the tiny model with a busy process started next to it: the trainer drops to the
    cores left free, logs it, and ends with the process's thread count as it found it."""
    import threading
    import time

    import torch

    data = _varied_data(tmp_path / "varied.jsonl", n=32)
    cfg = TrainConfig(model=str(tiny_llama), data=str(data), max_steps=100000, batch_size=2, max_seq_len=128,
                      eval_fraction=0.0, quant="nf4", save_steps=10**6)
    assert plan_run(cfg, Machine("cpu"), None, module_names=["q_proj"], n_params=10**6).cpu_threads is None
    run = prepare_run(cfg)
    stop = threading.Event()
    log = run.path / "train.log"
    before = torch.get_num_threads()
    busy = None

    def watch():
        nonlocal busy
        deadline = time.time() + 120
        while time.time() < deadline and "step 2/" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.2)
        busy = _busy_process()
        while time.time() < deadline and "CPU threads" not in log.read_text():
            time.sleep(0.2)
        stop.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        status = run_training(run, stop)
    finally:
        watcher.join()
        if busy is not None:
            busy.kill()
            busy.wait()
    assert status["state"] == "stopped", status
    text = log.read_text()
    assert f"CPU threads {before} -> {before - 1}: other processes used" in text, text[-2000:]
    plan = run.plan()["plan"]
    assert plan["cpu_threads"] is None and "other processes leave free" in plan["reasons"]["cpu_threads"]
    assert torch.get_num_threads() == before


def test_sequences_hold_whole_examples_apart_and_no_longer_than_the_limit():
    from datasets import Dataset

    from qlora_studio.batching import pack_sequences

    lengths = [30, 5, 17, 40, 8, 12, 25, 3]
    rows = [{"input_ids": list(range(100 * k, 100 * k + n)), "labels": [-100] * 2 + list(range(100 * k + 2, 100 * k + n))}
            for k, n in enumerate(lengths)]
    packed = pack_sequences(Dataset.from_list(rows), 48)
    assert all(len(x) <= 48 for x in packed["input_ids"])
    assert sum(packed["examples"]) == len(rows) and len(packed) == 3  # 40+8 | 30+17 | 25+12+5+3 (first fit)
    seen = []
    for seq in packed:
        starts = [i for i, p in enumerate(seq["position_ids"]) if p == 0]
        assert len(starts) == seq["examples"] and seq["attention_mask"] == [1] * len(seq["input_ids"])
        for a, b in zip(starts, starts[1:] + [len(seq["input_ids"])]):
            example = seq["input_ids"][a:b]
            seen.append(example)
            assert seq["position_ids"][a:b] == list(range(b - a))
            original = next(r for r in rows if r["input_ids"] == example)
            assert seq["labels"][a:b] == [-100] + original["labels"][1:]  # nothing learned across examples
    assert sorted(map(tuple, seen)) == sorted(tuple(r["input_ids"]) for r in rows)
    # the collator keeps a sequence's own positions
    batch = PackedBatches(pad_id=0, attention_span=10**6)([packed[0], packed[1]])
    assert sorted(batch["position_ids"][0].tolist()) == sorted(packed[0]["position_ids"] + packed[1]["position_ids"])


def test_a_run_counting_sequences_takes_fewer_bigger_steps_and_says_so(studio_home, tiny_llama, tmp_path):
    data = _varied_data(tmp_path / "varied.jsonl", n=24)
    cfg = TrainConfig(model=str(tiny_llama), data=str(data), epochs=1, batch_size=2, max_seq_len=256,
                      eval_fraction=0.0, quant="nf4", batch_unit="sequences", save_steps=10**6, cpu_threads=1)
    import torch

    before = torch.get_num_threads()
    run = prepare_run(cfg)
    assert run_training(run)["state"] == "completed"
    assert torch.get_num_threads() == before  # a configured count holds while training only
    doc = run.plan()
    sched, plan = doc["schedule"], doc["plan"]
    examples = _tokens_of(tiny_llama, data)
    n = len(examples)
    assert plan["batch_unit"] == "sequences" and "learning rate stays" in plan["reasons"]["batch_unit"]
    assert sched["train_examples"] < 0.7 * n  # sequences
    assert sched["steps_per_epoch"] == -(-sched["train_examples"] // 2) < n / 2  # counting examples: n / 2 steps
    assert sched["examples_per_step"] == pytest.approx(n / sched["steps_per_epoch"], abs=0.05)
    steps = [r for r in run.metrics() if r["type"] == "train"]
    assert len(steps) == sched["steps_per_epoch"]
    assert run.summary()["non_pad_tokens"] == sum(len(x) for x in examples)
    text = (run.path / "train.log").read_text()
    assert "CPU threads: 1 (as configured)" in text
    assert f"batch unit sequences: {n} examples packed into {sched['train_examples']} sequences of up to 256" in text


def _tokens_of(model_path, data):
    from qlora_studio.data import prepare_dataset
    from qlora_studio.loading import load_tokenizer

    return prepare_dataset(data, load_tokenizer(model_path), 256, eval_fraction=0.0).train["input_ids"]


# ------------------------------------------------------------------ LoRA dropout masks


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_16bit_dropout_masks_drop_at_the_rate_asked_each_element_alone_and_keep_the_expectation(p):
    import torch

    from qlora_studio.dropout import Dropout16

    drop = Dropout16(p).train()
    assert abs(drop.p - p) <= 0.5 / 65536
    torch.manual_seed(0)
    x = torch.ones(400, 1000, requires_grad=True)
    y = drop(x)
    assert [t.dtype for t in y.grad_fn.saved_tensors] == [torch.uint8]  # the mask kept: one byte an element
    kept = y != 0
    n = kept.numel()
    rate = 1 - kept.float().mean().item()
    assert abs(rate - p) < 4 * (p * (1 - p) / n) ** 0.5  # within 4 standard errors of p
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - drop.p)))
    assert y.mean().item() == pytest.approx(1.0, abs=4 * (p / (1 - p) / n) ** 0.5)  # expected output = input
    # neighbours are independent: the four numbers of one 64-bit draw are not dropped together
    pairs = (~kept[:, ::2]) & (~kept[:, 1::2])
    assert pairs.float().mean().item() == pytest.approx(p * p, abs=4 * (p * p / (n / 2)) ** 0.5)
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.full_like(y[kept], 2 / (1 - drop.p)))
    # the same seed gives the same mask; evaluation and p = 0 leave the input as it is
    torch.manual_seed(0)
    assert torch.equal(drop(torch.ones(400, 1000)) != 0, kept)
    assert drop.eval()(x) is x and Dropout16(0.0).train()(x) is x
    with pytest.raises(ValueError):
        Dropout16(1.0)
    # consecutive masks are independent of each other
    torch.manual_seed(0)
    first, second = (drop.train()(torch.ones(400, 1000)) == 0 for _ in range(2))
    assert (first & second).float().mean().item() == pytest.approx(p * p, abs=4 * (p * p / n) ** 0.5)


def test_16bit_dropout_numbers_are_splitmix64_and_a_16bit_input_keeps_its_mask_in_its_own_dtype():
    import torch

    from qlora_studio.dropout import Dropout16, random_bits

    # SplitMix64's published outputs for the seed 1234567 (its first output is that of counter 1)
    assert [v % 2**64 for v in random_bits(4, "cpu", seed=1234567)[1:].tolist()] == [
        6457827717110365317, 3203168211198807973, 9817491932198370423]
    gamma, mask = 0x9E3779B97F4A7C15, 2**64 - 1

    def splitmix64(counter):
        z = counter & mask
        for shift, mix in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            z = ((z ^ (z >> shift)) * mix) & mask
        return z ^ (z >> 31)

    seed = -(2**62) - 12345  # a negative seed, and more counters than any call before kept
    bits = random_bits(300_000, "cpu", seed=seed)
    for i in (0, 1, 77_777, 299_999):
        assert bits[i].item() % 2**64 == splitmix64(seed + i * gamma)
    torch.manual_seed(3)
    a = random_bits(10, "cpu")
    torch.manual_seed(3)
    assert torch.equal(a, random_bits(10, "cpu")) and not torch.equal(a, random_bits(10, "cpu"))

    drop = Dropout16(0.25).train()
    x = torch.randn(300, 500, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(1)
    y = drop(x)
    (keep,) = y.grad_fn.saved_tensors
    assert keep.dtype == torch.bfloat16 and set(keep.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(y, (x * keep * drop.scale).detach())
    torch.manual_seed(1)
    z, scale = drop.unscaled(x)  # the same mask, the scaling left to the caller
    assert scale == drop.scale and torch.equal(z, (x * keep).detach())
    assert drop.eval().unscaled(x) == (x, 1.0)


def test_a_cpu_run_uses_16bit_dropout_masks_learns_as_with_torchs_and_repeats_itself(studio_home, tiny_llama, tmp_path):
    from qlora_studio.catalog import load_architecture

    cpu = Machine("cpu", ram_available_bytes=8 * 2**30)
    no_dropout = plan_run(TrainConfig(model=str(tiny_llama), data="x.jsonl", lora_dropout=0.0), cpu,
                          load_architecture(tiny_llama))
    assert not any(line.startswith("dropout masks") for line in no_dropout.lines())

    data = _varied_data(tmp_path / "varied.jsonl", n=16)
    losses = {}
    for name, masks in (("a", None), ("b", None), ("torch", "torch")):
        run, log, losses[name] = train_tiny(tiny_llama, data, f"drop-{name}", lora_dropout=0.3, dropout_masks=masks)
        assert ("LoRA dropout: 16-bit masks in 14 layers" in log) == (masks is None)  # 2 layers x 7 linear
        assert run.plan()["plan"]["dropout_masks"] == (masks or "16bit")
    assert losses["a"] == losses["b"]  # the seed decides the masks
    assert losses["a"] != losses["torch"]  # other masks ...
    for a, b in zip(losses["a"], losses["torch"]):  # ... the same learning
        assert a == pytest.approx(b, rel=0.05)


def test_under_cpu_autocast_peft_4bit_lora_layers_keep_their_bf16_inputs_and_learn_the_same(tiny_llama):
    """peft 0.21 copies each 4-bit LoRA layer's input to fp32 unless CUDA autocast is on; the compat hook
    skips that copy under CPU autocast: the dropout and adapter see bf16, fewer activation copies are made,
    and the loss and the adapters' gradients are bit for bit those with the copies. Without autocast (as
    generation runs) the copies stay, and the layers still work."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils._python_dispatch import TorchDispatchMode

    from qlora_studio.compat import skip_lora_input_copies_under_autocast
    from qlora_studio.dropout import use_16bit_masks

    class Copies(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith("_to_copy") and args[0].dim() == 3:  # activations, not weights
                Copies.n += 1
            return func(*args, **(kwargs or {}))

    def adapted(hook: bool):
        model = load_base_model(tiny_llama, "nf4", "bf16", "cpu")
        keep_4bit_weights_trainable(model)
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.3,
                                                 bias="none", task_type="CAUSAL_LM"))
        use_16bit_masks(model)
        seen = []
        for name, module in model.named_modules():
            if name.endswith("lora_dropout.default"):
                module.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
        return model, (skip_lora_input_copies_under_autocast(model) if hook else 0), seen

    ids = torch.randint(0, 500, (1, 24))
    results = {}
    for hook in (False, True):
        model, hooked, seen = adapted(hook)
        assert hooked == (14 if hook else 0)  # 2 layers x 7 linear
        model.train()
        torch.manual_seed(1)
        Copies.n = 0
        with torch.autocast("cpu", dtype=torch.bfloat16), Copies():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[hook] = (loss.item(), grads, Copies.n, set(seen))
        model.eval()
        seen.clear()
        with torch.no_grad():  # no autocast: bf16 hidden states meet fp32 adapters, so peft's copy is needed
            assert torch.isfinite(model(input_ids=ids).logits).all()
        assert set(seen) == {torch.float32}
    (loss_a, grads_a, copies_a, dtypes_a), (loss_b, grads_b, copies_b, dtypes_b) = results[False], results[True]
    assert dtypes_a == {torch.float32} and dtypes_b == {torch.bfloat16}
    assert copies_b < copies_a - 2 * 14, (copies_a, copies_b)  # the up-copy and autocast's down-copy, per layer
    assert loss_a == loss_b and grads_a.keys() == grads_b.keys() and len(grads_a) == 28
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
