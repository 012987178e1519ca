"""Workarounds for other libraries' behaviour, each in one place, saying what it works around and for
which versions it was tested. (The browser app's Gradio workarounds are in `ui/gradio_compat.py`.)
"""

from __future__ import annotations

# ------------------------------------------------------------------ bitsandbytes: CPU weight repacking
#
# Upstream behaviour (bitsandbytes 0.48-0.50 on a CPU with AVX512-BF16): the first forward of a
# `Linear4bit` in eval mode without grad (an evaluation pass, generate()) repacks its 4-bit weight in
# place into a CPU inference layout (`quant_state.packing_format_for_cpu`; the weight's shape changes
# from (N*K/2, 1) to (N, K/2)). From then on `matmul_4bit` takes a gemv path that carries no gradient to
# the layer's input, so training the model afterwards silently learns almost nothing. bitsandbytes
# itself undoes the packing only when it saves a state dict (`_convert_weight_packed_for_cpu_inverse`).
# Verified with bitsandbytes 0.50.2 (tests/test_training.py pins it). The guard is gated on the feature
# rather than a version range: a version without the repacking has neither attribute and is left alone,
# and one that still repacks is guarded too (a silent no-learning run is the worse failure).


def keep_4bit_weights_trainable(model) -> int:
    """Stop bitsandbytes from repacking a trained model's 4-bit weights (see above), and turn back any
    weight already repacked. Returns how many layers were turned back."""
    restored = 0
    for module in model.modules():
        if type(module).__name__ not in ("Linear4bit", "LinearNF4", "LinearFP4"):
            continue
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
            restored += 1
    return restored



# ------------------------------------------------------------------ transformers/peft: imports from threads
#
# Upstream behaviour (transformers 5.x lazy `_LazyModule`, with peft 0.21 and torch 2.13): importing the
# stack from two threads at once -- the app's Data tab loading a tokenizer while a run starts importing
# peft -- fails one of them with "cannot import name 'AutoModel' from 'transformers'" (a module seen
# half-initialised by the other thread; reproduced 2 of 3 times with transformers 5.24 / peft 0.21.2).
# Every path that needs the stack calls `import_training_stack` first: the first caller imports all of it
# under a lock, the others wait for it, and after that every name below resolves without importing.
# Not version-gated: importing early is harmless where the race has been fixed.

import threading as _threading

_stack_lock = _threading.Lock()
_stack_ready = False


def import_training_stack() -> None:
    """Import torch, transformers, peft, accelerate and datasets completely, once, under a lock."""
    global _stack_ready
    if _stack_ready:
        return
    with _stack_lock:
        if _stack_ready:
            return
        import importlib

        for module in ("torch", "accelerate", "datasets"):
            importlib.import_module(module)
        import peft
        import transformers

        for name in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoTokenizer", "BitsAndBytesConfig",
                     "DataCollatorForSeq2Seq", "PrinterCallback", "TextIteratorStreamer", "Trainer",
                     "TrainerCallback", "TrainingArguments", "set_seed"):
            getattr(transformers, name)
        for name in ("LoraConfig", "PeftModel", "get_peft_model", "set_peft_model_state_dict"):
            getattr(peft, name)
        _stack_ready = True


# ------------------------------------------------------------------ transformers: a checkpoint outside the loop
#
# A stop asked for during an evaluation abandons it by raising from a callback (`callback.StopDuringEvaluation`),
# which leaves the Trainer's loop; the checkpoint that a stop promises is then saved with the Trainer's own
# `_save_checkpoint(model, trial)`, the method its loop calls (a private API: tested with transformers 5.24,
# where it writes the adapter, optimizer, scheduler, RNG and trainer_state.json as a loop save does).


def save_checkpoint_now(trainer) -> bool:
    """Save a full checkpoint of ``trainer`` at its current step; False where the method is not there."""
    save = getattr(trainer, "_save_checkpoint", None)
    if save is None:
        return False
    save(trainer.model, trial=None)
    return True


# ------------------------------------------------------------------ peft: LoRA inputs copied to fp32 under CPU autocast
#
# Upstream behaviour (peft 0.21.2, `tuners/lora/bnb.py`, `Linear4bit.forward`): each adapted 4-bit layer copies
# its input to the adapter's dtype (fp32) unless `torch.is_autocast_enabled()` -- which, asked without a device
# type, answers for CUDA only. Under CPU autocast every adapted layer therefore copies its bf16 input to fp32,
# draws the LoRA dropout on the copy, and autocast casts it back to bf16 for the adapter's matmul: the same
# numbers as without the copies (the losses of a run are bit for bit the same), twice the memory traffic. On
# the GPU, under CUDA autocast, peft skips the copy already. The fix uses peft's own switch
# (`cast_input_dtype_enabled`), set before each forward from the autocast state of the input's device; without
# autocast (generation, evaluation of a 16-bit model) the copy stays. Tested with peft 0.21.2; a version outside
# 0.21 is left alone (the copies then cost speed, never correctness).


def skip_lora_input_copies_under_autocast(model) -> int:
    """Let peft's 4-bit LoRA layers skip copying their input to fp32 under CPU autocast (see above); returns
    how many layers were given the hook."""
    import peft
    import torch

    if not peft.__version__.startswith("0.21."):
        return 0
    from peft.tuners.lora.bnb import Linear4bit

    def decide(module, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor):
            module.cast_input_dtype_enabled = not torch.is_autocast_enabled(x.device.type)

    hooked = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.register_forward_pre_hook(decide)
            hooked += 1
    return hooked
