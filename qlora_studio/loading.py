"""Loading a base model and its tokenizer the way a plan says, and reading what a loaded model has.

Frozen weights that are not quantized (embeddings, norms) stay in their 16-bit dtype: peft's
`prepare_model_for_kbit_training` is not called, because its fp32 up-cast of every such weight costs
~2 GB on 7-8B models and buys nothing with autocast. The adapters are kept in fp32 (peft's default) and
run under bf16/fp16 autocast.
"""

from __future__ import annotations

from pathlib import Path

from .attention import NAME as PACKED_ATTENTION, register as register_packed_attention
from .compat import import_training_stack
from .plan import torch_dtype

# Leaf names of output heads, which LoRA never adapts.
HEAD_NAMES = ("lm_head", "embed_out", "output", "score", "classifier")


def load_base_model(path: str | Path, quant: str, precision: str, device: str, double_quant: bool = True,
                    trust_remote_code: bool = False, attention: str | None = None, gpu: int | None = 0,
                    quant_storage: str | None = None):
    """The base model: 4-bit (NF4/FP4, double quant) or 16-bit, on the chosen device.
    ``precision``: "bf16" | "fp16" | "fp32" (see `plan.precision_for`). ``gpu``: the CUDA device it goes to
    (a DDP process's local rank); None leaves the placement to FSDP. ``quant_storage``: the dtype 4-bit weights
    are packed in for FSDP (the model is loaded in it too, as the peft FSDP-QLoRA guide does)."""
    import_training_stack()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch_dtype(precision)
    kwargs = {"dtype": torch_dtype(quant_storage) if quant_storage else dtype, "trust_remote_code": trust_remote_code}
    if attention:
        kwargs["attn_implementation"] = attention
        if attention == PACKED_ATTENTION:
            register_packed_attention()
    if quant in ("nf4", "fp4"):
        # Explicit on purpose: BitsAndBytesConfig defaults to FP4, no double quant, fp32 compute.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype, **({"bnb_4bit_quant_storage": torch_dtype(quant_storage)}
                                             if quant_storage else {}))
    if device == "cuda" and gpu is not None:
        kwargs["device_map"] = {"": gpu}
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def load_plan_model(path: str | Path, plan, trust_remote_code: bool = False):
    """`load_base_model` with a `RunPlan`'s choices: each DDP process on its own GPU (LOCAL_RANK, set by
    torchrun), an FSDP model placed by FSDP."""
    import os

    gpu = None if plan.parallel == "fsdp" else int(os.environ.get("LOCAL_RANK", 0))
    return load_base_model(path, plan.quant, plan.precision, plan.device, plan.double_quant, trust_remote_code,
                           attention=plan.attention, gpu=gpu, quant_storage=plan.quant_storage)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    import_training_stack()
    from transformers import AutoTokenizer

    from .data import ensure_chat_template

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    ensure_chat_template(tok)
    return tok


def linear_module_names(model) -> list[str]:
    """Leaf names of the linear layers LoRA could adapt (the output head excluded)."""
    import torch

    names = set()
    for full, module in model.named_modules():
        leaf = full.rsplit(".", 1)[-1]
        if leaf in HEAD_NAMES:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(leaf)
    return sorted(names)


def count_parameters(model) -> int:
    """Parameters of the base model, counting packed 4-bit weights at their real size."""
    total, seen = 0, set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights (lm_head = embeddings) count once
                continue
            seen.add(id(p))
            if type(module).__name__ == "Linear4bit" and name == "weight":
                total += module.in_features * module.out_features
            else:
                total += p.numel()
    return total
