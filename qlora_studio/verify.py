"""The round trip that ends every export: read back what was written and compare it with the model it
came from, on the run's own prompts. The result goes into the export folder as ``verify.json``.

- A GGUF: its metadata read back with gguf's reader (architecture, file type, chat template, BOS / EOS /
  end-of-turn ids, every stop token of the Modelfile in its vocabulary); then the file loaded back through
  transformers' GGUF loader and compared with the merged model: the tokenizer's ids on every prompt, the
  greedy continuation of each prompt, and the top-1 agreement of the next-token choice along the merged
  model's continuation. A 16-bit file must continue every prompt exactly as the merged model does; a
  quantized one must agree on at least `MIN_AGREEMENT` of the tokens (the figure is stated either way).
  With llama-cpp-python installed, llama.cpp itself tokenizes and continues the prompts too.
- A merged folder: loaded back with transformers and compared with base + adapter (unmerged).
- A LoRA GGUF: every lora_a / lora_b tensor read back and compared with the PEFT adapter's.

The two models of a comparison are loaded one after the other, in float32 up to 3B parameters and in
bfloat16 above (`compute_dtype`; a 16-bit file still matches exactly there).

A check that fails says what differs; the files are kept either way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

MAX_NEW_TOKENS = 24
# Top-1 agreement a quantized file must reach (per quant); 16-bit files must match exactly.
MIN_AGREEMENT = {"q8_0": 0.9, "q4_k_m": 0.75, "merged": 0.9}
EXACT = ("f16", "bf16", "f32")
FP32_MAX_PARAMS = 3_000_000_000
FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_k_m": "MOSTLY_Q4_K_M",
              "f32": "ALL_F32"}

Progress = Callable[[float, str], None]


def check(name: str, ok: bool, detail: str, **extra) -> dict:
    return {"name": name, "ok": bool(ok), "detail": detail, **extra}


def summarize(checks: list[dict], **extra) -> dict:
    failed = [c for c in checks if not c["ok"]]
    summary = ("all checks passed: " + "; ".join(c["detail"] for c in checks) if not failed
               else "FAILED: " + "; ".join(f"{c['name']}: {c['detail']}" for c in failed))
    return {"ok": not failed, "summary": summary, "checks": checks, **extra}


# ------------------------------------------------------------------ metadata


def read_gguf(path: Path) -> dict:
    """The metadata that matters, read back with gguf's reader (tokens as a list)."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(str(path))

    def value(key, default=None):
        field = reader.fields.get(key)
        return field.contents() if field is not None else default

    arch = value("general.architecture")
    file_type = value("general.file_type")
    try:
        file_type_name = LlamaFileType(int(file_type)).name if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    return {"architecture": arch, "type": value("general.type", "model"), "file_type": file_type_name,
            "name": value("general.name"), "chat_template": value("tokenizer.chat_template"),
            "bos_id": value("tokenizer.ggml.bos_token_id"), "eos_id": value("tokenizer.ggml.eos_token_id"),
            "eot_id": value("tokenizer.ggml.eot_token_id"), "add_bos": value("tokenizer.ggml.add_bos_token"),
            "tokens": value("tokenizer.ggml.tokens") or [], "lora_alpha": value("adapter.lora.alpha"),
            "n_tensors": len(reader.tensors), "size_bytes": Path(path).stat().st_size,
            "tensors": {t.name: t for t in reader.tensors}}


def _adds_bos(tok) -> bool:
    ids = tok("a").input_ids
    return bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id


def metadata_checks(meta: dict, tok, quant: str, stops: list[str], template_bos: str = "") -> list[dict]:
    from .chat_formats import chat_template_text

    want_type = FILE_TYPES.get(quant)
    checks = [check("architecture", bool(meta["architecture"]), f"architecture {meta['architecture']}"),
              check("file type", meta["file_type"] == want_type, f"file type {meta['file_type']}"
                    + ("" if meta["file_type"] == want_type else f", expected {want_type}"))]
    template = chat_template_text(tok)
    same = (meta["chat_template"] or "") == template
    checks.append(check("chat template", same, "chat template identical to the tokenizer's" if same else
                        "the GGUF's chat template differs from the tokenizer's" if meta["chat_template"]
                        else "the GGUF has no chat template"))
    eos_ok = meta["eos_id"] == tok.eos_token_id
    detail = f"eos id {meta['eos_id']}" + ("" if eos_ok else f", the tokenizer's is {tok.eos_token_id}")
    if meta["eot_id"] is not None:
        detail += f", eot id {meta['eot_id']}"
    checks.append(check("eos", eos_ok, detail))
    vocab = meta["tokens"]
    missing = [s for s in stops if s not in vocab]
    checks.append(check("stop tokens", not missing, f"stop tokens {stops} in its vocabulary" if not missing
                        else f"stop tokens not in its vocabulary: {missing}"))
    adds = bool(meta["add_bos"])
    bos_ok = adds == _adds_bos(tok) and (adds or not template_bos)
    checks.append(check("bos", bos_ok, f"adds BOS: {'yes' if adds else 'no'}" + ("" if bos_ok else (
        f"; the chat template starts with {template_bos} but the file does not add it" if template_bos and not adds
        else "; the tokenizer does the opposite"))))
    return checks


# ------------------------------------------------------------------ generation


def prompt_texts(tok, conversations: list[list[dict]]) -> list[str]:
    return [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]


def greedy(model, tok, texts: list[str], n: int = MAX_NEW_TOKENS) -> list[list[int]]:
    """Each prompt's greedy continuation (token ids, ending at EOS if it comes)."""
    import torch

    out = []
    for text in texts:
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                                 eos_token_id=tok.eos_token_id)
        out.append(gen[0, enc.input_ids.shape[1]:].tolist())
    return out


def picks(model, tok, texts: list[str], continuations: list[list[int]]) -> list[list[int]]:
    """``model``'s top-1 next token at each step of the reference continuations (one forward per prompt).
    Where every pick is the reference's token, ``model``'s own greedy continuation is that same one: greedy
    decoding is exactly this choice, step after step."""
    import torch

    out = []
    for text, cont in zip(texts, continuations):
        prompt = tok(text, add_special_tokens=False).input_ids
        if not cont:
            out.append([])
            continue
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt + cont])).logits[0]
        out.append(logits[len(prompt) - 1:len(prompt) - 1 + len(cont)].argmax(-1).tolist())
    return out


def compute_dtype(params: int):
    """float32 for both models of a comparison up to `FP32_MAX_PARAMS` (one at a time: 4 bytes a
    parameter); bfloat16 above, where a 16-bit file still matches exactly (bf16 weights survive f16 and back)."""
    import torch

    return torch.float32 if params <= FP32_MAX_PARAMS else torch.bfloat16


def compare_models(load_reference, load_test, tok, texts: list[str], quant: str, label: str) -> tuple[list[dict], list]:
    """Greedy continuations and top-1 agreement of the model ``load_test()`` returns against the one
    ``load_reference()`` returns (the same tokenizer); one model in memory at a time."""
    import gc

    reference = load_reference()
    want = greedy(reference, tok, texts)
    del reference
    gc.collect()
    test = load_test()
    got = picks(test, tok, texts, want)
    del test
    gc.collect()
    same = sum(int(a == b) for a, b in zip(want, got))
    hits = sum(int(x == y) for a, b in zip(want, got) for x, y in zip(a, b))
    total = sum(len(a) for a in want)
    rate = hits / total if total else 1.0
    exact = quant in EXACT
    ok = same == len(texts) if exact else rate >= MIN_AGREEMENT.get(quant, 0.9)
    detail = (f"{label}: the same greedy continuation on {same} of {len(texts)} prompts, top-1 agreement "
              f"{rate:.1%} ({hits}/{total} tokens)")
    first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
    if not ok and first is not None:
        k = next(j for j, (x, y) in enumerate(zip(want[first], got[first])) if x != y)
        detail += (f"; prompt {first + 1} differs at token {k + 1}: {tok.decode(want[first][k:k + 1])!r} expected, "
                   f"{tok.decode(got[first][k:k + 1])!r} picked")
        if not exact:
            detail += f"; {MIN_AGREEMENT.get(quant, 0.9):.0%} needed"
    return [check(label, ok, detail, agreement=round(rate, 4), identical=same, prompts=len(texts))], want


def tokenizer_check(tok, other, texts: list[str], label: str) -> dict:
    bad = [i for i, t in enumerate(texts) if tok(t).input_ids != other(t).input_ids]
    return check(label, not bad, f"{label}: identical ids on {len(texts) - len(bad)} of {len(texts)} prompts"
                 + (f" (first difference in prompt {bad[0] + 1})" if bad else ""))


def llama_cpp_checks(gguf_path: Path, tok, texts: list[str], reference: list[list[int]], quant: str) -> list[dict]:
    """llama.cpp's own tokenizer and greedy continuation (llama-cpp-python, in a subprocess)."""
    from . import llamacpp

    result = llamacpp.generate(gguf_path, texts, MAX_NEW_TOKENS)
    bad = [i for i, (ids, t) in enumerate(zip(result["tokens"], texts)) if ids != tok(t).input_ids]
    checks = [check("llama.cpp tokenizer", not bad, f"llama.cpp tokenizer: identical ids on {len(texts) - len(bad)} "
                    f"of {len(texts)} prompts" + (f" (first difference in prompt {bad[0] + 1})" if bad else ""))]
    same = prefix = total = 0
    for want, got in zip(reference, result["generated"]):
        same += int(want == got)
        k = next((j for j, (x, y) in enumerate(zip(want, got)) if x != y), min(len(want), len(got)))
        prefix += k
        total += len(want)
    rate = prefix / total if total else 1.0
    ok = same == len(texts) if quant in EXACT else rate >= MIN_AGREEMENT.get(quant, 0.9) * 0.5
    checks.append(check("llama.cpp generation", ok, f"llama.cpp: the same greedy continuation on {same} of "
                        f"{len(texts)} prompts ({rate:.1%} of the tokens before the first difference)",
                        identical=same, prefix_agreement=round(rate, 4)))
    return checks


def verify_gguf(gguf_path: Path, merged: Path, conversations: list[list[dict]], quant: str, stops: list[str],
                template_bos: str = "", progress: Progress | None = None) -> dict:
    """The GGUF against the merged model it was converted from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import llamacpp
    from .loading import load_tokenizer

    progress = progress or (lambda f, m: None)
    gguf_path = Path(gguf_path)
    progress(0.0, "reading the GGUF's metadata back")
    meta = read_gguf(gguf_path)
    tok = load_tokenizer(merged)
    checks = metadata_checks(meta, tok, quant, stops, template_bos)
    texts = prompt_texts(tok, conversations)
    progress(0.2, "loading the GGUF back with transformers")
    folder, name = str(gguf_path.parent), gguf_path.name
    gtok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    checks.append(tokenizer_check(tok, gtok, texts, "tokenizer"))
    progress(0.3, "comparing greedy continuations with the merged model")
    dtype = compute_dtype(_params(merged))
    found, continuations = compare_models(
        lambda: AutoModelForCausalLM.from_pretrained(str(merged), dtype=dtype).eval(),
        lambda: AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).eval(),
        tok, texts, quant, "generation")
    checks += found
    runtime = None
    if llamacpp.runtime_available():
        progress(0.8, "generating with llama.cpp")
        checks += llama_cpp_checks(gguf_path, tok, texts, continuations, quant)
        runtime = "llama-cpp-python"
    progress(1.0, "verified")
    shown = {k: v for k, v in meta.items() if k not in ("tokens", "tensors", "chat_template", "lora_alpha")}
    return summarize(checks, gguf=dict(shown, chat_template=bool(meta["chat_template"])), prompts=texts,
                     reference=[tok.decode(c) for c in continuations], llama_cpp=runtime, compute_dtype=str(dtype))


def _params(folder: Path) -> int:
    """Parameters of a safetensors model folder, from its tensors' shapes (no weights read)."""
    from safetensors import safe_open

    total = 0
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def verify_merged(folder: Path, base: Path, adapter: Path, run_tokenizer: Path, conversations: list[list[dict]],
                  progress: Progress | None = None) -> dict:
    """The exported merged folder, loaded back, against base + adapter (unmerged, fp32)."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .chat_formats import chat_template_text
    from .loading import load_tokenizer

    progress = progress or (lambda f, m: None)
    progress(0.0, "loading the merged model back")
    config = json.loads((Path(folder) / "config.json").read_text())
    checks = [check("16-bit", "quantization_config" not in config,
                    f"saved in {config.get('dtype') or config.get('torch_dtype')}, no quantization_config"
                    if "quantization_config" not in config else "carries a quantization_config")]
    tok, run_tok = load_tokenizer(folder), load_tokenizer(run_tokenizer)
    texts = prompt_texts(run_tok, conversations)
    checks.append(tokenizer_check(run_tok, tok, texts, "tokenizer"))
    same = chat_template_text(tok) == chat_template_text(run_tok)
    checks.append(check("chat template", same, "chat template identical to the run's" if same
                        else "chat template differs from the run's"))
    progress(0.2, "comparing greedy continuations of base + adapter and the merged model")
    dtype = compute_dtype(_params(folder))
    found, continuations = compare_models(
        lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype),
                                          str(adapter)).eval(),
        lambda: AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval(),
        tok, texts, "merged", "generation")
    progress(1.0, "verified")
    return summarize(checks + found, prompts=texts, reference=[tok.decode(c) for c in continuations],
                     compute_dtype=str(dtype))


def verify_lora(lora_gguf: Path, adapter: Path, quant: str) -> dict:
    """Every lora_a / lora_b tensor of the LoRA GGUF against the PEFT adapter's (within its number format)."""
    import json
    from collections import Counter

    import numpy as np
    from gguf.quants import dequantize
    from safetensors.numpy import load_file

    meta = read_gguf(lora_gguf)
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    peft = load_file(str(Path(adapter) / "adapter_model.safetensors")) if (
        Path(adapter) / "adapter_model.safetensors").is_file() else {}
    checks = [check("type", meta["type"] == "adapter", f"general.type {meta['type']}"),
              check("alpha", meta["lora_alpha"] is not None and math.isclose(float(meta["lora_alpha"]),
                                                                              float(config.get("lora_alpha", 0))),
                    f"lora alpha {meta['lora_alpha']} (adapter_config: {config.get('lora_alpha')})"),
              ]
    pairs = [t for t in meta["tensors"] if t.endswith((".lora_a", ".lora_b"))]
    # A LoRA GGUF has no general.file_type: its tensors say. Rows too short for Q8_0 blocks stay 16-bit.
    kinds = Counter(meta["tensors"][t].tensor_type.name for t in pairs)
    want = quant.upper()
    checks.append(check("tensor types", want in kinds and set(kinds) <= {want, "F16", "F32"},
                        "tensor types " + ", ".join(f"{n} {k}" for k, n in kinds.most_common())))
    want_pairs = sum(1 for k in peft if ".lora_A." in k or ".lora_B." in k)
    checks.append(check("tensors", len(pairs) == want_pairs,
                        f"{len(pairs)} LoRA tensors (the adapter has {want_pairs})"))
    # Each adapter tensor against the GGUF tensor of the same layer, as sorted values: the converter renames
    # tensors and permutes the rows of some (Llama's q/k), and must not change a single value otherwise.
    tol = {"f32": 1e-6, "f16": 1e-3, "bf16": 8e-3, "q8_0": 1.5e-2}.get(quant, 2e-2)
    names = _gguf_names(meta["architecture"], peft)
    worst, unmatched = 0.0, [k for k, n in names.items() if n not in meta["tensors"]]
    for key, name in names.items():
        if name in meta["tensors"]:
            t = meta["tensors"][name]
            got = np.sort(dequantize(t.data, t.tensor_type).astype(np.float64).ravel())
            want = np.sort(peft[key].astype(np.float64).ravel())
            scale = max(float(np.abs(want).max()), 1e-12)
            worst = max(worst, float(np.abs(got - want).max()) / scale if got.shape == want.shape else math.inf)
    checks.append(check("values", not unmatched and worst <= tol,
                        f"every LoRA tensor within {worst:.1e} of the adapter's (relative to its largest value; "
                        f"allowed {tol:.0e})" if not unmatched else f"no GGUF tensor for {unmatched[:3]}"))
    shown = {k: v for k, v in meta.items() if k not in ("tokens", "tensors", "chat_template")}
    return summarize(checks, gguf=shown)


def _gguf_names(arch: str, peft: dict) -> dict:
    """PEFT tensor name -> the LoRA GGUF's name for it (llama.cpp's tensor map, through gguf)."""
    import re

    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    blocks = 1 + max((int(m.group(1)) for k in peft if (m := re.search(r"\.layers\.(\d+)\.", k))), default=0)
    tmap = gguf.get_tensor_name_map(arch_id, blocks)
    out = {}
    for key in peft:
        m = re.match(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight$", key)
        if m:
            name = tmap.get_name(m.group(1) + ".weight", try_suffixes=(".weight",))
            out[key] = f"{name}.lora_{m.group(2).lower()}" if name else key
    return out
