"""Model architectures: the facts of a config.json that decide memory, and their parameter counts.

The built-in catalog holds the published config.json values of the preset models (no weights, no
download). ``load_architecture`` also reads any local model folder or config.json, so a model outside
the catalog can be planned for too.

Only dense decoder-only transformers of the Llama family are described here (Llama, Mistral, Qwen2/2.5,
Qwen3, Gemma 2 and 3, Phi-3, SmolLM2/3): every layer is attention (q, k, v, o projections, grouped-query
heads) plus a gated MLP (gate, up, down), with RMSNorms. That covers the catalog; anything else (mixture of
experts, GPT-2-style configs) is refused with a message rather than guessed. What changes no shape is not
described: sliding-window layers (Gemma, Mistral), layers without RoPE (SmolLM3), embedding scaling.
Each entry also says where its instruct model downloads from, under which licence, and whether the Hub
gates it (``gated``: log in and accept the licence first).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from .catalog_entries import ENTRIES
from .errors import StudioError


GATED_NOTE = "gated: accept the licence on the Hub first"


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
class VisionEncoder:
    """A SigLIP-style vision encoder that a multimodal checkpoint carries beside its decoder (Gemma 3 4B+).

    It is loaded with the model and stays frozen; text fine-tuning never runs it. Its parameters are
    counted apart from the decoder's (``Architecture.vision_params``) and the estimator adds its weights."""

    hidden: int
    intermediate: int
    layers: int
    image: int  # pixels per side
    patch: int

    def params(self, text_hidden: int) -> int:
        v, inter = self.hidden, self.intermediate
        layer = 4 * (v * v + v) + (v * inter + inter) + (inter * v + v) + 2 * 2 * v  # q k v out, fc1 fc2, 2 LayerNorms
        embeddings = 3 * self.patch * self.patch * v + v + (self.image // self.patch) ** 2 * v  # patch conv + positions
        projector = v * text_hidden + v  # Gemma 3's mm_input_projection and its soft-embedding norm
        return self.layers * layer + embeddings + 2 * v + projector  # + the post LayerNorm


@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder-only transformer, as its config.json states it."""

    name: str
    model_type: str  # config.json "model_type": llama, mistral, qwen2, qwen3, gemma2, gemma3_text, smollm3, phi3
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool = False  # Qwen2/2.5: biases on q, k, v
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k
    norms_per_layer: int = 2  # Gemma 2 and 3: 4 (pre/post attention, pre/post feed-forward)
    fused_qkv: bool = False  # Phi-3: one qkv_proj
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj
    final_logit_softcap: bool = False  # Gemma-2: tanh soft-capping of the logits
    hub_ids: tuple[str, ...] = ()  # the instruct (chat) model first
    source: str = "catalog"  # "catalog" or the path of the config.json it came from
    recommendable: bool = True  # False for entries kept only as reference points (older models)
    licence: str = ""  # the Hub repository's licence tag; "" when not known (a local folder)
    gated: bool = False  # the Hub asks you to accept the licence (or share contact details) before downloading
    vision: VisionEncoder | None = None  # a vision encoder the checkpoint carries (not part of the counts)

    @property
    def instruct_id(self) -> str | None:
        """The Hub id of the instruct (chat) model: what a recommendation downloads."""
        return self.hub_ids[0] if self.hub_ids else None

    @property
    def vision_params(self) -> int:
        return self.vision.params(self.hidden_size) if self.vision else 0

    @property
    def access(self) -> str:
        """How the files are obtained, for a person: the licence, and whether the Hub gates them."""
        licence = self.licence or "licence unknown"
        return f"{licence}; {GATED_NOTE}" if self.gated else f"{licence}, open download"

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
        if self.model_type == "gemma3_text":
            cfg.update(query_pre_attn_scalar=self.head_dim, sliding_window=1024)
        if self.qkv_bias and self.model_type != "qwen2":
            cfg["attention_bias"] = True
        return cfg


def _arch(name, model_type, h, L, heads, kv, head_dim, inter, vocab, tied, hub_ids, licence, gated, extra) -> Architecture:
    extra = dict(extra)
    if "vision" in extra:
        extra["vision"] = VisionEncoder(**extra["vision"])
    return Architecture(
        name=name, model_type=model_type, hidden_size=h, num_layers=L, num_heads=heads, num_kv_heads=kv,
        head_dim=head_dim, intermediate_size=inter, vocab_size=vocab, tied_embeddings=tied,
        hub_ids=tuple(hub_ids), licence=licence, gated=gated, **extra,
    )


# The published config.json values, licences and Hub ids: see catalog_entries.py for the table and its sources.
CATALOG: tuple[Architecture, ...] = tuple(_arch(*row) for row in ENTRIES)


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
    vision = _gemma3_vision(cfg)
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    model_type = str(cfg.get("model_type", "")).lower()
    if model_type in ("gemma3", "gemma3_text"):
        cfg = {**_transformers_defaults("gemma3_text"), **cfg}  # Gemma 3's Hub configs leave most shapes to them
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
    tied_default = model_type in ("gemma", "gemma2", "gemma3", "gemma3_text", "smollm3")  # transformers' defaults
    tied = cfg.get("tie_word_embeddings", tied_default)
    is_gemma2 = model_type == "gemma2"
    is_gemma3 = model_type in ("gemma3", "gemma3_text")
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
        qk_norm=model_type == "qwen3" or is_gemma3,
        norms_per_layer=4 if (is_gemma2 or is_gemma3) else 2,
        fused_qkv=model_type == "phi3",
        fused_gate_up=model_type == "phi3",
        final_logit_softcap=bool(cfg.get("final_logit_softcapping")) if is_gemma2 else False,
        vision=vision,
        source=str(path),
    )


def _transformers_defaults(model_type: str) -> dict:
    """transformers' defaults for a model type's config ({} without transformers)."""
    try:
        from transformers import AutoConfig
    except ImportError:
        return {}
    return {k: v for k, v in AutoConfig.for_model(model_type).to_dict().items() if v is not None}


def _gemma3_vision(cfg: dict) -> VisionEncoder | None:
    """The vision encoder of a Gemma 3 multimodal config.json (vision_config), with SigLIP's defaults."""
    vc = cfg.get("vision_config")
    if str(cfg.get("model_type", "")).lower() != "gemma3" or not isinstance(vc, dict):
        return None
    vc = {**_transformers_defaults("siglip_vision_model"), **vc}
    try:
        return VisionEncoder(hidden=int(vc["hidden_size"]), intermediate=int(vc["intermediate_size"]),
                             layers=int(vc["num_hidden_layers"]), image=int(vc["image_size"]),
                             patch=int(vc["patch_size"]))
    except (KeyError, TypeError, ValueError):
        return None


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
