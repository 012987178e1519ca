"""The model catalog's table: published config.json values, where each download comes from, and its licence.

Plain data (no imports from the rest of the studio): `catalog.py` turns each row into an `Architecture`.
A row is ``(name, model_type, hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, tied, hub_ids,
licence, gated, extra)``:

- ``hub_ids``: the instruct (chat) model's Hub id first: that is what a recommendation downloads;
  then the base model and other spellings that name the same shapes.
- ``licence``: the licence tag of the Hub repository (apache-2.0, mit, llama3.2, gemma, ...).
- ``gated``: True when the Hub repository asks you to log in and accept its licence (or share your contact
  details) before the files download. Llama and Gemma repositories are gated; Mistral's have been since
  April 2024 (contact details). Qwen, SmolLM and Phi repositories download without an account.
- ``extra``: what else the architecture has (see `catalog.Architecture`).

Sources of the shapes: shared/reference/architectures.md (from LitGPT's `litgpt/config.py`, which cites each
Hub config.json, and torchtune's model builders) for the older rows, and for the newer ones:

- Qwen3 0.6B-32B: LitGPT `litgpt/config.py` (https://huggingface.co/Qwen/Qwen3-*/blob/main/config.json).
- Llama 3.2 1B/3B: LitGPT `litgpt/config.py` (https://huggingface.co/meta-llama/Llama-3.2-*/blob/main/config.json).
- Gemma 3 1B/4B/12B/27B: transformers' `models/gemma3/convert_gemma3_weights.py` (``_VARIANTS``: the configs
  the Hub checkpoints were converted with; 4B and up get 64 extra embedding rows, vocab 262208, and carry
  a SigLIP vision encoder, ``_VISION_CONFIG``), agreeing with LitGPT's Gemma 3 entries on every shape.
- SmolLM3-3B: transformers' `SmolLM3Config` defaults (documented as HuggingFaceTB/SmolLM3-3B) and copies of
  the Hub config.json in public test suites (hidden 2048, 36 layers, 16/4 heads, intermediate 11008,
  vocab 128256, tied embeddings; every 4th layer has no RoPE, which changes no shape).
"""

from __future__ import annotations

QWEN2 = dict(qkv_bias=True)
QWEN3 = dict(qk_norm=True)
GEMMA2 = dict(norms_per_layer=4, final_logit_softcap=True)
GEMMA3 = dict(norms_per_layer=4, qk_norm=True)
PHI3 = dict(fused_qkv=True, fused_gate_up=True)
# Gemma 3 4B/12B/27B: SigLIP-So400m at 896 px, patch 14 (vision_config of the Hub config.json)
SIGLIP_896 = dict(hidden=1152, intermediate=4304, layers=27, image=896, patch=14)

OPEN, GATED = False, True

ENTRIES: tuple[tuple, ...] = (
    # SmolLM2: the embedded model's family
    ("SmolLM2-135M", "llama", 576, 30, 9, 3, 64, 1536, 49152, True,
     ["HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M"], "apache-2.0", OPEN, {}),
    ("SmolLM2-360M", "llama", 960, 32, 15, 5, 64, 2560, 49152, True,
     ["HuggingFaceTB/SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-360M"], "apache-2.0", OPEN, {}),
    ("SmolLM2-1.7B", "llama", 2048, 24, 32, 32, 64, 8192, 49152, True,
     ["HuggingFaceTB/SmolLM2-1.7B-Instruct", "HuggingFaceTB/SmolLM2-1.7B"], "apache-2.0", OPEN, {}),
    ("SmolLM3-3B", "smollm3", 2048, 36, 16, 4, 128, 11008, 128256, True,
     ["HuggingFaceTB/SmolLM3-3B", "HuggingFaceTB/SmolLM3-3B-Base"], "apache-2.0", OPEN, {}),
    # Qwen2.5: Apache-2.0 except 3B (Qwen research licence) and 72B (Qwen licence); none gated
    ("Qwen2.5-0.5B", "qwen2", 896, 24, 14, 2, 64, 4864, 151936, True,
     ["Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B"], "apache-2.0", OPEN, QWEN2),
    ("Qwen2.5-1.5B", "qwen2", 1536, 28, 12, 2, 128, 8960, 151936, True,
     ["Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-1.5B"], "apache-2.0", OPEN, QWEN2),
    ("Qwen2.5-3B", "qwen2", 2048, 36, 16, 2, 128, 11008, 151936, True,
     ["Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-3B"], "qwen-research", OPEN, QWEN2),
    ("Qwen2.5-7B", "qwen2", 3584, 28, 28, 4, 128, 18944, 152064, False,
     ["Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B"], "apache-2.0", OPEN, QWEN2),
    ("Qwen2.5-14B", "qwen2", 5120, 48, 40, 8, 128, 13824, 152064, False,
     ["Qwen/Qwen2.5-14B-Instruct", "Qwen/Qwen2.5-14B"], "apache-2.0", OPEN, QWEN2),
    ("Qwen2.5-32B", "qwen2", 5120, 64, 40, 8, 128, 27648, 152064, False,
     ["Qwen/Qwen2.5-32B-Instruct", "Qwen/Qwen2.5-32B"], "apache-2.0", OPEN, QWEN2),
    ("Qwen2.5-72B", "qwen2", 8192, 80, 64, 8, 128, 29568, 152064, False,
     ["Qwen/Qwen2.5-72B-Instruct", "Qwen/Qwen2.5-72B"], "qwen", OPEN, QWEN2),
    # Qwen3 (dense): Apache-2.0. "Qwen/Qwen3-8B" is the post-trained (chat, thinking on/off) model.
    ("Qwen3-0.6B", "qwen3", 1024, 28, 16, 8, 128, 3072, 151936, True,
     ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B-Base"], "apache-2.0", OPEN, QWEN3),
    ("Qwen3-1.7B", "qwen3", 2048, 28, 16, 8, 128, 6144, 151936, True,
     ["Qwen/Qwen3-1.7B", "Qwen/Qwen3-1.7B-Base"], "apache-2.0", OPEN, QWEN3),
    ("Qwen3-4B", "qwen3", 2560, 36, 32, 8, 128, 9728, 151936, True,
     ["Qwen/Qwen3-4B", "Qwen/Qwen3-4B-Base"], "apache-2.0", OPEN, QWEN3),
    ("Qwen3-8B", "qwen3", 4096, 36, 32, 8, 128, 12288, 151936, False,
     ["Qwen/Qwen3-8B", "Qwen/Qwen3-8B-Base"], "apache-2.0", OPEN, QWEN3),
    ("Qwen3-14B", "qwen3", 5120, 40, 40, 8, 128, 17408, 151936, False,
     ["Qwen/Qwen3-14B", "Qwen/Qwen3-14B-Base"], "apache-2.0", OPEN, QWEN3),
    ("Qwen3-32B", "qwen3", 5120, 64, 64, 8, 128, 25600, 151936, False,
     ["Qwen/Qwen3-32B"], "apache-2.0", OPEN, QWEN3),
    # Llama 3.x: Meta's community licences, gated
    ("Llama-3.2-1B", "llama", 2048, 16, 32, 8, 64, 8192, 128256, True,
     ["meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-1B"], "llama3.2", GATED, {}),
    ("Llama-3.2-3B", "llama", 3072, 28, 24, 8, 128, 8192, 128256, True,
     ["meta-llama/Llama-3.2-3B-Instruct", "meta-llama/Llama-3.2-3B"], "llama3.2", GATED, {}),
    ("Llama-3.1-8B", "llama", 4096, 32, 32, 8, 128, 14336, 128256, False,
     ["meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B",
      "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B-Instruct"], "llama3.1", GATED, {}),
    ("Llama-3.1-70B", "llama", 8192, 80, 64, 8, 128, 28672, 128256, False,
     ["meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Llama-3.1-70B",
      "meta-llama/Meta-Llama-3.1-70B", "meta-llama/Meta-Llama-3.1-70B-Instruct"], "llama3.1", GATED, {}),
    # Mistral 7B: Apache-2.0 weights, but the Hub repositories ask for contact details first
    ("Mistral-7B-v0.1", "mistral", 4096, 32, 32, 8, 128, 14336, 32000, False,
     ["mistralai/Mistral-7B-Instruct-v0.1", "mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.2"],
     "apache-2.0", GATED, dict(recommendable=False)),
    ("Mistral-7B-v0.3", "mistral", 4096, 32, 32, 8, 128, 14336, 32768, False,
     ["mistralai/Mistral-7B-Instruct-v0.3", "mistralai/Mistral-7B-v0.3", "Mistral-7B"], "apache-2.0", GATED, {}),
    # Gemma 2 and 3: Gemma terms of use, gated
    ("Gemma-2-2B", "gemma2", 2304, 26, 8, 4, 256, 9216, 256000, True,
     ["google/gemma-2-2b-it", "google/gemma-2-2b"], "gemma", GATED, GEMMA2),
    ("Gemma-2-9B", "gemma2", 3584, 42, 16, 8, 256, 14336, 256000, True,
     ["google/gemma-2-9b-it", "google/gemma-2-9b"], "gemma", GATED, GEMMA2),
    ("Gemma-3-1B", "gemma3_text", 1152, 26, 4, 1, 256, 6912, 262144, True,
     ["google/gemma-3-1b-it", "google/gemma-3-1b-pt"], "gemma", GATED, GEMMA3),
    ("Gemma-3-4B", "gemma3_text", 2560, 34, 8, 4, 256, 10240, 262208, True,
     ["google/gemma-3-4b-it", "google/gemma-3-4b-pt"], "gemma", GATED, dict(GEMMA3, vision=SIGLIP_896)),
    ("Gemma-3-12B", "gemma3_text", 3840, 48, 16, 8, 256, 15360, 262208, True,
     ["google/gemma-3-12b-it", "google/gemma-3-12b-pt"], "gemma", GATED, dict(GEMMA3, vision=SIGLIP_896)),
    ("Gemma-3-27B", "gemma3_text", 5376, 62, 32, 16, 128, 21504, 262208, True,
     ["google/gemma-3-27b-it", "google/gemma-3-27b-pt"], "gemma", GATED, dict(GEMMA3, vision=SIGLIP_896)),
    # Phi-3.5-mini: MIT
    ("Phi-3.5-mini", "phi3", 3072, 32, 32, 32, 96, 8192, 32064, False,
     ["microsoft/Phi-3.5-mini-instruct"], "mit", OPEN, PHI3),
    # Reference point for the published "13B QLoRA at batch 4 x 2048" figure; not recommended today.
    ("Llama-2-13B", "llama", 5120, 40, 40, 40, 128, 13824, 32000, False,
     ["meta-llama/Llama-2-13b-chat-hf", "meta-llama/Llama-2-13b-hf"], "llama2", GATED, dict(recommendable=False)),
)
