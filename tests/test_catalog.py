"""Model catalog: parameter counts against published totals, name lookup, config.json reading."""

import json

import pytest

from qlora_studio.catalog import CATALOG, ArchitectureError, architecture_from_config, load_architecture

# Published parameter totals (external facts: model cards / the shapes' official totals as listed in
# shared/reference/architectures.md; Qwen3-32B and Llama-2-13B from their model cards; Gemma 3 (text part)
# and SmolLM3-3B from keras-hub's presets, keras_hub/src/models/{gemma3,smollm3}/*_presets.py: "params" of
# gemma3_1b 999,885,952, gemma3_4b_text 3,880,099,328, gemma3_12b_text 11,765,788,416, gemma3_27b_text
# 27,009,002,240 (Kaggle checkpoints: vocab 262144; the Hub's 4B-27B add 64 embedding rows), smollm3_3b_en
# 3,075,100,928).
PUBLISHED_TOTALS = {
    "SmolLM2-135M": 134.5e6,
    "SmolLM2-360M": 361.8e6,
    "SmolLM2-1.7B": 1.711e9,
    "Qwen2.5-0.5B": 494.0e6,
    "Qwen2.5-1.5B": 1.544e9,
    "Qwen2.5-3B": 3.086e9,
    "Qwen2.5-7B": 7.616e9,
    "Qwen2.5-14B": 14.770e9,
    "Qwen2.5-32B": 32.764e9,
    "Qwen2.5-72B": 72.706e9,
    "Qwen3-0.6B": 596.0e6,
    "Qwen3-1.7B": 1.721e9,
    "Qwen3-4B": 4.022e9,
    "Qwen3-8B": 8.191e9,
    "Qwen3-14B": 14.768e9,
    "Qwen3-32B": 32.8e9,
    "Llama-3.2-1B": 1.236e9,
    "Llama-3.2-3B": 3.213e9,
    "Llama-3.1-8B": 8.030e9,
    "Llama-3.1-70B": 70.554e9,
    "Mistral-7B-v0.1": 7.242e9,
    "Mistral-7B-v0.3": 7.248e9,
    "Gemma-2-2B": 2.614e9,
    "Gemma-2-9B": 9.242e9,
    "Phi-3.5-mini": 3.821e9,
    "Llama-2-13B": 13.016e9,
    "Gemma-3-1B": 999_885_952,
    "Gemma-3-4B": 3_880_099_328,
    "Gemma-3-12B": 11_765_788_416,
    "Gemma-3-27B": 27_009_002_240,
    "SmolLM3-3B": 3_075_100_928,
}

# Gemma 3's vision encoder + projector: keras-hub's vision+text totals minus the text ones (gemma3_4b
# 4,299,915,632; gemma3_12b 12,187,079,280; gemma3_27b 27,432,062,576).
PUBLISHED_VISION = {
    "Gemma-3-4B": 4_299_915_632 - 3_880_099_328,
    "Gemma-3-12B": 12_187_079_280 - 11_765_788_416,
    "Gemma-3-27B": 27_432_062_576 - 27_009_002_240,
}

# "P_lin (quantizable)" column of architectures.md: the linear weights inside the decoder blocks.
PUBLISHED_LINEAR = {
    "Qwen2.5-7B": 6.525e9,
    "Llama-3.1-8B": 6.979e9,
    "Gemma-2-9B": 8.324e9,
    "Phi-3.5-mini": 3.624e9,
    "SmolLM2-135M": 106.2e6,
}


def test_every_catalog_model_has_a_published_total():
    assert sorted(PUBLISHED_TOTALS) == sorted(a.name for a in CATALOG)


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_parameter_count_matches_published_total(name):
    arch = load_architecture(name)
    published = PUBLISHED_TOTALS[name]
    assert abs(arch.total_params - published) / published <= 0.005, (arch.total_params, published)


@pytest.mark.parametrize("name", sorted(PUBLISHED_VISION))
def test_gemma3_vision_encoder_matches_published(name):
    arch = load_architecture(name)
    assert arch.vision_params == PUBLISHED_VISION[name]
    assert arch.vision_params not in (0, None) and arch.param_counts().total == arch.total_params  # counted apart


def test_gemma3_hub_config_reads_like_the_catalog_entry(tmp_path):
    """google/gemma-3-4b-it's config.json leaves most text shapes to transformers' defaults."""
    pytest.importorskip("transformers")
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "sliding_window": 1024},
           "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                             "model_type": "siglip_vision_model", "num_attention_heads": 16,
                             "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    read, catalog = load_architecture(path), load_architecture("google/gemma-3-4b-it")
    assert read.param_counts() == catalog.param_counts() and read.vision_params == catalog.vision_params
    assert read.qk_norm and read.norms_per_layer == 4 and read.tied_embeddings and read.vocab_size == 262208


@pytest.mark.parametrize("name, gated, licence", [
    ("Qwen3-8B", False, "apache-2.0"), ("SmolLM3-3B", False, "apache-2.0"), ("Phi-3.5-mini", False, "mit"),
    ("Qwen2.5-7B", False, "apache-2.0"), ("Llama-3.2-3B", True, "llama3.2"), ("Gemma-3-4B", True, "gemma"),
    ("Gemma-2-9B", True, "gemma"), ("Mistral-7B-v0.3", True, "apache-2.0"),
])
def test_licence_and_gating(name, gated, licence):
    arch = load_architecture(name)
    assert (arch.gated, arch.licence) == (gated, licence)
    assert ("gated: accept the licence on the Hub first" in arch.access) == gated


def test_every_entry_names_its_instruct_model_first():
    for arch in CATALOG:
        assert arch.licence, arch.name
        first = arch.instruct_id.lower()
        assert not first.endswith(("-base", "-pt")) and first != arch.name.lower(), arch.name
        if any(h.lower().endswith(("-instruct", "-it", "-chat-hf")) for h in arch.hub_ids):
            assert first.endswith(("-instruct", "-it", "-chat-hf")) or "-instruct-" in first, arch.name


@pytest.mark.parametrize("name", sorted(PUBLISHED_LINEAR))
def test_quantizable_count_matches_published(name):
    counts = load_architecture(name).param_counts()
    assert abs(counts.quantizable - PUBLISHED_LINEAR[name]) / PUBLISHED_LINEAR[name] <= 0.005


def test_per_module_counts_llama_3_1_8b_by_hand():
    c = load_architecture("Llama-3.1-8B").param_counts()
    h, L, kv, inter, vocab = 4096, 32, 8 * 128, 14336, 128256
    assert c.embeddings == vocab * h
    assert c.lm_head == vocab * h  # untied
    assert c.attention == L * (h * h + 2 * h * kv + h * h)  # q, k, v (grouped-query), o
    assert c.mlp == L * 3 * h * inter
    assert c.norms == L * 2 * h + h
    assert c.attention_biases == 0


def test_module_details_of_special_families():
    qwen2 = load_architecture("Qwen2.5-0.5B").param_counts()
    assert qwen2.attention_biases == 24 * (896 + 2 * 128)  # q, k, v biases
    assert qwen2.lm_head == 0  # tied
    qwen3 = load_architecture("Qwen3-0.6B")
    assert qwen3.param_counts().norms == 28 * (2 * 1024 + 2 * 128) + 1024  # + q_norm/k_norm
    assert qwen3.head_dim * qwen3.num_heads != qwen3.hidden_size  # head_dim 128 != 1024 / 16
    gemma = load_architecture("Gemma-2-2B").param_counts()
    assert gemma.norms == 26 * 4 * 2304 + 2304
    gemma3 = load_architecture("Gemma-3-1B")  # 4 norms per layer and q/k norms; head_dim 256 != 1152 / 4
    assert gemma3.param_counts().norms == 26 * (4 * 1152 + 2 * 256) + 1152
    assert gemma3.q_dim == 4 * 256 and gemma3.kv_dim == 256
    phi = load_architecture("Phi-3.5-mini")
    assert [m.name for m in phi.linear_layers()] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert phi.linear_layers()[0].out_features == 3 * 3072


@pytest.mark.parametrize("given, expected", [
    ("Qwen2.5-7B", "Qwen2.5-7B"),
    ("qwen2.5-7b", "Qwen2.5-7B"),
    ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B"),
    ("meta-llama/Llama-3.1-8B", "Llama-3.1-8B"),
    ("meta-llama/Meta-Llama-3.1-8B-Instruct", "Llama-3.1-8B"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "Mistral-7B-v0.3"),
    ("google/gemma-2-9b-it", "Gemma-2-9B"),
    ("microsoft/Phi-3.5-mini-instruct", "Phi-3.5-mini"),
    ("meta-llama/Llama-2-13b-hf", "Llama-2-13B"),
    ("google/gemma-3-1b-it", "Gemma-3-1B"),
    ("google/gemma-3-27b-pt", "Gemma-3-27B"),
    ("gemma-3-12b", "Gemma-3-12B"),
    ("HuggingFaceTB/SmolLM3-3B", "SmolLM3-3B"),
    ("Qwen/Qwen3-14B", "Qwen3-14B"),
    ("meta-llama/Llama-3.2-1B-Instruct", "Llama-3.2-1B"),
])
def test_names_and_hub_ids_resolve(given, expected):
    assert load_architecture(given).name == expected


def test_unknown_name_lists_close_catalog_names():
    with pytest.raises(ArchitectureError) as e:
        load_architecture("Qwen2.5-8B")
    assert "Qwen2.5-7B" in str(e.value)
    with pytest.raises(ArchitectureError, match="no such file"):
        load_architecture("./missing/config.json")


def _llama_config(**over):
    cfg = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True}
    cfg.update(over)
    return cfg


def test_model_folder_and_config_path(tmp_path):
    folder = tmp_path / "my-smol"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_llama_config()))
    from_folder = load_architecture(folder)
    from_file = load_architecture(str(folder / "config.json"))
    assert from_folder.total_params == from_file.total_params == load_architecture("SmolLM2-135M").total_params
    assert from_folder.name == "my-smol"


def test_config_defaults_follow_transformers(tmp_path):
    cfg = _llama_config()
    del cfg["tie_word_embeddings"], cfg["num_key_value_heads"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    arch = load_architecture(path)
    assert not arch.tied_embeddings  # LlamaConfig defaults to untied
    assert arch.num_kv_heads == arch.num_heads
    assert arch.head_dim == 576 // 9


@pytest.mark.parametrize("content, field", [
    (json.dumps({"model_type": "gpt2", "n_embd": 768, "n_layer": 12}), "hidden_size"),
    (json.dumps(_llama_config(vocab_size="many")), "vocab_size"),
    (json.dumps(_llama_config(num_key_value_heads=4)), "num_key_value_heads"),
    (json.dumps(_llama_config(num_local_experts=8)), "num_local_experts"),
])
def test_bad_config_names_file_and_field(tmp_path, content, field):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ArchitectureError) as e:
        load_architecture(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ArchitectureError, match="not valid JSON"):
        load_architecture(path)


# One model per family (the others agree too, but each build costs a fraction of a second).
@pytest.mark.parametrize("name", ["SmolLM2-135M", "Qwen2.5-0.5B", "Qwen3-0.6B", "Llama-3.2-1B", "Mistral-7B-v0.3",
                                  "Gemma-2-2B", "Gemma-3-1B", "SmolLM3-3B", "Phi-3.5-mini"])
def test_counts_equal_transformers_own_modules(name):
    """Build the architecture on the meta device with transformers and count its parameters."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = load_architecture(name)
    cfg = arch.to_config_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    assert sum(p.numel() for p in model.parameters()) == arch.total_params
    roundtrip = architecture_from_config(arch.to_config_dict(), "config.json")
    assert roundtrip.param_counts() == arch.param_counts()


def test_gemma3_multimodal_count_equals_transformers_own_modules():
    """The Hub's google/gemma-3-4b-it: decoder (vocab 262208) + SigLIP encoder + projector, built on the meta device."""
    torch = pytest.importorskip("torch")
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    arch = load_architecture("google/gemma-3-4b-it")
    text = arch.to_config_dict()
    text.pop("model_type")
    v = arch.vision
    vision = dict(hidden_size=v.hidden, intermediate_size=v.intermediate, num_hidden_layers=v.layers,
                  image_size=v.image, patch_size=v.patch, num_attention_heads=16, vision_use_head=False)
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision))
    assert sum(p.numel() for p in model.parameters()) == arch.total_params + arch.vision_params
