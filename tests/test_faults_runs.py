"""Faults in run folders and at the command line's edges, none of which may lose or hide a run: a
damaged run file (status, config, summary, metric lines), a reader that closes the output early, metrics
without a "type" field, resuming a run whose status cannot be read. No model is trained: the run folders
are written by hand, and `RunManager._launch` is replaced so that nothing could train by accident."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """A fresh studio home (no model needed: nothing here loads one)."""
    h = tmp_path / "home"
    (h / "runs").mkdir(parents=True)
    monkeypatch.setenv("QLORA_STUDIO_HOME", str(h))
    return h


@pytest.fixture()
def launches(monkeypatch) -> list:
    """The runs the manager would have started training (none train)."""
    from qlora_studio.manager import RunManager

    started = []

    def launch(self, run, resume, echo, locks=()):
        started.append((run.name, resume))
        for lock in locks:  # what the training thread does when it ends
            lock.release()

    monkeypatch.setattr(RunManager, "_launch", launch)
    return started


def _write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))


def make_run(home: Path, name: str, started_at: float = 1000.0, *, state: str = "completed", checkpoint: bool = False,
             adapter: bool = False, summary=True, metrics: str | None = None, **files) -> Path:
    """A run folder as training leaves it; ``files`` ("status_json"=...) replace a file's content."""
    run = home / "runs" / name
    _write(run / "config.json", {"model": "tiny", "data": f"/data/{name}.jsonl", "learning_rate": 2e-4})
    _write(run / "status.json", {"state": state, "started_at": started_at, "pid": 123, "host": "elsewhere"})
    if summary:
        _write(run / "summary.json", {"final_loss": 0.5, "eval": {"eval_loss": 0.75}, "train_runtime_s": 12.0})
    if metrics is not None:
        _write(run / "metrics.jsonl", metrics)
    if checkpoint:
        _write(run / "checkpoints" / "checkpoint-4" / "trainer_state.json", {"global_step": 4})
    if adapter:
        _write(run / "adapter" / "adapter_config.json", {"r": 8})
    for key, content in files.items():
        _write(run / key.replace("_", "."), content)
    return run


HEALTHY_METRICS = "".join(json.dumps({"type": "train", "step": s, "loss": 2.0 - 0.1 * s, "lr": 2e-4, "grad_norm": 1.0}) + "\n"
                          for s in range(1, 6))

# (file, content, what the error says after "damaged: <file>: ")
DAMAGE = [
    ("status.json", b"[1]", "holds a list"),
    ("status.json", b"\xff\xfe\x00\x9c garbage \xc3\x28", "not UTF-8"),
    ("status.json", b"", "empty"),
    ("status.json", b'{"state": "completed", "pid": "abc"}', "pid must be a whole number"),
    ("status.json", b'{"state": "running", "pid": 1.5}', "pid must be a whole number"),
    ("status.json", b'{"state": "running", "pid": [1]}', "pid must be a whole number"),
    ("status.json", b'{"state": "exploded"}', "state must be one of"),
    ("config.json", b"[1]", "holds a list"),
    ("config.json", b'{"model": "tiny", "data": ', "not valid JSON"),
    ("summary.json", b'{"final_loss": "x"}', "final_loss must be a number"),
    ("summary.json", b"[]", "holds a list"),
    ("summary.json", b'{"eval": {"eval_loss": "x"}}', "eval.eval_loss must be a number"),
]


# ------------------------------------------------------------------ item 5: one damaged run hides no other


@pytest.mark.parametrize("file,content,what", DAMAGE, ids=[f"{f}-{w}" for f, _, w in DAMAGE])
def test_a_damaged_run_file_is_listed_as_damaged_and_the_other_runs_as_before(home, capsys, file, content, what):
    from qlora_studio.cli import main
    from qlora_studio.runs import list_runs

    make_run(home, "good-old", 1000.0)
    make_run(home, "good-new", 3000.0, state="stopped", checkpoint=True)
    bad = make_run(home, "bad", 2000.0)
    before = {r.name: asdict(r) for r in list_runs()}
    _write(bad / file, content)

    records = {r.name: r for r in list_runs()}
    assert {n: asdict(r) for n, r in records.items() if n != "bad"} == {n: r for n, r in before.items() if n != "bad"}
    assert records["bad"].state == "damaged"
    assert records["bad"].error.startswith(f"damaged: {file}: {what}"), records["bad"].error
    assert records["bad"].resumable is False

    assert main(["runs", "--json"]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert (listed["bad"]["state"], listed["good-new"]["state"], listed["good-old"]["state"]) == ("damaged", "stopped", "completed")
    assert main(["runs"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "damaged" in lines["bad"] and f"damaged: {file}" in lines["bad"] and "(resumable)" in lines["good-new"]


def test_metric_lines_that_are_not_json_objects_are_skipped(home, capsys):
    from qlora_studio.runs import read_metrics_from

    path = home / "metrics.jsonl"
    good = [{"type": "train", "step": 1, "loss": 2.0}, {"type": "eval", "step": 1, "eval_loss": 2.5}]
    path.write_bytes(json.dumps(good[0]).encode() + b"\n" + b"\xff\xfe\x00\x01\x9c\n" + b"\xc3\x28 not utf-8\n"
                     + b"[1]\n" + b'"x"\n' + b"42\n" + b"NaN\n" + b"{broken\n" + json.dumps(good[1]).encode() + b"\n"
                     + b'{"type": "train", "step": 2')  # a last line still being written
    records, offset = read_metrics_from(path)
    assert records == good
    assert offset == path.stat().st_size - len(b'{"type": "train", "step": 2')
    # and the whole run still reads: diagnose and the listing
    from qlora_studio.cli import main

    run = make_run(home, "garbled", metrics=path.read_bytes())
    assert main(["diagnose", str(run)]) == 0
    assert main(["runs"]) == 0 and "garbled" in capsys.readouterr().out


@pytest.mark.parametrize("file,content", [("config.json", b"[1]"), ("status.json", b'{"state": "failed", "pid": "abc"}'),
                                          ("status.json", b"\x00\x01\x02"), ("summary.json", b'{"final_loss": "x"}')])
def test_diagnose_names_the_damaged_file(home, capsys, file, content):
    from qlora_studio.cli import main

    run = make_run(home, "bad", metrics=HEALTHY_METRICS)
    _write(run / file, content)
    for target in (str(run), "bad", str(run / "metrics.jsonl")):
        assert main(["diagnose", target]) == 2
        err = capsys.readouterr().err
        assert f"damaged: {file}:" in err and str(run / file) in err and "Traceback" not in err


@pytest.mark.parametrize("file,content", [("config.json", b"[1]"), ("config.json", b"\xff\xfe")])
def test_resume_refuses_a_run_whose_config_is_damaged_before_starting_anything(home, launches, capsys, file, content):
    from qlora_studio.cli import main

    run = make_run(home, "bad", state="stopped", checkpoint=True)
    _write(run / file, content)
    assert main(["resume", "bad"]) == 2
    err = capsys.readouterr().err
    assert f"damaged: {file}:" in err and "Traceback" not in err
    assert launches == [] and json.loads((run / "status.json").read_text())["state"] == "stopped"


# ------------------------------------------------------------------ item 9: resuming a run whose status is damaged


@pytest.mark.parametrize("finished", ["adapter", "summary"])
@pytest.mark.parametrize("status", [b"[1]", b"\xff\xfe\x00\x9c", b'{"state": "running", "pid": "abc"}'])
def test_a_finished_run_with_a_damaged_status_counts_as_completed_and_is_not_resumed(home, launches, capsys, finished, status):
    from qlora_studio.cli import main
    from qlora_studio.manager import RunBusy, get_manager

    run = make_run(home, "done", checkpoint=True, adapter=finished == "adapter", summary=finished == "summary",
                   status_json=status)
    with pytest.raises(RunBusy, match="damaged: status.json: .*counts as completed"):
        get_manager().resume("done")
    assert main(["resume", str(run)]) == 2
    assert "counts as completed" in capsys.readouterr().err
    assert launches == [] and (run / "status.json").read_bytes() == status  # nothing touched
    assert not (run / "status.json.damaged").exists()


def test_an_unfinished_run_with_a_damaged_status_resumes_and_keeps_the_damaged_file(home, launches):
    from qlora_studio.manager import get_manager
    from qlora_studio.runs import RunFolder, list_runs

    run = make_run(home, "half", checkpoint=True, summary=False, status_json=b"\x00garbage")
    [record] = list_runs()
    assert (record.state, record.resumable) == ("damaged", True)
    get_manager().resume("half")
    assert launches == [("half", True)]
    assert (run / "status.json.damaged").read_bytes() == b"\x00garbage"
    status = RunFolder(run).status({os.getpid()})
    assert (status["state"], status["phase"]) == ("running", "resuming")


def test_an_unfinished_run_with_a_damaged_status_and_no_checkpoint_is_refused(home, launches):
    from qlora_studio.manager import RunBusy, get_manager

    make_run(home, "early", summary=False, status_json=b"[1]")
    with pytest.raises(RunBusy, match=r"no checkpoint to resume from \(damaged: status.json: holds a list"):
        get_manager().resume("early")
    assert launches == []


# ------------------------------------------------------------------ the Runs tab


def test_the_runs_tab_shows_a_damaged_run_and_deletes_it(home):
    from qlora_studio.ui import runs as tab
    from qlora_studio.ui.common import latest_run_path

    make_run(home, "good", 1000.0, metrics=HEALTHY_METRICS)
    make_run(home, "bad-status", 2000.0, status_json=b"[1]")
    make_run(home, "bad-config", 3000.0, metrics=HEALTHY_METRICS, config_json=b"\xff\x00")
    make_run(home, "bad-summary", 4000.0, summary_json=b'{"final_loss": "x"}')
    assert latest_run_path() is not None  # the Train tab's default run, whichever is newest

    df, names = tab.runs_table()
    states = dict(zip(df["run"], df["state"]))
    assert sorted(names) == ["bad-config", "bad-status", "bad-summary", "good"]
    assert states["good"] == "completed"
    assert states["bad-status"].startswith("damaged: status.json: holds a list")
    assert states["bad-config"].startswith("damaged: config.json: not UTF-8")
    assert states["bad-summary"].startswith("damaged: summary.json: final_loss must be a number")
    _, choices = tab.refresh(["bad-status", "gone"])
    assert choices.value == ["bad-status"]

    fig, diff = tab.overlay(["good", "bad-config"])
    assert len(fig.data) == 2  # both runs' loss curves
    assert "config.json" in list(diff.value["data"][i][0] for i in range(len(diff.value["data"])))

    tab.ask_delete(["bad-status", "bad-config", "bad-summary"])
    _, _, df, choices = tab.do_delete(["bad-status", "bad-config", "bad-summary"])
    assert list(df["run"]) == ["good"] and [c[0] for c in choices.choices] == ["good"]
    assert sorted(p.name for p in (home / "runs").iterdir()) == ["good"]


# ------------------------------------------------------------------ item 7: output piped into `head`, metrics without "type"


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(home):
    for i in range(600):  # about 600 KB of listing: far more than a pipe holds
        make_run(home, f"run-{i:04d}", 1000.0 + i)
        (home / "runs" / f"run-{i:04d}" / "config.json").write_text(json.dumps({"model": "tiny", "data": "/d/" + "x" * 900}))
    env = dict(os.environ, QLORA_STUDIO_HOME=str(home),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "qlora_studio.cli", "runs", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()  # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=300)
    assert first.strip() == b"["
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert code in (0, 141)


@pytest.mark.parametrize("bad", ["NaN", "Infinity", '"nan"'])
def test_diagnose_reads_metric_lines_without_a_type(home, capsys, bad):
    from qlora_studio.cli import main

    path = home / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.1, "learning_rate": 0.0002, "grad_norm": 1.0}\n'
                    '{"step": 2, "loss": 2.0, "learning_rate": 0.0002, "grad_norm": 1.1}\n'
                    '{"step": 2, "eval_loss": 2.2}\n'
                    f'{{"step": 3, "loss": {bad}, "learning_rate": 0.0002, "grad_norm": {bad}}}\n')
    assert main(["diagnose", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[error] nonfinite at step 3" in out and "nothing looks wrong" not in out
    assert main(["diagnose", str(path), "--json"]) == 0
    [f] = json.loads(capsys.readouterr().out)["findings"]
    assert (f["kind"], f["step"], f["details"]["last_good_step"]) == ("nonfinite", 3, 1)


def test_diagnose_never_says_nothing_is_wrong_when_it_recognised_nothing(home, capsys):
    from qlora_studio.cli import main

    path = home / "other.jsonl"
    path.write_text('{"epoch": 1, "accuracy": 0.5}\n[1, 2]\nnot json at all\n')
    assert main(["diagnose", str(path)]) == 2
    captured = capsys.readouterr()
    assert f"no metric records recognised in {path} (expected lines with step and loss)" in captured.err
    assert "nothing looks wrong" not in captured.out + captured.err and "Traceback" not in captured.err
    run = make_run(home, "no-metrics")  # a completed run folder without metrics.jsonl
    assert main(["diagnose", str(run)]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err
