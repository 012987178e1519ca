"""benchmarks/gpu_check.py on the CPU: the dry run, the one-line exit without CUDA, the report's figures
(from hand-checked test input), and the time budget that skips what no longer fits."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check_plan as gplan  # noqa: E402
import gpu_check_report as rep  # noqa: E402

GiB = 2**30


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), *args], capture_output=True, text=True,
                          timeout=180, cwd=ROOT)


# ------------------------------------------------------------------ the script


def test_dry_run_prints_every_step_and_each_configuration_with_its_estimate():
    out = _run("--dry-run")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "budget 480 s" in text and "total estimate" in text
    heads = re.findall(r"^step (\d) (\w+)", text, flags=re.M)
    assert heads == [(str(i), key) for i, key in enumerate(gplan.STEPS, 1)]
    vram = text.split("step 1 vram", 1)[1].split("step 2 throughput", 1)[0]
    configs = re.findall(r"^\s+\d+\. (.+)  est ([\d.]+) GiB .*~(\d+) s$", vram, flags=re.M)
    assert len(configs) >= 12
    labels = " | ".join(c[0] for c in configs)
    for needed in ("nf4", "fp4", " none ", "no-ckpt", " ckpt ", "fp16", "Qwen2.5-0.5B", "Llama-3.1-8B", "Qwen2.5-14B",
                   "x512", "x4096"):
        assert needed in labels, needed
    assert all(float(gib) > 0 and int(s) > 0 for _, gib, s in configs)
    for i, key in enumerate(("throughput", "oom", "fp16", "kernels"), 2):  # each lists at least one configuration
        block = text.split(f"step {i} {key}", 1)[1]
        assert re.search(r"^\s+1\. .+~\d+ s$", block, flags=re.M), key


def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would really run")
    out = _run("--out", str(tmp_path / "report"), "--budget-s", "30")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and "--dry-run" in lines[0]
    assert out.stdout == "" and not (tmp_path / "report").exists()


def test_unknown_step_is_refused():
    out = _run("--dry-run", "--steps", "vram,warp-drive")
    assert out.returncode == 2 and "warp-drive" in out.stderr


# ------------------------------------------------------------------ the report

# TEST INPUT, not measurements: made-up results in the shape the GPU steps record, with round numbers
# so that every expected figure below can be checked by hand.
FAKE_VRAM_ROWS = [
    # estimate (allocator view) 10 GiB vs reserved 8 -> +25%; vs allocated 9 -> +11.1%; whole 10.5 vs NVML 10 -> +5%
    {"label": "A 0.5B nf4", "estimate_allocator_view": 10 * GiB, "estimate_total": int(10.5 * GiB),
     "max_reserved": 8 * GiB, "max_allocated": 9 * GiB, "nvml_used": 10 * GiB, "seconds": 9.0, "estimate_s": 11},
    # 9 vs 10 -> -10% (exactly 10% under: not "more than 10%"); no NVML figure
    {"label": "B 3B fp4", "estimate_allocator_view": 9 * GiB, "estimate_total": int(9.5 * GiB),
     "max_reserved": 10 * GiB, "max_allocated": 9 * GiB, "nvml_used": None, "seconds": 12.0, "estimate_s": 13},
    # 6 vs 8 -> -25%: the worst under-estimate; whole 6.5 vs NVML 8 -> -18.75%
    {"label": "C 8B nf4 b4x2048", "estimate_allocator_view": 6 * GiB, "estimate_total": int(6.5 * GiB),
     "max_reserved": 8 * GiB, "max_allocated": 6 * GiB, "nvml_used": 8 * GiB, "seconds": 30.0, "estimate_s": 38},
    # 10.5 vs 10 -> +5% (reserved and allocated); whole 11 vs NVML 11 -> 0
    {"label": "D 14B nf4", "estimate_allocator_view": int(10.5 * GiB), "estimate_total": 11 * GiB,
     "max_reserved": 10 * GiB, "max_allocated": 10 * GiB, "nvml_used": 11 * GiB, "seconds": 50.0, "estimate_s": 53},
    {"label": "E oom", "estimate_allocator_view": 1 * GiB, "estimate_total": 2 * GiB, "oom": True},  # left out
    {"label": "F skipped", "estimate_allocator_view": 1 * GiB, "estimate_total": 2 * GiB,
     "skipped": "needs about 36 s; 20 s of the 480 s budget left"},  # left out
]
FAKE_STEPS = {
    "vram": {"status": "ok", "seconds": 101.0, "estimate_s": 115, "cases": FAKE_VRAM_ROWS},
    "throughput": {"status": "ok", "seconds": 70.0, "estimate_s": 69, "model": "Llama-3.2-3B", "batch": 4, "seq": 512,
                   "steps": 24, "warmup": 2, "peak_tflops": 989.0, "peak_source": "table entry 'H200'",
                   "flops_per_token": rep.flops_per_token(3_000_000_000, 25_000_000),
                   "runs": {"reference": {"tokens_per_s": 2000.0}, "ours": {"tokens_per_s": 5000.0}}},
    "oom": {"status": "ok", "checks": {"run completed": True, "recovered from at least one out-of-memory": True,
                                       "memory_allocated back to baseline (after gc)": True,
                                       "each retry started with the memory of the first attempt": None},
            "facts": {"micro-batches": [[16, 8], [8, 4]]}},
    "fp16": {"status": "failed", "checks": {"run completed": True, "every loss finite": False}},
    "kernels": {"status": "ok", "variants": [{"name": "sdpa", "tokens_per_s": 4000.0},
                                             {"name": "eager", "tokens_per_s": 3000.0},
                                             {"name": "liger", "skipped": "liger_kernel is not installed"}]},
}


def test_report_figures_from_recorded_steps():
    s = rep.summarize(FAKE_STEPS)
    v = s["vram"]
    assert (v["configurations"], v["measured"], v["skipped"], v["oom"]) == (6, 4, 1, 1)
    r = v["vs_max_reserved"]  # errors +25%, -10%, -25%, +5%: |.| sorted .05 .10 .25 .25 -> median .175 (mean .1625)
    assert r["n"] == 4 and r["median_abs_error"] == pytest.approx(0.175)
    assert r["worst_under_estimate"] == pytest.approx(-0.25) and r["worst_under_label"] == "C 8B nf4 b4x2048"
    assert r["more_than_10pct_under"] == 1
    a = v["vs_max_allocated"]  # +1/9, 0, 0, +5%: sorted 0 0 .05 .111 -> median .025
    assert a["median_abs_error"] == pytest.approx(0.025) and a["worst_under_estimate"] is None
    assert a["lowest_error"] == pytest.approx(0.0)
    n = v["vs_nvml"]  # +5%, -18.75%, 0 (B has no NVML figure)
    assert n["n"] == 3 and n["median_abs_error"] == pytest.approx(0.05)
    assert n["worst_under_estimate"] == pytest.approx(-0.1875) and n["worst_under_label"] == "C 8B nf4 b4x2048"

    t = s["throughput"]  # 6N = 1.8e10 FLOPs/token; frozen base = 4 x 3e9 + 6 x 2.5e7 = 1.215e10
    assert t["ours"]["ratio"] == pytest.approx(2.5) and t["reference"]["ratio"] == pytest.approx(1.0)
    assert t["reference"]["mfu_6N"] == pytest.approx(2000 * 1.8e10 / 989e12)  # 3.64%
    assert t["ours"]["mfu_6N"] == pytest.approx(0.0910010, rel=1e-5)
    assert t["ours"]["mfu_frozen_base"] == pytest.approx(5000 * 1.215e10 / 989e12)
    assert s["oom"]["passed"] is True and s["fp16"]["passed"] is False
    assert [k["vs_sdpa"] for k in s["kernels"]] == [pytest.approx(1.0), pytest.approx(0.75), None]


def test_report_files_json_and_markdown(tmp_path):
    report = rep.build_report({"gpu": "NVIDIA H200 (test input)", "budget_s": 480, "versions": {"torch": "x"}},
                              {"steps": []}, FAKE_STEPS, finished=False, elapsed_s=250.04)
    json_path, md_path = rep.write_reports(tmp_path / "out", report)
    data = json.loads(json_path.read_text())
    assert data["finished"] is False and data["elapsed_s"] == 250.0
    assert data["summary"]["vram"]["vs_max_reserved"]["median_abs_error"] == pytest.approx(0.175)
    md = md_path.read_text()
    assert "NOT FINISHED" in md
    assert "median |error| 17.5% over 4; worst under-estimate -25.0% (C 8B nf4 b4x2048); 1 more than 10% under" in md
    assert "| C 8B nf4 b4x2048 | 6.50 | 6.00 | 8.00 | -25.0% | 6.00 | +0.0% | 8.00 | -18.8% | 30 (38) |" in md
    assert "| F skipped | 2.00 | 1.00 | skipped: needs about 36 s" in md
    assert "| ours | 5000.0 | 2.50x | 9.1% | 6.1% |" in md
    assert "no under-estimate (lowest error +0.0%)" in md  # vs max_memory_allocated
    assert "**FAILED**" in md and "- every loss finite: NO" in md  # fp16
    assert "- each retry started with the memory of the first attempt: -" in md
    assert "| eager | 3000.0 | 0.75 |" in md and "liger_kernel is not installed" in md
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_peak_table():
    assert rep.peak_tflops("NVIDIA H200")[0] == 989.0
    assert rep.peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert rep.peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert rep.peak_tflops("NVIDIA A10G")[0] == 70.0
    assert rep.peak_tflops("Tesla T4")[0] == 65.0
    assert rep.peak_tflops("NVIDIA H200", override=500)[0] == 500.0
    assert rep.peak_tflops("Some Future GPU") == (None, "no table entry for 'Some Future GPU': pass --peak-tflops")
    assert rep.mfu(1000.0, 6e9, None) is None


# ------------------------------------------------------------------ the budget


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_budget_check_keeps_time_for_later_steps():
    clock = Clock()
    b = gplan.Budget(100, clock)
    clock.t += 30  # 70 s left
    assert b.check(40, reserve_s=30) is None
    why = b.check(50, reserve_s=30)
    assert why == "needs about 50 s; 70 s of the 100 s budget left, 30 s of it kept for the later steps"
    assert b.check(70) is None and b.check(71) is not None


def test_steps_are_skipped_when_the_budget_is_too_small_and_an_error_does_not_stop_the_rest():
    clock, steps, saves, ran = Clock(), {}, [], []
    b = gplan.Budget(100, clock)
    save = lambda: saves.append(json.dumps(steps))  # noqa: E731

    def work(seconds, result=None, boom=False):
        def fn(rec):
            ran.append(seconds)
            clock.t += seconds
            if boom:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return result
        return fn

    gplan.run_step(steps, "a", work(30, {"checks": {"x": True}}), b, need_s=30, reserve_s=20, save=save)
    gplan.run_step(steps, "b", work(10, boom=True), b, need_s=10, reserve_s=20, save=save)
    gplan.run_step(steps, "c", work(50), b, need_s=45, reserve_s=20, save=save)  # 60 left - 20 kept < 45
    gplan.run_step(steps, "d", work(5, {"checks": {"finite": False, "n/a": None}}), b, need_s=5, reserve_s=0, save=save)
    assert ran == [30, 10, 5]
    assert steps["a"]["status"] == "ok" and steps["a"]["seconds"] == 30
    assert steps["b"]["status"] == "error" and "illegal memory access" in steps["b"]["error"]
    assert "RuntimeError" in steps["b"]["traceback"]
    assert steps["c"] == {"status": "skipped", "estimate_s": 45,
                          "reason": "needs about 45 s; 60 s of the 100 s budget left, 20 s of it kept for the later steps"}
    assert steps["d"]["status"] == "failed"
    assert len(saves) == 7  # before and after each step that ran, once for the skipped one
    assert json.loads(saves[-1])["d"]["status"] == "failed"


def test_configurations_run_one_by_one_within_the_budget():
    clock, done = Clock(), []
    b = gplan.Budget(40, clock)

    def run_one(seconds):
        clock.t += seconds
        if seconds == 7:
            raise torch_like_oom()
        return {"ran": True}

    gplan.run_items([10, 7, 50, 10, 30], b, 0.0, lambda s: s, run_one, lambda item, r: done.append((item, r)))
    assert [(i, "ran" in r, "skipped" in r, "error" in r) for i, r in done] == [
        (10, True, False, False), (7, False, False, True), (50, False, True, False), (10, True, False, False),
        (30, False, True, False)]
    assert done[1][1]["error"].startswith("MemoryError") and done[1][1]["seconds"] == 7
    assert done[4][1]["skipped"] == "needs about 30 s; 13 s of the 40 s budget left"


def torch_like_oom():
    return MemoryError("fake out of memory, test input")


def _args(*extra):
    import gpu_check

    return gpu_check.parse_args(["--dry-run", *extra])


def test_projection_cuts_step_1_first_and_keeps_the_required_steps():
    plan = gplan.build_plan(_args())
    by_key = {p["key"]: p for p in gplan.project(plan)}
    assert by_key["vram"]["of"] >= 12 and 0 < by_key["vram"]["runs"] < by_key["vram"]["of"]
    for key in ("throughput", "oom", "fp16"):
        assert by_key[key]["runs"] == by_key[key]["of"]
    assert plan["estimate_s"] > plan["budget_s"]

    roomy = gplan.build_plan(_args("--budget-s", "5000"))
    assert all(p["runs"] == p["of"] for p in gplan.project(roomy))

    tight = gplan.build_plan(_args("--budget-s", "55"))  # 30 s after startup: only the fp16 run fits
    runs = {p["key"]: p["runs"] for p in gplan.project(tight)}
    assert runs == {"vram": 0, "throughput": 0, "oom": 0, "fp16": 1, "kernels": 0}


def test_models_written_by_step_1_are_not_counted_again():
    a = _args()
    alone = gplan.build_plan(a, ["throughput"])["steps"][0]["estimate_s"]
    after_vram = [s for s in gplan.build_plan(a)["steps"] if s["key"] == "throughput"][0]["estimate_s"]
    assert alone - after_vram == pytest.approx(gplan.write_s(a.tp_model), abs=0.2)


def test_the_fp16_run_is_an_ordinary_plan_with_fp16_compute():
    import gpu_check
    from qlora_studio.config import TrainConfig
    from qlora_studio.plan import Machine, plan_for

    cfg = TrainConfig(data="x.jsonl", device="cpu")
    machine = Machine("cpu", ram_available_bytes=8 * 2**30)
    forced = gpu_check.fp16_plan(cfg, machine)
    assert forced.precision == "fp16" and "forced" in forced.reasons["precision"]
    assert plan_for(cfg, machine).precision == "fp32"  # without the override: this CPU has no native bf16


def test_vram_cases_cover_fp16_compute_and_14b():
    import vram_accuracy as va

    fp16 = [c for c in va.CASES if c.compute_dtype == "fp16"]
    assert fp16 and all(c.label.endswith(" fp16") for c in fp16)
    assert va.estimate_case(fp16[0], "bf16").settings["compute_dtype"] == "fp16"
    assert any(c.model == "Qwen2.5-14B" for c in va.CASES)
