"""The command line as a user runs it: separate processes, exit codes, last line = run folder."""

import json
import os
import subprocess
import sys
from pathlib import Path


def cli(*args, home, timeout=600):
    env = dict(os.environ, QLORA_STUDIO_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "qlora_studio.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_train_prints_the_run_folder_last_and_runs_lists_it(studio_home, tiny_llama, toy_data):
    out = cli("train", "--model", str(tiny_llama), "--data", str(toy_data), "--max-steps", "3", "--batch-size", "4",
              "--max-seq-len", "64", "--eval-fraction", "0", "--output", "cli-run", home=studio_home)
    assert out.returncode == 0, out.stderr + out.stdout
    last = out.stdout.strip().splitlines()[-1]
    assert Path(last) == studio_home / "runs" / "cli-run"
    assert json.loads((Path(last) / "status.json").read_text())["state"] == "completed"
    listed = json.loads(cli("runs", "--json", home=studio_home).stdout)
    assert [(r["name"], r["state"]) for r in listed] == [("cli-run", "completed")]


def test_train_with_bad_settings_exits_2_with_a_message(studio_home, toy_data, tmp_path):
    out = cli("train", "--data", str(tmp_path / "missing.jsonl"), home=studio_home)
    assert out.returncode == 2 and "missing.jsonl: no such file" in out.stderr and "Traceback" not in out.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"data: {toy_data}\nrank: big\n")
    out = cli("train", "--config", str(cfg), home=studio_home)
    assert out.returncode == 2 and "bad.yaml:2 rank:" in out.stderr
    out = cli("train", "--data", str(toy_data), "--output", "../escape", home=studio_home)
    assert out.returncode == 2 and "not a valid run name" in out.stderr


def test_data_check_reports_and_exit_codes(studio_home, tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q2"}\n')
    out = cli("data", "check", str(good), "--json", "--model", "embedded", home=studio_home)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["format"] == "prompt_completion" and report["rows"] == 2 and report["usable"] == 1
    assert report["errors"] == [{"line": 2, "field": "completion", "message": "missing"}]
    assert report["truncated"] == 0
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nq,a\n")
    out = cli("data", "check", str(bad), "--json", home=studio_home)
    assert out.returncode == 2 and "cannot tell the format" in json.loads(out.stdout)["error"]
