"""Estimator: byte formulas by hand, the weights term against models really loaded in 4-bit on the CPU,
the activation and logits terms against the tensors autograd really keeps, recommendations, calibration, CLI."""

import json
import weakref
from pathlib import Path

import pytest
import torch

from qlora_studio.catalog import Architecture, architecture_from_config, load_architecture
from qlora_studio.estimator import (
    BREAKDOWN_KEYS,
    GiB,
    calibration_factor,
    estimate,
    layer_activation_bytes_per_token,
    lora_params,
    optimizer_bytes,
    quantized_linear_bytes,
    record_measurement,
    weights_bytes,
)
from qlora_studio.recommend import recommend

# ------------------------------------------------------------------ byte formulas by hand


def test_quantized_linear_bytes_by_hand():
    n = 4096 * 4096  # 16,777,216 weights, 262,144 blocks of 64
    # no double quant: 4-bit data + an fp32 absmax per block + the 16-value fp32 code table
    assert quantized_linear_bytes(n, double_quant=False) == 8_388_608 + 262_144 * 4 + 64
    # double quant: 8-bit absmax per block + fp32 per 256 absmax (1024 of them) + 256-value code + offset + table
    assert quantized_linear_bytes(n, double_quant=True) == 8_388_608 + 262_144 + 1024 * 4 + 1028 + 64
    # per parameter: 0.5625 B and ~0.5159 B
    assert quantized_linear_bytes(n, False) / n == pytest.approx(0.5625, abs=1e-4)
    assert quantized_linear_bytes(n, True) / n == pytest.approx(0.5159, abs=1e-4)


def test_weights_16bit_and_4bit_by_hand():
    arch = load_architecture("Llama-3.1-8B")
    counts = arch.param_counts()
    assert weights_bytes(arch, "none") == 2 * 8_030_261_248
    per_layer = sum(quantized_linear_bytes(m.weight_params, True) for m in arch.linear_layers())
    assert weights_bytes(arch, "nf4", True) == 32 * per_layer + 2 * counts.unquantized
    # fp4 stores the same bytes as nf4
    assert weights_bytes(arch, "fp4", True) == weights_bytes(arch, "nf4", True)


# "LoRA r16 all-lin" column of architectures.md (Phi-3.5: PEFT sees the fused qkv_proj/gate_up_proj).
PUBLISHED_LORA_R16_ALL = {"SmolLM2-135M": 4.9e6, "Qwen2.5-7B": 40.4e6, "Llama-3.1-8B": 41.9e6,
                          "Llama-3.1-70B": 207.1e6, "Gemma-2-9B": 54.0e6, "Qwen3-8B": 43.6e6}


@pytest.mark.parametrize("name", sorted(PUBLISHED_LORA_R16_ALL))
def test_lora_params_match_published(name):
    got = lora_params(load_architecture(name), 16, "all")
    assert got == pytest.approx(PUBLISHED_LORA_R16_ALL[name], rel=0.01)


def test_lora_params_by_hand():
    arch = load_architecture("Llama-3.1-8B")
    # q, o: 16 x (4096 + 4096); k, v: 16 x (4096 + 1024); 32 layers
    assert lora_params(arch, 16, "attention") == 32 * (2 * 16 * 8192 + 2 * 16 * 5120)
    phi = load_architecture("Phi-3.5-mini")  # fused: r(h + q + 2kv) + r(q + h) + r(h + 2I) + r(I + h)
    assert lora_params(phi, 16, "all") == 32 * 16 * ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072))


def test_optimizer_bytes_by_hand():
    assert optimizer_bytes([10_000], "adamw_torch") == 10_000 * (8 + 4)
    # 8-bit: 2 B per value + two fp32 absmax per 256-value block (40 blocks)
    assert optimizer_bytes([10_000], "adamw_8bit") == 20_000 + 2 * 4 * 40
    assert optimizer_bytes([10_000], "paged_adamw_8bit") == optimizer_bytes([10_000], "adamw_8bit")
    assert optimizer_bytes([1_000], "adamw_8bit") == 8_000  # under 4096 values: 32-bit states


def _small_arch(**over) -> Architecture:
    base = dict(name="small", model_type="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, intermediate_size=128, vocab_size=1000, tied_embeddings=False)
    base.update(over)
    return Architecture(**base)


def test_layer_activations_by_hand():
    arch = _small_arch()  # h 64, q 64, kv 32, I 128
    got = layer_activation_bytes_per_token(arch, c=2, hb=2, rank=4, targets="attention", attention="sdpa",
                                           seq=100, padded=False)
    expected = (
        (4 * 64 + 2 * 64)  # input norm: fp32 input + bf16 output read by the adapted q/k/v
        + 4 * 64  # post-attention norm: fp32 input (the MLP is not adapted: its input is not kept)
        + 2 * 64 + 2 * 32 + 2 * 32  # q, k, v after RoPE (grouped-query heads not expanded)
        + 2 * 64 + 4 * 4  # SDPA output + fp32 log-sum-exp per head
        + 3 * 2 * 128  # gate output, activation output, up output
        + 2 * 4 * 4  # the rank-4 output of the four LoRA A matrices
    )
    assert got == expected == 1840
    # eager adds fp32 + bf16 probabilities per head per key position; k/v expanded to every head
    eager = layer_activation_bytes_per_token(arch, c=2, hb=2, rank=4, targets="attention", attention="eager",
                                             seq=100, padded=False)
    assert eager - got == 6 * 4 * 100 + 2 * (2 * 64 - 2 * 32) - 4 * 4


def test_estimate_terms_by_hand():
    arch = _small_arch(vocab_size=1000)
    e = estimate(arch, batch=2, seq=100, rank=4, targets="attention", optimizer="adamw_torch")
    b = e.breakdown
    trainable = lora_params(arch, 4, "attention")
    assert b["adapters"] == (4 + 2) * trainable  # fp32 masters + bf16 autocast copies
    assert b["gradients"] == 4 * trainable
    assert b["optimizer"] == optimizer_bytes([4 * 64, 4 * 64, 4 * 64, 4 * 32, 4 * 64, 4 * 32, 4 * 64, 4 * 64] * 2,
                                             "adamw_torch")
    assert b["logits"] == 12 * 2 * 100 * 1000  # b x s x vocab, 12 B each
    assert b["weights"] == weights_bytes(arch, "nf4", True)
    assert e.total_bytes == sum(b.values())


def test_breakdown_shape_and_directions():
    arch = load_architecture("Qwen2.5-7B")
    base = estimate(arch)
    assert set(base.breakdown) == set(BREAKDOWN_KEYS)
    assert set(base.to_dict()) == {"total_bytes", "breakdown", "assumptions"}
    assert base.total_bytes == sum(base.breakdown.values())
    assert base.assumptions and all(isinstance(a, str) for a in base.assumptions)
    no_ckpt = estimate(arch, grad_checkpointing=False, batch=4, seq=2048)
    ckpt = estimate(arch, batch=4, seq=2048)
    assert no_ckpt.breakdown["activations"] > 5 * ckpt.breakdown["activations"]
    eager, sdpa = (estimate(arch, attention=a, seq=2048, grad_checkpointing=False) for a in ("eager", "sdpa"))
    assert eager.breakdown["activations"] - sdpa.breakdown["activations"] > 28 * 28 * 2048**2 * 6
    # with checkpointing one layer's scores are recomputed after the logits are freed: they count only
    # when larger than the logits peak (a 32k vocabulary at batch 4 x 2048)
    llama2 = load_architecture("Llama-2-13B")
    assert (estimate(llama2, attention="eager", batch=4, seq=2048).total_bytes
            > estimate(llama2, batch=4, seq=2048).total_bytes + 2 * GiB)
    assert estimate(arch, quant="none").breakdown["weights"] > 2.5 * base.breakdown["weights"]
    assert estimate(arch, double_quant=False).breakdown["weights"] > base.breakdown["weights"]
    assert estimate(arch, rank=64, targets="all").breakdown["adapters"] > base.breakdown["adapters"]
    assert estimate(arch, optimizer="adamw_torch").breakdown["optimizer"] > base.breakdown["optimizer"]
    full = estimate(arch, method="full", optimizer="adamw_torch")
    assert full.total_bytes > 16 * arch.total_params  # fp32 weights + grads + two fp32 states
    with pytest.raises(ValueError):
        estimate(arch, method="full", quant="nf4")
    with pytest.raises(ValueError):
        estimate(arch, batch=0)


def test_logits_dominate_for_big_vocabularies():
    e = estimate(load_architecture("Llama-3.1-8B"), batch=4, seq=2048)
    assert e.breakdown["logits"] == 12 * 4 * 2048 * 128256
    assert e.breakdown["logits"] == max(v for k, v in e.breakdown.items() if k != "weights")


def test_published_short_context_7b_is_about_7_gb():
    # A vendor's table: "Qwen 7B, NF4: ~7 GB" (short context, checkpointing).
    total = estimate(load_architecture("Qwen2.5-7B"), seq=512).total_bytes
    assert 6e9 <= total <= 8.5e9


# ------------------------------------------------------------------ weights term vs the CPU reality

import bitsandbytes as bnb  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402


def loaded_footprint(model) -> tuple[int, int]:
    """(all bytes, bytes of 4-bit layers) of a loaded model: parameters and buffers, plus the quant_state
    tensors bitsandbytes keeps beside each 4-bit weight (absmax, nested absmax, codes), each storage once."""
    seen = set()

    def size(t) -> int:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    total = sum(size(t) for t in list(model.parameters()) + list(model.buffers()))
    quantized = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            tensors = [module.weight, qs.absmax, qs.code]
            if qs.nested:
                tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
            for t in tensors:
                n = t.untyped_storage().nbytes()
                quantized += n
                total += size(t) if t is not module.weight else 0
    return total, quantized


TINY_CONFIGS = {
    # hidden 512, six layers: the 4-bit layers carry more than half of the bytes, while bitsandbytes'
    # CPU quantization (slow: ~0.3 s per million weights) stays within a few seconds per load.
    "llama": dict(model_type="llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    paths = {}
    for family, cfg in TINY_CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.bfloat16)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        paths[family] = path
    return paths


def _load_4bit(path, quant: str, double_quant: bool, **kwargs):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.bfloat16, **kwargs)


# Each family with both quant types and both double-quant settings between them (four loads, not eight).
@pytest.mark.parametrize("family, quant, double_quant", [
    ("llama", "nf4", True), ("llama", "fp4", False), ("qwen2", "nf4", False), ("qwen2", "fp4", True),
])
def test_weights_term_matches_model_loaded_in_4bit(tiny_checkpoints, family, quant, double_quant):
    model = _load_4bit(tiny_checkpoints[family], quant, double_quant)
    actual_total, actual_4bit = loaded_footprint(model)
    arch = architecture_from_config(TINY_CONFIGS[family], tiny_checkpoints[family] / "config.json")
    estimated_4bit = arch.num_layers * sum(quantized_linear_bytes(m.weight_params, double_quant)
                                           for m in arch.linear_layers())
    assert actual_4bit > 0.5 * actual_total  # the 4-bit layers carry most of the bytes
    assert estimated_4bit == pytest.approx(actual_4bit, rel=0.01)
    assert weights_bytes(arch, quant, double_quant) == pytest.approx(actual_total, rel=0.02)


@pytest.mark.slow
def test_weights_term_matches_embedded_model_loaded_in_4bit(embedded_path):
    path = embedded_path
    arch = load_architecture(path)
    assert arch.total_params == pytest.approx(134.5e6, rel=0.005)
    model = _load_4bit(path, "nf4", True)
    actual_total, _ = loaded_footprint(model)
    assert weights_bytes(arch, "nf4", True) == pytest.approx(actual_total, rel=0.02)


# ------------------------------------------------------------------ activations + logits vs live tensors


class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of tensor storages created inside the mode while they are alive; keeps the peak.
    Storages that existed before (weights, quant states, adapters) are not counted."""

    def __init__(self, model):
        super().__init__()
        self.existing = set()
        for t in list(model.parameters()) + list(model.buffers()):
            self.existing.add(t.untyped_storage().data_ptr())
            qs = getattr(t, "quant_state", None)
            if qs is not None:
                extra = [qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
                self.existing.update(x.untyped_storage().data_ptr() for x in extra)
        self.seen = torch.utils.weak.WeakIdKeyDictionary()
        self.current = self.peak = 0

    def _free(self, n):
        self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage in self.seen or storage.data_ptr() in self.existing:
                    continue
                n = storage.nbytes()
                self.seen[storage] = n
                self.current += n
                weakref.finalize(storage, self._free, n)
                self.peak = max(self.peak, self.current)
        return out


LIVE_CONFIGS = {
    # small vocab so that the per-layer activations weigh as much as the logits
    "llama": dict(model_type="llama", hidden_size=384, intermediate_size=1024, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=384, intermediate_size=1024, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True),
    # Gemma 3: four norms per layer, q/k norms, head_dim apart from hidden / heads; sequences inside the window
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=384, intermediate_size=1024, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=128, vocab_size=2048,
                        tie_word_embeddings=True, sliding_window=512, query_pre_attn_scalar=128),
}


@pytest.mark.parametrize("family, batch, checkpointing, attention, targets", [
    ("llama", 1, True, "sdpa", "all"),
    ("llama", 2, False, "sdpa", "attention"),
    ("qwen2", 2, False, "eager", "all"),
    ("gemma3_text", 1, False, "sdpa", "all"),
])
def test_activation_and_logits_terms_match_live_tensors(tmp_path, monkeypatch, family, batch, checkpointing,
                                                        attention, targets):
    """One forward + backward of a real 4-bit model with LoRA, counting every tensor autograd keeps.

    At the measured peak (the start of backward, in the loss) live: the activations, the logits and the
    compute-dtype copies of the adapters. The estimate must match that within 10%; with the adapter
    gradients and the dequantized weight it also books (they are alive at other moments), it must
    cover the peak."""
    from peft import LoraConfig, get_peft_model

    seq = 128
    cfg = LIVE_CONFIGS[family]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.bfloat16).save_pretrained(tmp_path)
    model = _load_4bit(tmp_path, "nf4", True, attn_implementation=attention)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    names = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["gate_proj", "up_proj", "down_proj"] if targets == "all" else [])
    model = get_peft_model(model, LoraConfig(r=8, target_modules=names, lora_dropout=0.0))
    model.train()
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq))
    mask = torch.ones_like(ids)
    mask[1:, -5:] = 0  # padding in every row but the first
    # peft checks torch.is_autocast_enabled(), which reports CUDA autocast only; answer as on a GPU.
    real = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: real(*a) if a else True)
    tracker = LiveTensorBytes(model)
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask if batch > 1 else None, labels=ids)
        loss = out.loss
        del out  # as the Trainer does
        loss.backward()

    arch = architecture_from_config(cfg, tmp_path / "config.json")
    e = estimate(arch, rank=8, targets=targets, batch=batch, seq=seq, grad_checkpointing=checkpointing,
                 attention=attention)
    autocast_copies = e.breakdown["adapters"] - 4 * e.params_trainable
    at_peak = e.breakdown["activations"] + e.breakdown["logits"] + autocast_copies
    dequantized = 2 * max(m.weight_params for m in arch.linear_layers())
    assert at_peak == pytest.approx(tracker.peak, rel=0.10), (tracker.peak, at_peak)
    assert at_peak + e.breakdown["gradients"] + dequantized >= tracker.peak


# ------------------------------------------------------------------ recommendation

VRAM_STEPS_GB = [4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 80]


@pytest.mark.parametrize("seq", [512, 2048])
def test_recommendation_never_shrinks_with_more_vram(seq):
    sizes = []
    for gb in VRAM_STEPS_GB:
        plan = recommend(gb * GiB, seq=seq)
        sizes.append(plan.params or 0)
        if plan.fits:
            assert plan.estimate.total_bytes * 1.25 <= gb * GiB
    assert sizes == sorted(sizes), list(zip(VRAM_STEPS_GB, sizes))
    assert sizes[-1] > sizes[0]


def test_recommendation_spot_checks():
    big = recommend(24 * GiB, seq=512)
    assert big.params >= 7e9
    assert estimate(load_architecture("Llama-3.1-8B"), seq=512).total_bytes * 1.25 <= 24 * GiB
    small = recommend(4 * GiB, seq=512)
    assert small.fits and small.params <= 2.0e9
    assert small.quant == "nf4" and small.grad_checkpointing
    assert small.batch * small.grad_accum >= 8


def test_recommendation_uses_free_memory_and_says_so():
    from qlora_studio.hardware import GpuInfo

    gpu = GpuInfo(index=0, name="NVIDIA GeForce RTX 3090", total_bytes=24 * GiB, free_bytes=14 * GiB,
                  used_bytes=10 * GiB, other_processes_bytes=9 * GiB, driver_version="550", cuda_driver_version="12.4",
                  compute_capability=(8, 6))
    busy = recommend(gpu)
    idle = recommend(24 * GiB)
    assert busy.usable_bytes == 14 * GiB
    assert busy.params < idle.params
    assert any("other processes hold" in n for n in busy.notes)


def test_recommendation_for_named_cards():
    from qlora_studio.hardware import find_gpu

    pascal = recommend(find_gpu("GTX 1080 Ti"))
    assert pascal.compute_dtype == "fp32" and any("bf16" in n for n in pascal.notes)
    t4 = recommend(find_gpu("T4"))
    assert t4.compute_dtype == "fp16" and t4.fits


def test_recommendation_for_a_12_gb_card_is_an_open_instruct_model():
    plan = recommend(12 * GiB, seq=512)
    arch = load_architecture(plan.model)
    assert plan.fits and not plan.gated and not arch.gated
    assert plan.hub_id == arch.instruct_id and plan.licence == arch.licence
    text = plan.text()
    assert f"download: {plan.hub_id} ({plan.licence}, open download)" in text
    # the larger gated model that also fits is named, and marked
    gated_notes = [n for n in plan.notes if "also fits" in n]
    assert gated_notes and all("gated: accept the licence on the Hub first" in n for n in gated_notes)
    larger = load_architecture(gated_notes[0].split(" (")[0])
    assert larger.gated and larger.total_params > plan.params


def test_a_gated_recommendation_is_marked():
    plan = recommend(12 * GiB, seq=512, prefer_open=False)  # ranked by size alone
    assert plan.fits and plan.gated and load_architecture(plan.model).gated
    assert plan.params > recommend(12 * GiB, seq=512).params
    recommended = next(line for line in plan.text().splitlines() if line.startswith("Recommended:"))
    assert recommended.endswith("gated: accept the licence on the Hub first")
    assert plan.to_dict()["gated"] is True and plan.to_dict()["hub_id"] == plan.hub_id


def test_gemma3_memory_counts_its_vision_encoder_and_its_vocabulary():
    arch = load_architecture("Gemma-3-4B")
    text_only = Architecture(**{**arch.__dict__, "vision": None})
    assert weights_bytes(arch, "nf4", True) == weights_bytes(text_only, "nf4", True) + 2 * arch.vision_params
    e = estimate(arch, seq=512, batch=1)
    assert e.breakdown["logits"] == 512 * 12 * 262208  # fp32 log-probs + their gradients, 262k vocabulary
    assert any("vision encoder" in a for a in e.assumptions)
    assert not any("vision encoder" in a for a in estimate(load_architecture("Gemma-3-1B")).assumptions)


def test_nothing_fits_says_what_to_change():
    plan = recommend(1 * GiB, seq=2048)
    assert not plan.fits and plan.model is None
    assert any("shorten" in s or "at least" in s for s in plan.suggestions)
    assert "Nothing" in plan.text()


# ------------------------------------------------------------------ calibration


def test_calibration_factor(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_STUDIO_HOME", str(tmp_path))
    assert calibration_factor("RTX 3060") == 1.0
    for measured in (11, 12, 13):
        record_measurement(10 * GiB, measured * GiB, "RTX 3060", model="Qwen2.5-7B")
    record_measurement(10 * GiB, 30 * GiB, "Other GPU")
    assert calibration_factor("rtx 3060") == pytest.approx(1.2)
    assert calibration_factor("Other GPU") == 1.5  # clamped
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert len(data["measurements"]) == 4 and data["measurements"][0]["model"] == "Qwen2.5-7B"
    arch = load_architecture("Qwen2.5-7B")
    raw = estimate(arch)
    scaled = estimate(arch, calibrated=True, gpu_name="RTX 3060")
    assert scaled.total_bytes == pytest.approx(1.2 * raw.total_bytes, rel=1e-3)
    assert scaled.total_bytes == sum(scaled.breakdown.values())
    assert any("1.200" in a for a in scaled.assumptions)


# ------------------------------------------------------------------ CLI


def _cli_json(capsys, *argv):
    from qlora_studio.cli import main

    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_estimate_json_contract(capsys):
    data = _cli_json(capsys, "estimate", "--model", "Qwen2.5-7B", "--json")
    assert set(data) == {"total_bytes", "breakdown", "assumptions"}
    assert set(data["breakdown"]) == set(BREAKDOWN_KEYS)
    assert data["total_bytes"] == sum(data["breakdown"].values())
    other = _cli_json(capsys, "estimate", "--model", "Qwen/Qwen2.5-7B-Instruct", "--method", "qlora", "--quant", "fp4",
                      "--no-double-quant", "--rank", "8", "--targets", "all", "--batch", "2", "--seq", "1024",
                      "--no-grad-checkpointing", "--optimizer", "adamw_torch", "--attention", "eager", "--json")
    assert other["total_bytes"] > data["total_bytes"]


def test_cli_recommend_json(capsys):
    data = _cli_json(capsys, "recommend", "--vram-gb", "12", "--json")
    assert data["model"] and data["estimate"]["total_bytes"] * 1.25 <= 12 * GiB
    named = _cli_json(capsys, "recommend", "--gpu", "rtx 3060", "--seq", "1024", "--json")
    assert named["gpu"] == "RTX 3060 12 GB" and named["seq"] == 1024
    assert data["gated"] is False and data["hub_id"] and data["licence"]
    gated = _cli_json(capsys, "recommend", "--vram-gb", "12", "--include-gated", "--json")
    assert gated["gated"] is True and gated["params"] > data["params"]


def test_cli_recommend_marks_a_gated_model(capsys):
    from qlora_studio.cli import main

    assert main(["recommend", "--vram-gb", "12"]) == 0
    out = capsys.readouterr().out
    assert "open download" in out and "also fits; gated: accept the licence on the Hub first" in out
    assert main(["recommend", "--vram-gb", "12", "--include-gated"]) == 0
    out = capsys.readouterr().out
    assert next(line for line in out.splitlines() if line.startswith("Recommended:")).endswith(
        "gated: accept the licence on the Hub first")


def test_cli_tables_and_user_errors(capsys, tmp_path):
    from qlora_studio.cli import main

    assert main(["estimate", "--model", "Llama-3.1-8B", "--batch", "4", "--seq", "2048"]) == 0
    assert "logits" in capsys.readouterr().out
    assert main(["estimate", "--model", "Qwen2.5-8B"]) == 2
    assert "Qwen2.5-7B" in capsys.readouterr().err
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert main(["estimate", "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "num_hidden_layers" in err
    assert main(["recommend", "--gpu", "rtx 9090"]) == 2
    assert main(["estimate", "--model", "Qwen2.5-7B", "--method", "full", "--quant", "nf4"]) == 2


def test_gpu_benchmark_without_cuda_exits_with_one_line():
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the benchmark would really run")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "vram_accuracy.py"), "--only", "0.5B"],
                         capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "CUDA" in out.stderr and "Traceback" not in out.stderr
    listed = subprocess.run([sys.executable, str(root / "benchmarks" / "vram_accuracy.py"), "--list"],
                            capture_output=True, text=True, timeout=120, cwd=root)
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) >= 13  # header + >= 12 configurations
