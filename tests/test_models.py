"""Where models come from: embedded GGUF, a GGUF by path, folders, Hub ids (offline / unreachable)."""

import os
import time

import pytest

from qlora_studio.models import ModelError, embedded_gguf_path, import_gguf, resolve_model


def test_embedded_model_is_a_converted_safetensors_folder(studio_home, embedded_path):
    assert (embedded_path / "config.json").is_file() and (embedded_path / "model.safetensors").is_file()
    assert (embedded_path / "tokenizer.json").is_file() and (embedded_path / "chat_template.jinja").is_file()
    src = resolve_model("embedded")
    assert src.kind == "embedded" and src.path.resolve() == embedded_path.resolve()


def test_a_gguf_file_by_path_is_imported_once_and_reused(studio_home, embedded_path):
    src = resolve_model(str(embedded_gguf_path()))
    assert src.kind == "gguf" and src.path.resolve() == embedded_path.resolve()  # same file, same cache entry
    t = time.time()
    assert import_gguf(embedded_gguf_path()).resolve() == embedded_path.resolve()
    assert time.time() - t < 5  # cached: no second conversion


def test_bad_local_models_get_clear_errors(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve_model(str(fake))
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model(str(tmp_path / "folder"))
    with pytest.raises(ModelError, match="not a model folder, GGUF file or Hub id"):
        resolve_model("no-such-thing")


def test_hub_id_offline_or_unreachable_fails_fast_with_a_reason(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(ModelError, match="not in the local cache and the Hub cannot be reached"):
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct")
    assert time.time() - t < 10


def test_hub_id_with_the_hub_unreachable_fails_fast(tmp_path):
    import subprocess
    import sys

    # A fresh process, so huggingface_hub reads the endpoint; port 9 on loopback refuses connections.
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    t = time.time()
    out = subprocess.run([sys.executable, "-c", "from qlora_studio.models import resolve_model, ModelError\n"
                          "try:\n    resolve_model('Qwen/Qwen2.5-0.5B-Instruct')\nexcept ModelError as e:\n    print('ERR', e)"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("ERR Qwen/Qwen2.5-0.5B-Instruct:"), out.stdout + out.stderr
    assert time.time() - t < 60
