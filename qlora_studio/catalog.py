"""Model architectures: the facts of a config.json that decide memory, and their parameter counts.

The built-in catalog holds the published config.json values of the preset models (no weights, no
download). ``load_architecture`` also reads any local model folder or config.json, so a model outside
the catalog can be planned for too.

Only dense decoder-only transformers of the Llama family are described here (Llama, Mistral, Qwen2/2.5,
Qwen3, Gemma-2, Phi-3, SmolLM2): every layer is attention (q, k, v, o projections, grouped-query heads)
plus a gated MLP (gate, up, down), with RMSNorms. That covers the catalog; anything else (mixture of
experts, GPT-2-style configs) is refused with a message rather than guessed.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import StudioError


class ArchitectureError(StudioError, ValueError):
    """A model name or config.json that cannot be turned into an :class:`Architecture`."""


@dataclass(frozen=True)
class LinearShape:
    """One linear projection inside a decoder layer (it appears once per layer)."""

    name: str  # module name as PEFT sees it: "q_proj", "gate_up_proj", ...
    in_features: int
    out_features: int
    group: str  # "attention" or "mlp"
    bias: bool = False

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts per kind of module, for the whole model."""

    embeddings: int
    attention: int  # q, k, v, o weights (all layers)
    attention_biases: int  # q/k/v biases (Qwen2)
    mlp: int  # gate, up, down weights (all layers)
    norms: int  # every RMSNorm weight, q_norm/k_norm included, final norm included
    lm_head: int  # 0 when tied to the embeddings

    @property
    def total(self) -> int:
        return self.embeddings + self.attention + self.attention_biases + self.mlp + self.norms + self.lm_head

    @property
    def quantizable(self) -> int:
        """Weights of the linear layers inside the decoder blocks: what bitsandbytes turns into 4-bit."""
        return self.attention + self.mlp

    @property
    def unquantized(self) -> int:
        """Embeddings, lm_head, norms and biases: they stay in 16-bit under 4-bit loading."""
        return self.total - self.quantizable


@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder-only transformer, as its config.json states it."""

    name: str
    model_type: str  # config.json "model_type": llama, mistral, qwen2, qwen3, gemma2, phi3
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool = False  # Qwen2/2.5: biases on q, k, v
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
    norms_per_layer: int = 2  # Gemma-2: 4 (pre/post attention, pre/post feed-forward)
    fused_qkv: bool = False  # Phi-3: one qkv_proj
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj
    final_logit_softcap: bool = False  # Gemma-2: tanh soft-capping of the logits
    hub_ids: tuple[str, ...] = ()
    source: str = "catalog"  # "catalog" or the path of the config.json it came from
    recommendable: bool = True  # False for entries kept only as reference points (older models)

    # ---- derived shapes
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_layers(self) -> list[LinearShape]:
        """The linear projections of one decoder layer, named as in the transformers implementation."""
        h, q, kv, inter = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        if self.fused_qkv:
            attn = [LinearShape("qkv_proj", h, q + 2 * kv, "attention", self.qkv_bias)]
        else:
            attn = [
                LinearShape("q_proj", h, q, "attention", self.qkv_bias),
                LinearShape("k_proj", h, kv, "attention", self.qkv_bias),
                LinearShape("v_proj", h, kv, "attention", self.qkv_bias),
            ]
        attn.append(LinearShape("o_proj", q, h, "attention"))
        if self.fused_gate_up:
            mlp = [LinearShape("gate_up_proj", h, 2 * inter, "mlp")]
        else:
            mlp = [LinearShape("gate_proj", h, inter, "mlp"), LinearShape("up_proj", h, inter, "mlp")]
        mlp.append(LinearShape("down_proj", inter, h, "mlp"))
        return attn + mlp

    def param_counts(self) -> ParamCounts:
        layers = self.linear_layers()
        L = self.num_layers
        attention = L * sum(m.weight_params for m in layers if m.group == "attention")
        mlp = L * sum(m.weight_params for m in layers if m.group == "mlp")
        biases = L * sum(m.out_features for m in layers if m.bias)
        norms_per_layer = self.norms_per_layer * self.hidden_size
        if self.qk_norm:
            norms_per_layer += 2 * self.head_dim  # q_norm and k_norm weights are per head_dim, shared by heads
        embeddings = self.vocab_size * self.hidden_size
        return ParamCounts(
            embeddings=embeddings,
            attention=attention,
            attention_biases=biases,
            mlp=mlp,
            norms=L * norms_per_layer + self.hidden_size,  # + the final norm
            lm_head=0 if self.tied_embeddings else embeddings,
        )

    @property
    def total_params(self) -> int:
        return self.param_counts().total

    def to_config_dict(self) -> dict:
        """A config.json dict with these shapes (for building a random-weight model of this architecture)."""
        cfg = dict(
            model_type=self.model_type, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            intermediate_size=self.intermediate_size, vocab_size=self.vocab_size,
            tie_word_embeddings=self.tied_embeddings, pad_token_id=0,
        )
        if self.model_type == "gemma2":
            cfg.update(final_logit_softcapping=30.0 if self.final_logit_softcap else None,
                       attn_logit_softcapping=50.0, sliding_window=4096, query_pre_attn_scalar=self.head_dim)
        if self.qkv_bias and self.model_type != "qwen2":
            cfg["attention_bias"] = True
        return cfg


def _arch(name, model_type, h, L, heads, kv, head_dim, inter, vocab, tied, hub_ids=(), **extra) -> Architecture:
    return Architecture(
        name=name, model_type=model_type, hidden_size=h, num_layers=L, num_heads=heads, num_kv_heads=kv,
        head_dim=head_dim, intermediate_size=inter, vocab_size=vocab, tied_embeddings=tied,
        hub_ids=tuple(hub_ids), **extra,
    )


_QWEN2 = dict(qkv_bias=True)
_QWEN3 = dict(qk_norm=True)
_GEMMA2 = dict(norms_per_layer=4, final_logit_softcap=True)
_PHI3 = dict(fused_qkv=True, fused_gate_up=True)

# Published config.json values (hidden, layers, heads, kv heads, head_dim, intermediate, vocab, tied).
CATALOG: tuple[Architecture, ...] = (
    _arch("SmolLM2-135M", "llama", 576, 30, 9, 3, 64, 1536, 49152, True,
          ["HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct"]),
    _arch("SmolLM2-360M", "llama", 960, 32, 15, 5, 64, 2560, 49152, True,
          ["HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M-Instruct"]),
    _arch("SmolLM2-1.7B", "llama", 2048, 24, 32, 32, 64, 8192, 49152, True,
          ["HuggingFaceTB/SmolLM2-1.7B", "HuggingFaceTB/SmolLM2-1.7B-Instruct"]),
    _arch("Qwen2.5-0.5B", "qwen2", 896, 24, 14, 2, 64, 4864, 151936, True,
          ["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct"], **_QWEN2),
    _arch("Qwen2.5-1.5B", "qwen2", 1536, 28, 12, 2, 128, 8960, 151936, True,
          ["Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct"], **_QWEN2),
    _arch("Qwen2.5-3B", "qwen2", 2048, 36, 16, 2, 128, 11008, 151936, True,
          ["Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-3B-Instruct"], **_QWEN2),
    _arch("Qwen2.5-7B", "qwen2", 3584, 28, 28, 4, 128, 18944, 152064, False,
          ["Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"], **_QWEN2),
    _arch("Qwen2.5-14B", "qwen2", 5120, 48, 40, 8, 128, 13824, 152064, False,
          ["Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-14B-Instruct"], **_QWEN2),
    _arch("Qwen2.5-32B", "qwen2", 5120, 64, 40, 8, 128, 27648, 152064, False,
          ["Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-32B-Instruct"], **_QWEN2),
    _arch("Qwen2.5-72B", "qwen2", 8192, 80, 64, 8, 128, 29568, 152064, False,
          ["Qwen/Qwen2.5-72B", "Qwen/Qwen2.5-72B-Instruct"], **_QWEN2),
    _arch("Qwen3-0.6B", "qwen3", 1024, 28, 16, 8, 128, 3072, 151936, True,
          ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B-Base"], **_QWEN3),
    _arch("Qwen3-1.7B", "qwen3", 2048, 28, 16, 8, 128, 6144, 151936, True,
          ["Qwen/Qwen3-1.7B", "Qwen/Qwen3-1.7B-Base"], **_QWEN3),
    _arch("Qwen3-4B", "qwen3", 2560, 36, 32, 8, 128, 9728, 151936, True,
          ["Qwen/Qwen3-4B", "Qwen/Qwen3-4B-Base"], **_QWEN3),
    _arch("Qwen3-8B", "qwen3", 4096, 36, 32, 8, 128, 12288, 151936, False,
          ["Qwen/Qwen3-8B", "Qwen/Qwen3-8B-Base"], **_QWEN3),
    _arch("Qwen3-14B", "qwen3", 5120, 40, 40, 8, 128, 17408, 151936, False,
          ["Qwen/Qwen3-14B", "Qwen/Qwen3-14B-Base"], **_QWEN3),
    _arch("Qwen3-32B", "qwen3", 5120, 64, 64, 8, 128, 25600, 151936, False,
          ["Qwen/Qwen3-32B"], **_QWEN3),
    _arch("Llama-3.2-1B", "llama", 2048, 16, 32, 8, 64, 8192, 128256, True,
          ["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"]),
    _arch("Llama-3.2-3B", "llama", 3072, 28, 24, 8, 128, 8192, 128256, True,
          ["meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct"]),
    _arch("Llama-3.1-8B", "llama", 4096, 32, 32, 8, 128, 14336, 128256, False,
          ["meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct",
           "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B-Instruct"]),
    _arch("Llama-3.1-70B", "llama", 8192, 80, 64, 8, 128, 28672, 128256, False,
          ["meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct",
           "meta-llama/Meta-Llama-3.1-70B", "meta-llama/Meta-Llama-3.1-70B-Instruct"]),
    _arch("Mistral-7B-v0.1", "mistral", 4096, 32, 32, 8, 128, 14336, 32000, False,
          ["mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1",
           "mistralai/Mistral-7B-Instruct-v0.2"], recommendable=False),
    _arch("Mistral-7B-v0.3", "mistral", 4096, 32, 32, 8, 128, 14336, 32768, False,
          ["mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3", "Mistral-7B"]),
    _arch("Gemma-2-2B", "gemma2", 2304, 26, 8, 4, 256, 9216, 256000, True,
          ["google/gemma-2-2b", "google/gemma-2-2b-it"], **_GEMMA2),
    _arch("Gemma-2-9B", "gemma2", 3584, 42, 16, 8, 256, 14336, 256000, True,
          ["google/gemma-2-9b", "google/gemma-2-9b-it"], **_GEMMA2),
    _arch("Phi-3.5-mini", "phi3", 3072, 32, 32, 32, 96, 8192, 32064, False,
          ["microsoft/Phi-3.5-mini-instruct"], **_PHI3),
    # Reference point for the published "13B QLoRA at batch 4 x 2048" figure; not recommended today.
    _arch("Llama-2-13B", "llama", 5120, 40, 40, 40, 128, 13824, 32000, False,
          ["meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-chat-hf"], recommendable=False),
)


def catalog_names() -> list[str]:
    return [a.name for a in CATALOG]


# ------------------------------------------------------------------ name lookup

_SUFFIXES = ("-instruct", "-chat", "-base", "-hf", "-it")


def _normalize(name: str) -> str:
    """'Qwen/Qwen2.5-7B-Instruct' -> 'qwen2.5-7b'; 'meta-llama/Meta-Llama-3.1-8B' -> 'llama-3.1-8b'."""
    s = name.strip().lower().replace("_", "-").replace(" ", "-")
    s = s.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:  # anywhere: "mistral-7b-instruct-v0.3" -> "mistral-7b-v0.3"
        s = s.replace(suffix + "-", "-")
        if s.endswith(suffix):
            s = s[: -len(suffix)]
    if s.startswith("meta-llama-"):
        s = s[len("meta-"):]
    return s


def _catalog_index() -> dict[str, Architecture]:
    index: dict[str, Architecture] = {}
    for arch in CATALOG:
        for key in (arch.name, *arch.hub_ids):
            index.setdefault(_normalize(key), arch)
        for key in (arch.name, *arch.hub_ids):
            index[key.lower()] = arch  # exact spellings win over normalized collisions
    return index


def find_in_catalog(name: str) -> Architecture | None:
    """The catalog entry for a catalog name or a Hub-style id, or None."""
    index = _catalog_index()
    return index.get(name.strip().lower()) or index.get(_normalize(name))


def close_catalog_names(name: str, n: int = 5) -> list[str]:
    by_norm = {_normalize(a.name): a.name for a in CATALOG}
    matches = difflib.get_close_matches(_normalize(name), list(by_norm), n=n, cutoff=0.5)
    return [by_norm[m] for m in matches]


# ------------------------------------------------------------------ config.json

def _required_int(cfg: dict, key: str, path: Path) -> int:
    if key not in cfg or cfg[key] is None:
        model_type = cfg.get("model_type", "?")
        raise ArchitectureError(
            f"{path}: field '{key}' is missing (model_type '{model_type}'); "
            "the estimator needs a Llama-style decoder config (hidden_size, num_hidden_layers, "
            "num_attention_heads, intermediate_size, vocab_size)"
        )
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ArchitectureError(f"{path}: field '{key}' must be a positive integer, got {value!r}")
    return value


def architecture_from_config(cfg: dict, path: Path | str = "config.json", name: str | None = None) -> Architecture:
    """Build an :class:`Architecture` from the dict of a config.json. Errors name the file and the field."""
    path = Path(path)
    if not isinstance(cfg, dict):
        raise ArchitectureError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    model_type = str(cfg.get("model_type", "")).lower()
    if cfg.get("num_local_experts") or cfg.get("num_experts"):
        raise ArchitectureError(f"{path}: field 'num_local_experts'/'num_experts': mixture-of-experts models are not supported")
    h = _required_int(cfg, "hidden_size", path)
    L = _required_int(cfg, "num_hidden_layers", path)
    heads = _required_int(cfg, "num_attention_heads", path)
    kv = cfg.get("num_key_value_heads") or heads
    if not isinstance(kv, int) or kv <= 0 or heads % kv:
        raise ArchitectureError(f"{path}: field 'num_key_value_heads' must divide num_attention_heads ({heads}), got {kv!r}")
    head_dim = cfg.get("head_dim") or h // heads
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ArchitectureError(f"{path}: field 'head_dim' must be a positive integer, got {head_dim!r}")
    inter = _required_int(cfg, "intermediate_size", path)
    vocab = _required_int(cfg, "vocab_size", path)
    tied_default = model_type in ("gemma", "gemma2")  # transformers' per-model defaults
    tied = cfg.get("tie_word_embeddings", tied_default)
    is_gemma2 = model_type == "gemma2"
    return Architecture(
        name=name or cfg.get("_name_or_path") or path.parent.name or "model",
        model_type=model_type or "llama",
        hidden_size=h,
        num_layers=L,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        tied_embeddings=bool(tied),
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
        norms_per_layer=4 if is_gemma2 else 2,
        fused_qkv=model_type == "phi3",
        fused_gate_up=model_type == "phi3",
        final_logit_softcap=bool(cfg.get("final_logit_softcapping")) if is_gemma2 else False,
        source=str(path),
    )


def _read_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ArchitectureError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ArchitectureError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e


def load_architecture(model: str | Path) -> Architecture:
    """An :class:`Architecture` from a catalog name, a Hub-style id in the catalog, a model folder or a config.json.

    Nothing is downloaded: a Hub id that is not in the catalog is refused with the closest catalog names.
    """
    text = str(model).strip()
    path = Path(text).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ArchitectureError(f"{path}: no config.json in this folder")
        return architecture_from_config(_read_config(config), config, name=path.name)
    if path.is_file():
        return architecture_from_config(_read_config(path), path, name=path.parent.name or path.stem)
    found = find_in_catalog(text)
    if found is not None:
        return found
    if text.endswith(".json") or text.startswith((".", "/", "~")) or "\\" in text:
        raise ArchitectureError(f"{text}: no such file or folder")
    close = close_catalog_names(text)
    hint = f" Closest catalog names: {', '.join(close)}." if close else ""
    raise ArchitectureError(
        f"unknown model {text!r}: not a catalog name, a Hub id in the catalog, a model folder or a config.json.{hint}"
        f" The catalog: {', '.join(catalog_names())}."
    )
