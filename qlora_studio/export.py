"""Take the model home: a finished run exported as files that work outside the studio, checked.

`export_run(run, fmt, quant, output)` is the one entry point (the command line's ``export`` verb and the
app's Export section call it). Formats (`FORMATS`):

- ``ollama`` (the default): a GGUF, a Modelfile (`chat_formats.modelfile`: explicit TEMPLATE, every stop
  token, the run's system prompt) and the model card;
- ``gguf``: the GGUF and the model card (llama.cpp, LM Studio);
- ``merged``: the adapter merged into the 16-bit base (`chat.merge_run`: safetensors, tokenizer, the base's
  generation config), for transformers and for further conversion;
- ``adapter``: the PEFT adapter folder as it is, and a LoRA GGUF (llama.cpp's ``convert_lora_to_gguf.py``)
  where llama.cpp can apply the adapter as trained.

GGUF files come from llama.cpp's own converter (`llamacpp`), in f16, bf16 or q8_0 with no compiled code;
q4_k_m needs llama.cpp's quantizer (llama-cpp-python). Free disk space is checked first; the folder is
built next to its final place and renamed into it, so an interrupted export leaves nothing half-written.
Every export ends with `verify` (``verify.json``); one that fails keeps its files and says what differs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .diskspace import folder_bytes, free_bytes
from .datafile import file_sha256
from .errors import StudioError
from .runs import RunFolder, resolve_run

FORMATS = ("ollama", "gguf", "merged", "adapter")
QUANTS = ("q8_0", "f16", "bf16", "q4_k_m")
DEFAULT_FORMAT, DEFAULT_QUANT = "ollama", "q8_0"
LORA_QUANTS = ("q8_0", "f16", "bf16")  # what convert_lora_to_gguf.py writes
BYTES_PER_PARAM = {"f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "q4_k_m": 0.6}
N_PROMPTS = 3
MARGIN_BYTES = 64 * 2**20

Progress = Callable[[float, str], None]


class ExportError(StudioError):
    """An export cannot be made as asked; the message says why and what to do."""


@dataclass
class ExportResult:
    folder: Path
    files: list[str]
    verified: dict
    warnings: list[str] = field(default_factory=list)
    ollama_create: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.verified.get("ok"))

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "files": self.files, "verified": self.verified, "warnings": self.warnings,
                "ollama_create": self.ollama_create, "seconds": round(self.seconds, 1)}


def check_request(fmt: str, quant: str) -> None:
    """Refuse a format or quant the export does not make, before any work."""
    from . import llamacpp

    if fmt not in FORMATS:
        raise ExportError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}", field="format")
    if quant not in QUANTS:
        raise ExportError(f"--quant: {quant!r} is not one of {', '.join(QUANTS)}", field="quant")
    if fmt == "adapter" and quant not in LORA_QUANTS:
        raise ExportError(f"--quant: a LoRA GGUF is written as {', '.join(LORA_QUANTS)}, not {quant}", field="quant")
    if quant == "q4_k_m" and fmt in ("gguf", "ollama") and not llamacpp.runtime_available():
        raise ExportError(
            "--quant q4_k_m needs llama.cpp's quantizer, which is compiled code, and it is not installed",
            field="quant", hint=f"install it with pip install 'qlora-studio[llama_cpp]' (builds llama-cpp-python "
                                f"{llamacpp.LLAMA_CPP_PYTHON_VERSION}: several minutes), or export f16 and let Ollama "
                                "quantize: ollama create NAME --quantize q4_K_M -f <folder>/Modelfile")


def adapter_gguf_problem(adapter_config: dict) -> str | None:
    """Why llama.cpp could not apply this adapter as trained (None: it can)."""
    if adapter_config.get("use_dora"):
        return "it is a DoRA adapter (use_dora), whose magnitude vectors llama.cpp's LoRA does not apply"
    if adapter_config.get("use_rslora"):
        return "it uses rsLoRA scaling (alpha / sqrt(rank)); llama.cpp scales a LoRA by alpha / rank"
    if adapter_config.get("modules_to_save"):
        return (f"it trains whole modules ({', '.join(adapter_config['modules_to_save'])}: embeddings or the output "
                "head), which a llama.cpp LoRA cannot carry")
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        return "it has per-layer ranks or alphas (rank_pattern / alpha_pattern); a LoRA GGUF has one alpha"
    if adapter_config.get("lora_bias"):
        return "it trains LoRA biases (lora_bias), which llama.cpp's LoRA does not apply"
    return None


def ollama_name(run_name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", run_name.lower()).strip("-._") or "fine-tuned"


def default_folder(run: RunFolder, fmt: str, quant: str) -> Path:
    return run.path / "exports" / (fmt if fmt == "merged" else f"{fmt}-{quant}")


def _param_count(run: RunFolder) -> int:
    doc = run.plan()
    return int((doc.get("model") or {}).get("total_params") or (doc.get("plan") or {}).get("model_params") or 0)


def export_bytes(run: RunFolder, fmt: str, quant: str) -> dict:
    """What an export writes, by part (bytes): the merge (unless done), the export's own files, and a 16-bit
    GGUF kept while q4_k_m is made from it."""
    params = _param_count(run)
    merged_done = (run.merged / "studio_merged.json").is_file()
    merged = folder_bytes(run.merged) if merged_done else params * 2
    parts = {}
    if fmt != "adapter" and not merged_done:
        parts["merged model"] = merged
    if fmt == "merged":
        parts["export copy"] = merged
    elif fmt == "adapter":
        parts["adapter and LoRA GGUF"] = 3 * folder_bytes(run.adapter)
    else:
        parts["GGUF"] = int(params * BYTES_PER_PARAM[quant])
        if quant == "q4_k_m":
            parts["f16 GGUF (while quantizing)"] = params * 2
    return parts


def check_disk(run: RunFolder, fmt: str, quant: str, dest: Path) -> None:
    parts = export_bytes(run, fmt, quant)
    need, free = sum(parts.values()) + MARGIN_BYTES, free_bytes(dest)
    if free < need:
        from .diskspace import DiskFull

        detail = ", ".join(f"{k} {v / 2**20:,.0f} MB" for k, v in parts.items())
        raise DiskFull(f"disk full: this export needs about {need / 2**20:,.0f} MB free in {dest.parent} ({detail}); "
                       f"{free / 2**20:,.0f} MB is free",
                       hint="free some space (old runs, old exports) or export elsewhere with --output DIR")


def run_prompts(run: RunFolder, n: int = N_PROMPTS) -> tuple[list[list[dict]], str]:
    """Conversations to verify with, from the run's own data (its held-out file if it has one): the last
    ``n`` examples, each up to its final assistant reply (a text example: its first 200 characters as a user
    turn); the probe conversation when none can be read."""
    from .chat_formats import PROBE
    from .data import load_examples

    cfg = run.config()
    for key in ("test_data", "data"):
        if not cfg.get(key):
            continue
        try:
            examples, _ = load_examples(cfg[key])
        except Exception:  # a data file gone or unreadable: try the next one
            continue
        convs = []
        for ex in examples[::-1]:
            msgs = ex.messages or [{"role": "user", "content": (ex.text or "")[:200]}]
            while msgs and msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            if msgs and msgs[-1]["role"] == "user":
                convs.append(msgs)
            if len(convs) == n:
                return convs[::-1], f"the last {n} examples of {Path(cfg[key]).name}"
        if convs:
            return convs[::-1], f"{len(convs)} examples of {Path(cfg[key]).name}"
    return [PROBE], "a probe conversation (the run's data could not be read)"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)



def _refuse_quantized(folder: Path, what: str) -> None:
    config = json.loads((Path(folder) / "config.json").read_text())
    if "quantization_config" in config:
        raise ExportError(f"{folder / 'config.json'}: quantization_config: the {what} is quantized "
                          f"({config['quantization_config'].get('quant_method', '?')}); an export is made from 16-bit "
                          "weights only", field="quantization_config",
                          hint="train from a 16-bit model (QLoRA quantizes it while training)")


def export_run(run: str | Path | RunFolder, fmt: str = DEFAULT_FORMAT, quant: str = DEFAULT_QUANT,
               output: str | Path | None = None, progress: Progress | None = None) -> ExportResult:
    """Export a finished run (see the module's docstring); the folder, its files and the verification."""
    from . import llamacpp
    from .chat import _base_path, _readable_by_others, merge_run
    from .compat import import_training_stack
    from .modelcard import model_card, write_card
    from .ownership import describe, run_owner

    t0 = time.monotonic()
    progress = progress or (lambda f, m: None)
    check_request(fmt, quant)
    run = run if isinstance(run, RunFolder) else RunFolder(resolve_run(run))
    owner = run_owner(run.path)
    if owner is not None:
        raise ExportError(f"{run.name} is training ({describe(owner)}); export it once it has finished")
    if not (run.adapter / "adapter_config.json").is_file():
        raise ExportError(f"{run.name}: no adapter yet (the run has not finished, or was stopped before saving one)",
                          hint="export a completed (or stopped) run")
    dest = Path(output).expanduser().resolve() if output else default_folder(run, fmt, quant)
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / "verify.json").is_file())):
        raise ExportError(f"--output: {dest} exists and is not an export folder; an export replaces its folder "
                          "whole", field="output", hint="name a new or empty folder (or an earlier export's)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    base = _base_path(run)
    _refuse_quantized(base, "base model")
    check_disk(run, fmt, quant, dest)
    import_training_stack()
    warnings: list[str] = []
    tools = llamacpp.ensure_tools(lambda f, m: progress(0.1 * f, m)) if fmt != "merged" else None
    merged = None
    if fmt != "adapter":
        merged = merge_run(run, progress=lambda f, m: progress(0.1 + 0.2 * f, f"merging: {m}"))
        _refuse_quantized(merged, "merged model")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    log: list[str] = []
    create = None
    try:
        conversations, prompts_from = run_prompts(run)
        step = lambda a, b: (lambda f, m: progress(a + (b - a) * f, m))  # noqa: E731
        if fmt == "merged":
            _export_merged(tmp, merged, base)
            from .verify import verify_merged

            verified = verify_merged(tmp, base, run.adapter, merged, conversations, step(0.35, 0.95))
        elif fmt == "adapter":
            verified = _export_adapter(tmp, run, base, quant, tools, log, warnings, step(0.1, 0.95))
        else:
            verified, create = _export_gguf(tmp, dest, run, merged, fmt, quant, tools, conversations, log, warnings,
                                            step(0.3, 0.95))
        verified.update(format=fmt, quant=None if fmt == "merged" else quant, prompts_from=prompts_from,
                        run=run.name, llama_cpp_python=llamacpp.LLAMA_CPP_PYTHON_VERSION if tools else None)
        if log:
            (tmp / "export.log").write_text("\n".join(log) + "\n", encoding="utf-8")
        progress(0.97, "writing the model card")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()) + ["README.md", "verify.json"]
        seconds = time.monotonic() - t0
        write_card(tmp, model_card(run, fmt, quant, files, verified, ollama_name(run.name), seconds))
        (tmp / "verify.json").write_text(json.dumps(verified, indent=2, default=str) + "\n", encoding="utf-8")
        _readable_by_others(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(1.0, "exported" + ("" if verified.get("ok") else " (verification FAILED: see verify.json)"))
    return ExportResult(dest, sorted(files), verified, warnings, create, time.monotonic() - t0)


def _export_merged(tmp: Path, merged: Path, base: Path) -> None:
    for p in merged.iterdir():
        if p.is_file() and p.name != "studio_merged.json":
            _link_or_copy(p, tmp / p.name)
    if (base / "generation_config.json").is_file():  # the base's own, as it was published
        (tmp / "generation_config.json").unlink(missing_ok=True)
        shutil.copy2(base / "generation_config.json", tmp / "generation_config.json")


def _gguf_metadata(run: RunFolder, tmp: Path) -> Path:
    from .modelcard import base_model_info

    info = base_model_info(run)
    meta = {"general.name": run.name, "general.finetune": "qlora",
            "general.base_models": [{"name": info["id"]} | ({"repo_url": f"https://huggingface.co/{info['id']}"}
                                                            if info["id"].count("/") == 1 else {})]}
    if info["license"]:
        meta["general.license"] = info["license"]
    path = tmp / ".metadata.json"
    path.write_text(json.dumps(meta))
    return path


def _export_gguf(tmp, dest, run, merged, fmt, quant, tools, conversations, log, warnings, progress):
    from . import llamacpp
    from .chat import system_prompt
    from .chat_formats import modelfile
    from .loading import load_tokenizer
    from .verify import verify_gguf

    name = f"{ollama_name(run.name)}-{quant}.gguf"
    out = tmp / name
    meta = _gguf_metadata(run, tmp)
    outtype = "f16" if quant == "q4_k_m" else quant
    first = tmp / f".{outtype}.gguf" if quant == "q4_k_m" else out
    log.append(llamacpp.run_converter(tools.convert_hf, [str(merged), "--outtype", outtype, "--outfile", str(first),
                                                         "--model-name", run.name, "--metadata", str(meta)],
                                      lambda f, m: progress(0.4 * f, m), what="converting to GGUF"))
    meta.unlink()
    if quant == "q4_k_m":
        progress(0.4, "quantizing to q4_k_m with llama.cpp")
        llamacpp.quantize(first, out)
        first.unlink()
    tok = load_tokenizer(merged)
    gen = json.loads((merged / "generation_config.json").read_text()) if (merged / "generation_config.json").is_file() else {}
    text, info = modelfile(name, tok, system_prompt(run), gen.get("eos_token_id") or (), title=run.name)
    create = None
    if fmt == "ollama":
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
        warnings += info["warnings"]
        create = f"ollama create {ollama_name(run.name)} -f {dest / 'Modelfile'}"
    verified = verify_gguf(out, merged, conversations, quant, info["stops"], info["bos"],
                           lambda f, m: progress(0.45 + 0.55 * f, m))
    if fmt == "ollama":
        verified["modelfile"] = {k: info[k] for k in ("format", "label", "stops", "system", "warnings", "match")}
    return verified, create


def _export_adapter(tmp, run, base, quant, tools, log, warnings, progress) -> dict:
    import yaml

    from . import llamacpp
    from .modelcard import base_model_info, write_card
    from .verify import check, summarize, verify_lora

    info = base_model_info(run)

    shutil.copytree(run.adapter, tmp / "adapter")
    same = all(file_sha256(p) == file_sha256(tmp / "adapter" / p.relative_to(run.adapter))
               for p in run.adapter.rglob("*") if p.is_file())
    checks = [check("adapter files", same, "adapter folder identical to the run's (sha256)")]
    config = json.loads((run.adapter / "adapter_config.json").read_text())
    problem = adapter_gguf_problem(config)
    if problem:
        warnings.append(f"no LoRA GGUF: {problem}; use the PEFT adapter, or the gguf / ollama export (merged)")
        return summarize(checks, lora_gguf=None, lora_gguf_refused=problem)
    name = f"{ollama_name(run.name)}-lora-{quant}.gguf"
    # The converter takes the GGUF's metadata (base model, licence) from the adapter folder's README.md, which
    # peft writes with the base's local path: it reads a copy of the folder whose README says what the base is.
    staged = tmp / ".adapter-for-gguf"
    staged.mkdir()
    for p in run.adapter.iterdir():
        if p.is_file() and p.name != "README.md":
            os.symlink(p.resolve(), staged / p.name)
    write_card(staged, "---\n" + yaml.safe_dump({"base_model": info["id"], "license": info["license"] or "other",
                                                 "library_name": "peft", "model_name": f"{run.name} (LoRA)"}) + "---\n")
    log.append(llamacpp.run_converter(tools.convert_lora, ["--base", str(base), "--outtype", quant, "--outfile",
                                                           str(tmp / name), str(staged)],
                                      lambda f, m: progress(0.8 * f, m), what="converting the adapter to GGUF"))
    shutil.rmtree(staged)
    progress(0.85, "reading the LoRA GGUF back")
    lora = verify_lora(tmp / name, run.adapter, quant)
    return summarize(checks + lora["checks"], gguf=lora.get("gguf"), lora_gguf=name)
