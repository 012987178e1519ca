"""The model card of an export: a README.md in Hugging Face's model-card form (YAML front matter, then
what the model is, what it learned from, every setting that matters, its results, and how to run it).

The base model's Hub id and licence are read where the base says them: the embedded model's GGUF
metadata (`general.license`), a GGUF file's metadata, or the YAML front matter of a model folder's own
README.md (a Hub download keeps it). Where nothing says, the card says "unknown" rather than guess.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import yaml

from .runs import RunFolder, read_json

FORMAT_WHAT = {
    "ollama": "a GGUF file and an Ollama Modelfile (chat template, stop tokens, system prompt)",
    "gguf": "a GGUF file for llama.cpp, LM Studio, Ollama or any GGUF runtime",
    "merged": "the adapter merged into the 16-bit base (safetensors, tokenizer, generation config)",
    "adapter": "the LoRA adapter alone (PEFT format, and as a LoRA GGUF for llama.cpp)",
}


def _front_matter(readme: Path) -> dict:
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    try:
        doc = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return doc if isinstance(doc, dict) else {}


@functools.lru_cache(maxsize=8)
def _gguf_license(path: Path) -> str | None:
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(path)).fields.get("general.license")
        return str(field.contents()) if field is not None else None
    except Exception:  # not readable: the licence stays unknown
        return None


def base_model_info(run: RunFolder) -> dict:
    """{"id": Hub id or name, "license": ... or None, "path": local folder} of the run's base model."""
    from .models import EMBEDDED_HUB_ID, EMBEDDED_NAMES, embedded_gguf_path

    cfg = run.config()
    spec = str(cfg.get("model") or "embedded")
    path = (run.plan().get("model") or {}).get("path")
    info = {"id": spec, "license": None, "path": path}
    if spec.lower() in EMBEDDED_NAMES:
        info.update(id=EMBEDDED_HUB_ID, license=_gguf_license(embedded_gguf_path()))
    elif spec.lower().endswith(".gguf"):
        info.update(id=Path(spec).stem, license=_gguf_license(Path(spec).expanduser()))
    if path and (Path(path) / "README.md").is_file():
        meta = _front_matter(Path(path) / "README.md")
        info["license"] = info["license"] or meta.get("license")
        if Path(spec).expanduser().is_dir() and isinstance(meta.get("base_model"), str):
            info["id"] = meta["base_model"]
    if Path(spec).expanduser().is_dir() and info["id"] == spec:
        info["id"] = Path(spec).expanduser().resolve().name
    return info


def _fmt(x, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def model_card(run: RunFolder, fmt: str, quant: str, files: list[str], verified: dict, ollama_name: str,
               seconds: float) -> str:
    """The README.md text for an export of ``run``."""
    cfg, doc, summary = run.config(), run.plan(), run.summary()
    plan = doc.get("plan") or {}
    report = read_json(run.path / "data_report.json", {}) or {}
    base = base_model_info(run)
    gguf_file = next((f for f in files if f.endswith(".gguf")), None)
    tags = ["qlora", "lora", "peft", "qlora-studio"] + (["gguf"] if gguf_file else []) + (
        ["ollama"] if fmt == "ollama" else [])
    front = {"base_model": base["id"], "library_name": "peft" if fmt == "adapter" else (
        "gguf" if fmt in ("gguf", "ollama") else "transformers"), "tags": tags,
        "license": base["license"] or "unknown", "pipeline_tag": "text-generation"}
    data = Path(str(cfg.get("data") or "?"))
    task = summary.get("task_eval") or {}
    metric = ", ".join(f"{k.replace('_', ' ')} {v:.1%}" for k, v in task.items()
                       if isinstance(v, float) and 0 <= v <= 1) if isinstance(task, dict) else ""
    quant_train = plan.get("quant") or cfg.get("quant")
    rows = [("base model", f"{base['id']} (loaded in {'4-bit ' + str(quant_train).upper() if quant_train in ('nf4', 'fp4') else '16-bit'}"
             + (", double quantization" if quant_train in ("nf4", "fp4") and plan.get("double_quant") else "") + ")"),
            ("LoRA", f"rank {plan.get('rank')}, alpha {plan.get('alpha')}, dropout {plan.get('lora_dropout')}, "
                     f"on {', '.join(plan.get('targets') or [])}"),
            ("learning rate", f"{cfg.get('learning_rate')} ({(doc.get('schedule') or {}).get('scheduler', 'cosine')}, "
                              f"warmup ratio {cfg.get('warmup_ratio')})"),
            ("epochs / steps", f"{cfg.get('epochs')} epochs" + (f", at most {cfg.get('max_steps')} steps"
                                                               if cfg.get("max_steps") else "")
             + f" ({summary.get('global_step', '?')} steps ran)"),
            ("batch", f"{plan.get('batch_size')} x {plan.get('grad_accum')} accumulation, {plan.get('batching')}"),
            ("max sequence length", str(plan.get("max_seq_len") or cfg.get("max_seq_len"))),
            ("precision / optimizer", f"{plan.get('precision')}, {plan.get('optimizer')}"),
            ("seed", str(cfg.get("seed")))]
    results = [("final train loss", _fmt(summary.get("final_loss"))),
               ("eval loss", _fmt((summary.get("eval") or {}).get("eval_loss")))]
    if metric:
        results.append(("task metric", metric))
    results += [("hardware", str(plan.get("machine") or summary.get("device") or "?")),
                ("training time", f"{summary['train_runtime_s'] / 60:.1f} min" if isinstance(
                    summary.get("train_runtime_s"), (int, float)) else "-")]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {run.name}", "",
             f"A QLoRA fine-tune of [{base['id']}]({_hub_url(base['id'])}) made with QLoRA Studio. "
             f"This folder holds {FORMAT_WHAT[fmt]}" + (f", quantized as {quant}" if fmt in ("gguf", "ollama") else "")
             + ".", "",
             "## Training data", "",
             f"- file: `{data.name}` ({report.get('format', '?')} format)",
             f"- sha256: `{cfg.get('data_sha256') or report.get('sha256') or '?'}`",
             f"- rows: {report.get('rows', '?')} ({report.get('usable', '?')} usable)", "",
             "## Settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Results", "", "| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in results]
    lines += ["", "## Verification", "",
              f"{'Passed' if verified.get('ok') else 'FAILED'}: {verified.get('summary', '')} "
              "(details in `verify.json`)", "", "## How to run it", ""]
    lines += _how_to_run(fmt, run.name, base["id"], gguf_file, ollama_name)
    lines += ["", f"Exported {time.strftime('%Y-%m-%d %H:%M')} in {seconds:.0f} s. Files: "
              + ", ".join(f"`{f}`" for f in files) + ".", ""]
    return "\n".join(lines)


def _hub_url(model_id: str) -> str:
    return f"https://huggingface.co/{model_id}" if model_id.count("/") == 1 else model_id


def _how_to_run(fmt: str, name: str, base_id: str, gguf_file: str | None, ollama_name: str) -> list[str]:
    with_transformers = ["With transformers (it reads the GGUF back into 32-bit weights):", "", "```python",
                         "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                         f'model = AutoModelForCausalLM.from_pretrained(".", gguf_file="{gguf_file}")',
                         f'tok = AutoTokenizer.from_pretrained(".", gguf_file="{gguf_file}")', "```"]
    if fmt == "ollama":
        return ["With Ollama (from this folder):", "", "```sh", f"ollama create {ollama_name} -f Modelfile",
                f"ollama run {ollama_name}", "```", "",
                "With llama.cpp:", "", "```sh", f"llama-cli -m {gguf_file} -cnv", "```", ""] + with_transformers
    if fmt == "gguf":
        return ["With llama.cpp (the chat template is inside the file):", "", "```sh",
                f"llama-cli -m {gguf_file} -cnv", "```", "",
                "LM Studio: copy the file into its models folder. Ollama: use the `ollama` export, which adds a "
                "Modelfile with the chat template and stop tokens.", ""] + with_transformers
    if fmt == "merged":
        return ["With transformers:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                "", 'model = AutoModelForCausalLM.from_pretrained(".")', 'tok = AutoTokenizer.from_pretrained(".")',
                'msgs = [{"role": "user", "content": "Hello"}]',
                "ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors='pt', return_dict=True)",
                "print(tok.decode(model.generate(**ids, max_new_tokens=64)[0]))", "```"]
    lines = ["With transformers and peft (on the base model):", "", "```python",
             "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
             "", f'base = AutoModelForCausalLM.from_pretrained("{base_id}")',
             'model = PeftModel.from_pretrained(base, "adapter")', "```"]
    if gguf_file:
        lines += ["", "With llama.cpp, on a GGUF of the base model:", "", "```sh",
                  f"llama-cli -m base.gguf --lora {gguf_file} -cnv", "```"]
    return lines


def write_card(folder: Path, text: str) -> None:
    (Path(folder) / "README.md").write_text(text, encoding="utf-8")

