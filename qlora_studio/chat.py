"""The result: merge a run's adapter into its base, load base or fine-tuned model, generate.

Merging goes into a 16-bit copy of the base (never into the 4-bit weights, which would bake the
quantization error in) and is saved as safetensors + tokenizer in ``<run>/merged``, built in a
temporary folder and renamed so an interrupted merge leaves nothing half-written. Later chats reuse it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from .compat import import_training_stack
from .errors import StudioError
from .runs import RunFolder, resolve_run


class ChatError(StudioError):
    pass


def _device_and_dtype():
    """Where chat and evaluation run, and in which dtype (`plan.precision_for`, for inference)."""
    from .plan import Machine, precision_for, torch_dtype

    machine = Machine.detect()
    return machine.device, torch_dtype(precision_for(machine.device, machine.compute_capability, training=False,
                                                     cpu_bf16=machine.cpu_bf16))


def _base_path(run: RunFolder) -> Path:
    cfg = run.config()
    path = (run.plan().get("model") or {}).get("path") or cfg.get("model_path")  # model_path: older runs
    if path and Path(path).is_dir():
        return Path(path)
    from .models import resolve_model

    return resolve_model(cfg.get("model")).path


def system_prompt(run: RunFolder) -> str:
    """The system message the run was trained with (the first one in its data), or "" (the Chat tab's
    default and the exported Modelfile's SYSTEM)."""
    from .data import NO_SYSTEM, load_examples

    try:
        cfg = run.config()
    except Exception:  # a damaged config.json: no system prompt to offer
        return ""
    if isinstance(cfg.get("system_prompt"), str):  # set in the run's settings
        return "" if cfg["system_prompt"].strip().lower() == NO_SYSTEM else cfg["system_prompt"]
    try:
        examples, _ = load_examples(cfg.get("data") or "")
    except Exception:  # the data file gone or unreadable: no system prompt to offer
        return ""
    for ex in examples[:50]:
        for m in ex.messages or []:
            if m["role"] == "system":
                return m["content"]
    return ""


def system_messages(run: RunFolder, text: str) -> list[dict]:
    """The system message to chat with: ``text`` when given; an empty one when the run was trained with
    ``system_prompt: none`` (so the template's default stays out, as in training); else none."""
    from .data import NO_SYSTEM

    if text.strip():
        return [{"role": "system", "content": text.strip()}]
    try:
        configured = run.config().get("system_prompt")
    except Exception:  # a damaged config.json: as if not set
        configured = None
    if isinstance(configured, str) and configured.strip().lower() == NO_SYSTEM:
        return [{"role": "system", "content": ""}]
    return []


def merge_run(run: str | Path | RunFolder, progress: Callable[[float, str], None] | None = None, force: bool = False,
              dtype: str | None = None) -> Path:
    """Merge the run's adapter into the base; returns the merged folder (cached).

    The merge is computed in fp32 and saved in the base's own 16-bit dtype (``dtype`` overrides it,
    e.g. "float32" for a bit-exact copy of base + adapter at twice the size).
    """
    import_training_stack()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = run if isinstance(run, RunFolder) else RunFolder(resolve_run(run))
    progress = progress or (lambda f, m: None)
    done_marker = run.merged / "studio_merged.json"
    if done_marker.is_file() and not force:
        progress(1.0, "already merged")
        return run.merged
    if not (run.adapter / "adapter_config.json").is_file():
        raise ChatError(f"{run.name}: no adapter yet (the run has not finished or was stopped before saving)")
    base_path = _base_path(run)
    cfg = run.config()
    progress(0.1, "loading the base model in 16-bit")
    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32,
                                                trust_remote_code=bool(cfg.get("trust_remote_code")))
    save_dtype = dtype or getattr(base.config, "dtype", None) or torch.bfloat16
    if isinstance(save_dtype, str):
        save_dtype = getattr(torch, save_dtype)
    if save_dtype == torch.float32 and dtype is None:
        save_dtype = torch.bfloat16
    progress(0.5, "applying the adapter")
    model = PeftModel.from_pretrained(base, str(run.adapter))
    merged = model.merge_and_unload()
    merged = merged.to(save_dtype)
    progress(0.8, "saving the merged model")
    tmp = Path(tempfile.mkdtemp(prefix=".merged-", dir=run.path))
    try:
        merged.save_pretrained(tmp)
        from .loading import load_tokenizer

        load_tokenizer(run.adapter if (run.adapter / "tokenizer_config.json").is_file() else base_path).save_pretrained(tmp)
        (tmp / "studio_merged.json").write_text(json.dumps({"base": str(base_path), "dtype": str(save_dtype)}))
        _readable_by_others(tmp)
        if run.merged.exists():
            shutil.rmtree(run.merged)
        tmp.rename(run.merged)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(1.0, "merged")
    return run.merged


def _readable_by_others(folder: Path) -> None:
    """Give a folder made private by `tempfile.mkdtemp` (0700) the modes a plain mkdir/open would
    have had under the user's umask, so that llama.cpp, Ollama or another user can read the model."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [folder, *folder.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def load_chat_model(path: str | Path, adapter: str | Path | None = None):
    """Model and tokenizer for generation, in eval mode; optionally with an unmerged adapter."""
    import_training_stack()
    from transformers import AutoModelForCausalLM

    from .loading import load_tokenizer

    device, dtype = _device_and_dtype()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map={"": 0} if device == "cuda" else None)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    tok = load_tokenizer(path)
    return model, tok


def load_run_model(run: str | Path, base: bool = False, progress=None):
    """The fine-tuned (merged) model of a run, or with ``base=True`` the model it started from."""
    folder = RunFolder(resolve_run(run))
    if base:
        return load_chat_model(_base_path(folder))
    return load_chat_model(merge_run(folder, progress))


def _prompt_ids(tok, messages: list[dict]):
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def _gen_kwargs(tok, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    kw = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    if temperature and temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def stream_reply(model, tok, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 0.9) -> Iterator[str]:
    """Yield the reply's text as it grows (the chat template applied)."""
    import torch
    from transformers import TextIteratorStreamer

    inputs = _prompt_ids(tok, messages).to(model.device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=300)
    kwargs = dict(**inputs, streamer=streamer, **_gen_kwargs(tok, max_new_tokens, temperature, top_p))
    errors = []

    def target():
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except Exception as e:  # surfaced to the caller below
            errors.append(e)
            streamer.end()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    t.join()
    if errors:
        raise ChatError(f"generation failed: {errors[0]}")


def reply(model, tok, messages: list[dict], **kw) -> str:
    text = ""
    for text in stream_reply(model, tok, messages, **kw):
        pass
    return text


def generate_batch(model, tok, conversations: list[list[dict]], max_new_tokens: int = 96, batch_size: int = 16,
                   progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Greedy replies to many prompts at once (left-padded batches), for evaluation. ``progress(done, total)``
    is called after each batch. The key-value cache is used even when the model's config turns it off
    for training."""
    import torch

    old_side = tok.padding_side
    tok.padding_side = "left"
    out = []
    try:
        for i in range(0, len(conversations), batch_size):
            texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations[i:i + batch_size]]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                gen = model.generate(**enc, **_gen_kwargs(tok, max_new_tokens, 0.0, 1.0), use_cache=True)
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            if progress is not None:
                progress(len(out), len(conversations))
    finally:
        tok.padding_side = old_side
    return out
