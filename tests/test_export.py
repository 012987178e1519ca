"""Export: runs on the embedded model and on a tiny Llama-shaped model, exported in every format with
llama.cpp's own converters, read back and compared (verify.json); the Ollama template table checked
against real chat templates (the ones llama.cpp tests with, from the same pinned source) by rendering the
Modelfile's Go template the way Ollama does (tests/gotemplate.py)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from gotemplate import ollama_render, render as go_render
from qlora_studio import llamacpp
from qlora_studio.chat_formats import PROBE, go_template, match_format
from qlora_studio.config import TrainConfig
from qlora_studio.export import ExportError, adapter_gguf_problem, export_run
from qlora_studio.runs import RunFolder
from qlora_studio.training import prepare_run, run_training

ROOT = Path(__file__).resolve().parent.parent
TWO_TURNS = [{"role": "system", "content": "You write SQL."}] + PROBE
# llama.cpp's models/templates/<file>.jinja -> the family the table must find for it
UPSTREAM = {"Qwen-Qwen2.5-7B-Instruct": "chatml", "Qwen-Qwen3-0.6B": "chatml",
            "meta-llama-Llama-3.1-8B-Instruct": "llama3", "meta-llama-Llama-3.3-70B-Instruct": "llama3",
            "mistralai-Mistral-Nemo-Instruct-2407": "mistral", "Mistral-Small-3.2-24B-Instruct-2506": "mistral-v7",
            "google-gemma-2-2b-it": "gemma", "microsoft-Phi-3.5-mini-instruct": "phi3"}


@pytest.fixture(scope="session")
def llama_tools():
    """llama.cpp's converters (fetched once into $QLORA_STUDIO_TOOLS, the cache conftest sets) and the chat
    templates of the same source, for the template tests."""
    cache = llamacpp.tools_dir().parent
    templates = cache / "chat-templates"
    if not (templates.is_dir() and (llamacpp.tools_dir() / "studio_tools.json").is_file()):
        sdist = llamacpp.download_sdist(cache)  # kept in the cache: one download for both
        llamacpp.install_tools(sdist)
        tmp = cache / ".chat-templates"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with tarfile.open(sdist) as tar:
            for m in tar:
                if "/models/templates/" in m.name and m.name.endswith(".jinja") and m.isfile():
                    (tmp / Path(m.name).name).write_bytes(tar.extractfile(m).read())
        shutil.rmtree(templates, ignore_errors=True)
        tmp.rename(templates)
    return SimpleNamespace(tools=llamacpp.ensure_tools(), templates=templates)


@pytest.fixture(scope="module")
def embedded_tok(embedded_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_path)


def modelfile_parts(text: str) -> dict:
    """TEMPLATE, SYSTEM, FROM and the stops of a Modelfile (its triple-quoted values may span lines)."""
    out = {"stop": re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)}
    for key in ("TEMPLATE", "SYSTEM"):
        m = re.search(rf'^{key} """(.*?)"""$', text, re.M | re.S)
        out[key] = m.group(1) if m else None
    out["FROM"] = re.search(r"^FROM (.+)$", text, re.M).group(1)
    return out


# ------------------------------------------------------------------ the template table


def test_go_evaluator_follows_go_semantics():
    """What Go's text/template prints for these (trim markers eat newlines; := scopes; = assigns outward)."""
    msgs = [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}]
    t = "{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}[{{ $i }}{{ .Role }}" \
        "{{ if $last }}!{{ end }}]\n{{- end }}"
    assert go_render(t, {"Messages": msgs}) == "[0user][1assistant!]"
    assert go_render("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}", {}) == "2"
    assert go_render('{{ if eq .A "x" }}1{{ else if .B }}2{{ else }}3{{ end }}', {"A": "y", "B": ""}) == "3"
    assert go_render("a  \n {{- .A -}} \n b", {"A": "|"}) == "a|b"
    assert go_render('{{ and .A .B }}/{{ or .A .B }}/{{ not .A }}', {"A": "", "B": "z"}) == "/z/true"


def test_the_table_reproduces_real_chat_templates(llama_tools, embedded_tok):
    """For each family, llama.cpp's copy of a real model's chat template: the family is found, and the
    Modelfile's TEMPLATE rendered as Ollama does gives the same text as apply_chat_template on a two-turn
    conversation (with and without a system prompt); the stop tokens end its turns."""
    for name, family in {"": "chatml", **UPSTREAM}.items():
        template = (llama_tools.templates / f"{name}.jinja").read_text() if name else None
        m, why = match_format(embedded_tok, template)
        assert m is not None and m.format.name == family, (name, why)
        go = go_template(m)
        for conversation in (PROBE, TWO_TURNS):
            try:
                want = embedded_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                                        **({"chat_template": template} if template else {}))
            except Exception:
                assert m.system_refused and conversation is TWO_TURNS, name  # Gemma 2 refuses a system turn
                continue
            want = want[len(m.bos):] if m.bos else want
            got = ollama_render(go, conversation, m.default_system or None)
            assert got == want, (name, got, want)
            stop = m.piece(m.format.stops[0])
            assert stop and f"Paris.{stop}" in want, (name, stop)
    assert "You are Qwen" in match_format(embedded_tok, (llama_tools.templates / "Qwen-Qwen2.5-7B-Instruct.jinja")
                                          .read_text())[0].default_system
    unknown, why = match_format(embedded_tok, (llama_tools.templates / "Qwen3.5-4B.jinja").read_text())
    assert unknown is None and "not ChatML" in why


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

func main() {
	var cases []struct {
		Template string
		Data     map[string]any
	}
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	var out []string
	for _, c := range cases {
		t := template.Must(template.New("t").Parse(c.Template))
		var b strings.Builder
		if err := t.Execute(&b, c.Data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def test_go_itself_renders_the_templates_as_the_tests_do(llama_tools, embedded_tok, tmp_path):
    """Where Go is installed, its own text/template (what Ollama runs) renders every family's TEMPLATE
    exactly as tests/gotemplate.py does, on the conversations the tests use."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (Debian: apt-get install golang-go)")
    cases = []
    for name in ["", *UPSTREAM]:
        template = (llama_tools.templates / f"{name}.jinja").read_text() if name else None
        m, _ = match_format(embedded_tok, template)
        for conversation in (PROBE, TWO_TURNS, PROBE[:1]):
            messages = ([{"role": "system", "content": m.default_system}] if m.default_system and conversation
                        is not TWO_TURNS else []) + conversation
            data = {"System": "\n\n".join(x["content"] for x in messages if x["role"] == "system"),
                    "Messages": [{"Role": x["role"], "Content": x["content"]} for x in messages]}
            cases.append({"Template": go_template(m), "Data": data})
    (tmp_path / "main.go").write_text(GO_RENDER)
    env = dict(os.environ, GOCACHE=str(tmp_path / "cache"), GOPATH=str(tmp_path / "gopath"), GOFLAGS="-mod=mod",
               GO111MODULE="off")
    done = subprocess.run([go, "run", str(tmp_path / "main.go")], input=json.dumps(cases), capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [go_render(c["Template"], c["Data"]) for c in cases]


def test_a_model_of_no_known_family_gets_no_template_and_a_warning(llama_tools, embedded_tok):
    from qlora_studio.chat_formats import modelfile

    tok = copy.deepcopy(embedded_tok)
    tok.chat_template = (llama_tools.templates / "Qwen3.5-4B.jinja").read_text()  # a thinking template
    text, info = modelfile("m-q8_0.gguf", tok, None, title="m")
    assert modelfile_parts(text)["TEMPLATE"] is None and "no TEMPLATE" in text
    assert info["format"] is None and "Ollama will guess" in info["warnings"][0]
    assert modelfile_parts(text)["stop"] == ["<|im_end|>"] and modelfile_parts(text)["FROM"] == "./m-q8_0.gguf"


def test_a_converter_failure_is_its_own_message_not_a_traceback(llama_tools, tmp_path):
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"], "model_type": "nosuch"}))
    with pytest.raises(llamacpp.ToolError, match="convert_hf_to_gguf.py failed: .*NoSuchModelForCausalLM") as e:
        llamacpp.run_converter(llama_tools.tools.convert_hf, [str(bad), "--outfile", str(tmp_path / "x.gguf")])
    assert "Traceback" not in str(e.value)
    assert "pip install sentencepiece" in llamacpp._missing_module_hint("ModuleNotFoundError: No module named "
                                                                        "'sentencepiece'")


def test_adapters_llama_cpp_cannot_apply_are_named():
    assert "DoRA" in adapter_gguf_problem({"use_dora": True})
    assert "rsLoRA" in adapter_gguf_problem({"use_rslora": True})
    assert "embed_tokens" in adapter_gguf_problem({"modules_to_save": ["embed_tokens"]})
    assert adapter_gguf_problem({"r": 8, "lora_alpha": 16, "use_dora": False, "modules_to_save": None}) is None


# ------------------------------------------------------------------ exports of real runs


@pytest.fixture(scope="module")
def tiny_qwen(embedded_path, llama_tools, tmp_path_factory) -> Path:
    """A 2-layer Llama-shaped model with random weights, the embedded model's (real) tokenizer and Qwen 2.5's
    chat template (a default system prompt of its own). Not Qwen2-shaped: transformers 5 loads a qwen2
    folder's tokenizer as Qwen2Tokenizer, whose pre-tokenizer then differs from the vocabulary's, and
    llama.cpp's converter rightly refuses a tokenizer it cannot reproduce."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_path)
    tok.chat_template = (llama_tools.templates / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-qwen-template")
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen_run(session_home, tiny_qwen, tmp_path_factory):
    from conftest import write_sql_like_data

    data = write_sql_like_data(tmp_path_factory.mktemp("qwen-data") / "toy.jsonl")
    run = prepare_run(TrainConfig(model=str(tiny_qwen), data=str(data), max_steps=8, batch_size=8, learning_rate=3e-3,
                                  max_seq_len=64, eval_fraction=0, quant="nf4", lora_dropout=0.0, save_steps=1000,
                                  name="tiny-qwen"))
    assert run_training(run)["state"] == "completed"
    return run


def test_tiny_model_exports_ollama_f16_with_an_exact_round_trip(qwen_run, tiny_qwen):
    from transformers import AutoTokenizer

    result = export_run(qwen_run, "ollama", "f16")
    v = result.verified
    assert result.ok, v["summary"]
    assert v["gguf"]["architecture"] == "llama" and v["gguf"]["file_type"] == "MOSTLY_F16"
    gen = next(c for c in v["checks"] if c["name"] == "generation")
    assert gen["identical"] == 3 and gen["agreement"] == 1.0  # 16-bit: the merged model's continuations exactly
    assert json.loads((result.folder / "verify.json").read_text())["ok"] is True
    parts = modelfile_parts((result.folder / "Modelfile").read_text())
    assert parts["FROM"] == "./tiny-qwen-f16.gguf" and (result.folder / "tiny-qwen-f16.gguf").is_file()
    assert parts["SYSTEM"] == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert parts["stop"] == ["<|im_end|>"]
    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    for conversation in (PROBE, TWO_TURNS):  # what Ollama sends the model == what transformers would
        assert ollama_render(parts["TEMPLATE"], conversation, parts["SYSTEM"]) == tok.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True)
    assert result.ollama_create == f"ollama create tiny-qwen -f {result.folder / 'Modelfile'}"


def test_tiny_model_merged_and_adapter_exports(qwen_run):
    merged = export_run(qwen_run, "merged")
    assert merged.ok, merged.verified["summary"]
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
            "verify.json"} <= set(merged.files) and "studio_merged.json" not in merged.files
    assert "quantization_config" not in json.loads((merged.folder / "config.json").read_text())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "qlora_studio.cli", "export", str(qwen_run.path), "--format", "adapter",
                          "--quant", "f16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("verified: all checks passed") and Path(lines[-1]) == qwen_run.path / "exports" / "adapter-f16"
    adapter = SimpleNamespace(folder=Path(lines[-1]), files=sorted(str(p.relative_to(lines[-1])) for p in
                                                                   Path(lines[-1]).rglob("*") if p.is_file()),
                              verified=json.loads((Path(lines[-1]) / "verify.json").read_text()))
    assert "adapter/adapter_model.safetensors" in adapter.files and "tiny-qwen-lora-f16.gguf" in adapter.files
    values = next(c for c in adapter.verified["checks"] if c["name"] == "values")
    assert values["ok"] and "within" in values["detail"]
    card = (adapter.folder / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "peft"


def test_q4_k_m_and_llama_cpp_itself_where_it_is_installed(qwen_run):
    """With llama-cpp-python (the llama_cpp extra): q4_k_m by llama.cpp's quantizer, and llama.cpp's own
    tokenizer and greedy continuation in the verification."""
    if not llamacpp.runtime_available():
        pytest.skip("llama-cpp-python is not installed (pip install 'qlora-studio[llama_cpp]')")
    result = export_run(qwen_run, "gguf", "q4_k_m")
    checks = {c["name"]: c for c in result.verified["checks"]}
    assert result.verified["gguf"]["file_type"] == "MOSTLY_Q4_K_M" and result.verified["llama_cpp"]
    assert checks["llama.cpp tokenizer"]["ok"], checks["llama.cpp tokenizer"]["detail"]
    assert "llama.cpp generation" in checks and "agreement" in checks["generation"]
    f16 = export_run(qwen_run, "gguf", "f16")
    assert f16.ok, f16.verified["summary"]  # 16-bit: llama.cpp continues every prompt as the merged model does


def test_a_dora_adapter_is_exported_without_a_lora_gguf_and_says_why(qwen_run, tmp_path):
    copy = RunFolder(shutil.copytree(qwen_run.path, tmp_path / "dora-run", ignore=shutil.ignore_patterns("exports")))
    cfg = json.loads((copy.adapter / "adapter_config.json").read_text())
    (copy.adapter / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    result = export_run(copy, "adapter", "f16")
    assert not any(f.endswith(".gguf") for f in result.files)
    assert any("DoRA" in w for w in result.warnings) and "DoRA" in result.verified["lora_gguf_refused"]


def test_refusals_name_the_field_and_the_way_out(qwen_run, tmp_path):
    with pytest.raises(ExportError, match="--quant: a LoRA GGUF"):
        export_run(qwen_run, "adapter", "q4_k_m")
    mine = tmp_path / "my-files"  # an export replaces its folder whole: never a folder of something else
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="--output: .*my-files exists and is not an export folder"):
        export_run(qwen_run, "gguf", "f16", output=mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    if not llamacpp.runtime_available():
        with pytest.raises(ExportError, match="quantizer") as e:
            export_run(qwen_run, "ollama", "q4_k_m")
        assert "--quantize q4_K_M" in e.value.user_text()
    quantized = tmp_path / "q"  # a base that carries a quantization_config: never exported from
    shutil.copytree(Path(qwen_run.plan()["model"]["path"]), quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps(dict(cfg, quantization_config={"quant_method": "bitsandbytes"})))
    copy = RunFolder(shutil.copytree(qwen_run.path, tmp_path / "qrun", ignore=shutil.ignore_patterns("exports")))
    copy.update_plan(model=dict(copy.plan()["model"], path=str(quantized)))
    with pytest.raises(ExportError, match=r"config.json: quantization_config: the base model is quantized"):
        export_run(copy, "gguf", "f16")


def test_a_full_disk_is_refused_before_writing(qwen_run, tmp_path):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        from qlora_studio.diskspace import DiskFull

        with pytest.raises(DiskFull, match=r"this export needs about [\d,]+ MB free .*GGUF") as e:
            export_run(qwen_run, "gguf", "f16", output=disk / "out")
        assert "--output" in e.value.user_text() and not any(disk.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_embedded_run_exports_to_ollama_from_the_command_line(session_home, embedded_path, llama_tools,
                                                              tmp_path_factory, record_property):
    """The default export (ollama, q8_0) of a run on the embedded model, as a user runs it."""
    from conftest import write_sql_like_data
    from transformers import AutoTokenizer

    data = write_sql_like_data(tmp_path_factory.mktemp("emb-data") / "toy.jsonl")
    run = prepare_run(TrainConfig(model="embedded", data=str(data), max_steps=2, batch_size=2, learning_rate=1e-3,
                                  max_seq_len=64, eval_fraction=0, quant="none", lora_dropout=0.0, save_steps=1000,
                                  name="emb-export"))
    assert run_training(run)["state"] == "completed"
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "qlora_studio.cli", "export", str(run.path), "--json"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    folder = Path(doc["folder"])
    assert folder == run.path / "exports" / "ollama-q8_0"
    assert set(doc["files"]) == {"Modelfile", "emb-export-q8_0.gguf", "README.md", "verify.json", "export.log"}
    v = doc["verified"]
    assert v["ok"], v["summary"]
    gen = next(c for c in v["checks"] if c["name"] == "generation")
    assert gen["agreement"] >= 0.9 and v["gguf"]["file_type"] == "MOSTLY_Q8_0" and v["gguf"]["eos_id"] == 2
    assert "[  0%]" in out.stderr or "[ " in out.stderr  # progress on stderr
    parts = modelfile_parts((folder / "Modelfile").read_text())
    tok = AutoTokenizer.from_pretrained(embedded_path)
    for conversation in (PROBE, TWO_TURNS):
        assert ollama_render(parts["TEMPLATE"], conversation, parts["SYSTEM"]) == tok.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True)
    assert parts["stop"] == ["<|im_end|>"]
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["license"] == "apache-2.0"
    assert run.config()["data_sha256"] in card and "rows: 64" in card and "ollama create emb-export" in card
    sizes = {f: (folder / f).stat().st_size for f in doc["files"]}
    record_property("export_s", round(seconds, 1))
    record_property("gguf_mb", round(sizes["emb-export-q8_0.gguf"] / 2**20, 1))
    print(f"\nembedded ollama/q8_0 export: {seconds:.0f} s, GGUF {sizes['emb-export-q8_0.gguf'] / 2**20:.1f} MB, "
          f"{gen['detail']}")
