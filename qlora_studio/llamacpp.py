"""llama.cpp's own tools, pinned: the GGUF converters (Python, no compiled code) and, when a compiled
llama.cpp is installed (`pip install 'qlora-studio[llama_cpp]'`), its quantizer and runtime.

The converters (``convert_hf_to_gguf.py`` with its ``conversion/`` package, ``convert_lora_to_gguf.py``)
and the ``gguf-py`` of the same revision come from the source distribution of llama-cpp-python on PyPI,
which vendors llama.cpp. It is fetched with pip on the first export (about 77 MB, once), checked
against the sha256 pinned here, and only the converter files are kept, in
``<studio home>/tools/llama.cpp-<version>/`` (or ``$QLORA_STUDIO_TOOLS``). Converters run in a
subprocess with `sys.executable`, so a converter's crash or memory use never touches the caller.

Run as ``python -m qlora_studio.llamacpp quantize|generate ...``, this module is the subprocess that
calls llama-cpp-python's compiled library (a crash in native code ends that process only).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .datafile import file_sha256
from .errors import StudioError
from .home import studio_home

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_MB = 77
_VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
# What the converters need from the vendored llama.cpp (paths relative to it).
_KEEP = re.compile(r"^(convert_hf_to_gguf\.py|convert_lora_to_gguf\.py|LICENSE|conversion/[\w.]+\.py|"
                   r"gguf-py/gguf/[\w/]+\.(py|typed))$")
TOOLS_ENV = "QLORA_STUDIO_TOOLS"
# The llama.cpp file types a quant name stands for (llama.h's llama_ftype).
Q4_K_M_FTYPE = 15

Progress = Callable[[float, str], None]


class ToolError(StudioError):
    """llama.cpp's tools could not be fetched or run; the message says why and what to do."""


@dataclass(frozen=True)
class Tools:
    root: Path

    @property
    def convert_hf(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def convert_lora(self) -> Path:
        return self.root / "convert_lora_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.root / "gguf-py"


def tools_dir() -> Path:
    base = Path(os.environ[TOOLS_ENV]).expanduser() if os.environ.get(TOOLS_ENV) else studio_home() / "tools"
    return base / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"



def _quiet(progress: Progress | None) -> Progress:
    return progress or (lambda f, m: None)


def download_sdist(dest: Path, progress: Progress | None = None) -> Path:
    """The pinned llama-cpp-python source distribution in ``dest`` (with pip, through whatever package
    index pip is set up to use), its sha256 checked. A file already there with the right sha256 is kept."""
    progress = _quiet(progress)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / SDIST_NAME
    if target.is_file() and file_sha256(target) == LLAMA_CPP_PYTHON_SHA256:
        return target
    progress(0.0, f"downloading llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source, "
                  f"{SDIST_MB} MB, once) with pip")
    cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "--no-deps",
           "--no-binary", ":all:", "--disable-pip-version-check", "-d", str(dest)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        progress(min(0.9, (time.monotonic() - t0) / 180), f"downloading llama.cpp's converter: {line.strip()[:100]}")
    proc.wait()
    if proc.returncode != 0 or not target.is_file():
        last = next((ln for ln in reversed(lines) if ln.strip() and not ln.startswith("WARNING")), "no output")
        raise ToolError(f"could not download llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} (llama.cpp's GGUF converter) "
                        f"with pip: {last.strip()}",
                        hint=f"connect to the internet once, or run `pip download llama-cpp-python=="
                             f"{LLAMA_CPP_PYTHON_VERSION} --no-deps --no-binary :all: -d {dest}` where there is one "
                             f"and copy {SDIST_NAME} there")
    digest = file_sha256(target)
    if digest != LLAMA_CPP_PYTHON_SHA256:
        target.unlink()
        raise ToolError(f"{SDIST_NAME}: sha256 {digest} is not the pinned {LLAMA_CPP_PYTHON_SHA256}; not used",
                        hint="the package index served another file than the one this version of the studio was "
                             "tested with; check the index pip uses (pip config list)")
    progress(0.95, "downloaded; checked its sha256")
    return target


def install_tools(sdist: Path, progress: Progress | None = None) -> Tools:
    """Extract the converter files of a checked sdist into `tools_dir()` (atomically: a temporary folder
    renamed into place)."""
    progress = _quiet(progress)
    final = tools_dir()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=final.parent))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                rel = member.name[len(_VENDOR):] if member.name.startswith(_VENDOR) else None
                if rel is None or not member.isfile() or not _KEEP.match(rel) or ".." in rel.split("/"):
                    continue
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        (tmp / "studio_tools.json").write_text(json.dumps(
            {"llama-cpp-python": LLAMA_CPP_PYTHON_VERSION, "sha256": LLAMA_CPP_PYTHON_SHA256}))
        tools = Tools(tmp)
        if not (tools.convert_hf.is_file() and tools.convert_lora.is_file() and (tools.gguf_py / "gguf").is_dir()):
            raise ToolError(f"{sdist}: the converter files are not where llama-cpp-python "
                            f"{LLAMA_CPP_PYTHON_VERSION} keeps them")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(1.0, f"llama.cpp's converter ready in {final}")
    return Tools(final)


def ensure_tools(progress: Progress | None = None) -> Tools:
    """The converters, fetched and extracted on first use."""
    tools = Tools(tools_dir())
    marker = tools.root / "studio_tools.json"
    if marker.is_file() and tools.convert_hf.is_file():
        return tools
    with tempfile.TemporaryDirectory(prefix="llama-cpp-python-") as tmp:
        kept = tools.root.parent / SDIST_NAME  # a file put there by hand (no internet): used if its sha256 is right
        if kept.is_file():
            shutil.copy(kept, Path(tmp) / SDIST_NAME)
        return install_tools(download_sdist(Path(tmp), progress), progress)


# ------------------------------------------------------------------ running a converter


def _missing_module_hint(output: str) -> str | None:
    m = re.search(r"No module named '([\w.]+)'", output)
    if not m:
        return None
    name = m.group(1).split(".")[0]
    package = {"sentencepiece": "sentencepiece", "google": "protobuf", "mistral_common": "mistral-common"}.get(name, name)
    return f"llama.cpp's converter needs the Python package {package!r} for this model: pip install {package}"


def run_converter(script: Path, args: list[str], progress: Progress | None = None, what: str = "converting") -> str:
    """Run one of llama.cpp's converter scripts in a subprocess; its output (for the log). Progress comes
    from the tensors it reports and its "Writing: NN%" bar. A failure is a `ToolError` with the
    converter's own last error lines."""
    progress = _quiet(progress)
    tools_root = Path(script).parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8",
               PYTHONPATH=os.pathsep.join([str(tools_root / "gguf-py"), str(tools_root)]
                                          + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("NO_LOCAL_GGUF", None)
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env)
    out, buf, tensors = [], b"", 0
    while chunk := proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096):
        buf += chunk
        *parts, buf = re.split(rb"[\r\n]", buf)
        for raw in parts:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            if (m := re.match(r"Writing:\s+(\d+)%", line)) is not None:
                progress(0.5 + int(m.group(1)) / 200, f"{what}: writing {m.group(1)}%")
                continue
            out.append(line)
            if re.match(r"INFO:[\w-]+:[\w.]+,\s+torch\.", line):
                tensors += 1
                if tensors % 20 == 0:
                    progress(min(0.45, tensors / 2000), f"{what}: {tensors} tensors read")
    proc.wait()
    text = "\n".join(out)
    if proc.returncode != 0:
        errors = [ln for ln in out if ln.startswith(("ERROR", "Traceback")) or re.match(r"^\w*(Error|Exception)\b", ln)]
        detail = errors[-1] if errors else (out[-1] if out else f"exit code {proc.returncode}")
        hint = _missing_module_hint(text)
        if "pre-tokenizer was not recognized" in text:
            hint = ("llama.cpp's converter does not know this tokenizer (it checks a hash of how it splits a test "
                    "text) and will not guess: a model whose tokenizer files were changed, or a newer model than "
                    f"llama.cpp {LLAMA_CPP_PYTHON_VERSION}'s converter knows")
        raise ToolError(f"llama.cpp's {Path(script).name} failed: {detail}",
                        hint=hint or "the converter's full output is in the export folder's export.log")
    return text


# ------------------------------------------------------------------ the compiled llama.cpp (optional)


def runtime_available() -> bool:
    """Whether llama-cpp-python (llama.cpp compiled, with its quantizer and runtime) is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


def _run_self(args: list[str], timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "qlora_studio.llamacpp", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                              [str(Path(__file__).resolve().parent.parent)]
                              + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ToolError(f"llama.cpp ({' '.join(args[:1])}) failed: {tail}")
    return json.loads(lines[-1])


def quantize(src: Path, dst: Path, ftype: int = Q4_K_M_FTYPE, timeout: float = 3600) -> None:
    """llama.cpp's quantizer (llama_model_quantize) from a 16-bit GGUF, in a subprocess."""
    _run_self(["quantize", str(src), str(dst), str(ftype)], timeout)


def generate(gguf_path: Path, prompts: list[str], max_new_tokens: int, timeout: float = 1800) -> dict:
    """Greedy continuations with llama.cpp: {"tokens": [[ids of the prompt]], "generated": [[ids]]}."""
    return _run_self(["generate", str(gguf_path), json.dumps(prompts), str(max_new_tokens)], timeout)


def _main(argv: list[str]) -> int:
    import llama_cpp

    if argv[0] == "quantize":
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(argv[3])
        rc = llama_cpp.llama_model_quantize(argv[1].encode(), argv[2].encode(), params)
        print(json.dumps({"rc": rc}))
        return 0 if rc == 0 else 1
    if argv[0] == "generate":
        llm = llama_cpp.Llama(model_path=argv[1], n_ctx=2048, n_threads=max(1, (os.cpu_count() or 2)), verbose=False,
                              seed=0)
        tokens, generated = [], []
        for prompt in json.loads(argv[2]):
            ids = llm.tokenize(prompt.encode("utf-8"), add_bos=llm._model.add_bos_token(), special=True)
            out = []
            llm.reset()
            for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok) or len(out) >= int(argv[3]):
                    if len(out) < int(argv[3]):
                        out.append(int(tok))
                    break
                out.append(int(tok))
            tokens.append([int(t) for t in ids])
            generated.append(out)
        print(json.dumps({"tokens": tokens, "generated": generated}))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
