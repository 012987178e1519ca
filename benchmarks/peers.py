"""Our trainer against TRL and LLaMA-Factory: one QLoRA recipe on the same CPU data, each run in a fresh process.

    python benchmarks/peers.py --setup                   # install the peers' venvs (again), print their versions
    python benchmarks/peers.py --out peers.json          # 64 alpaca rows: ours, trl, lf, lf-nopack, held-out losses
    python benchmarks/peers.py --examples 256 --repeats 2 --budget 120 --out peers.json
    python benchmarks/peers.py --examples 16 --max-steps 3 --warmup 1 --systems ours trl   # smoke run

Environments: each peer has ``~/.cache/qlora-studio/peers/<system>-<version>/``, a ``venv
--system-site-packages`` over this Python (and its venv, if it runs in one), installed on demand:
torch and bitsandbytes (the kernels) are ours, pinned by a constraints file; what the peer needs
besides shadows ours inside its venv.
``trl[peft]==1.16.0`` runs on our transformers/peft/datasets. ``llamafactory==0.9.5`` goes in ``--no-deps``
with its training requirements at the newest versions it allows (transformers 5.6.0, peft 0.18.1, trl
0.24.0, accelerate 1.11.0, datasets 4.0.0); its web UI, API and multimodal extras (gradio, torchvision,
av, modelscope, ...) are left out (pip lists them as conflicts), and torchaudio (imported by its data
module; PyPI's last, 2.11.1, is built against CUDA torch) loses its compiled extension: its documented
pure-Python fallback. Each venv's ``pip freeze --local`` and the key versions as it imports them go into the results.

The recipe, for all: the embedded SmolLM2-135M-Instruct, NF4 + double quant, LoRA r=16 alpha=32
dropout 0.05 on every linear layer, lr 2e-4 cosine, warm-up 5%, 1 epoch, batch 4, max length 512,
seed 42, AdamW (torch), no evaluation, no checkpoint, gradient checkpointing off. Ours as shipped
(every speed setting automatic: bf16 autocast on a CPU with native bf16, fp32 elsewhere,
`plan.precision_for`). ``--peer-dtype ours`` (default) gives the peers the compute dtype ours plans on
this machine: ``bf16`` there (TRL's documented QLoRA defaults, bf16 compute and autocast, its LoRA
weights cast back to fp32 as ours keeps them; LLaMA-Factory ``bf16: true`` on the checkpoint as
shipped), ``fp32`` elsewhere: TRL ``bf16=False``, ``dtype=float32``, compute dtype fp32, and its
LoRA weights, which it casts to bf16 for a 4-bit model (not a setting), cast back to fp32 before the
optimizer exists; LLaMA-Factory ``bf16: false`` (fp32 4-bit compute on a CPU), but it loads the
checkpoint's own dtype (bf16; no setting), so it gets the model folder with config.json saying
float32. ``--peer-dtype default`` leaves both as they ship (TRL: bf16 autocast, compute and LoRA;
LLaMA-Factory: ``bf16: false``, the checkpoint's bf16).
Batching: TRL ``packing=True`` (best-fit-decreasing rows of <= 512 tokens, padding-free: a batch's 4
rows flattened into one) on prompt/completion conversations (completion-only loss); LLaMA-Factory
``packing: true`` (greedy rows of 512 tokens, padded, examples attending across their boundaries,
examples over 511 tokens dropped) and ``lf-nopack`` (its default: padded to the batch's longest; a
long example loses prompt and answer in proportion), template ``smollm2``. A packed step of the peers
holds up to 4 x 512 tokens, so it holds several times more examples than ours or lf-nopack (4 a step)
and their epoch has that many times fewer optimizer steps (``ours-seq``: ours with ``batch_unit:
sequences``, the same step). The table's examples/step column says how many. Attention: each system's own CPU choice (ours SDPA per packed example, the peers SDPA).

Data: ``throughput.make_data(kind="alpaca")``, long-tailed rows, only the outputs trained. Every system
renders them with SmolLM2's chat template and its default system prompt (given to LLaMA-Factory per
row: its template's default ends with an extra "."), so all see the same tokens: the table's token
totals check it. Held-out: ``--heldout`` rows of another seed, scored alike for every system, here:
the base model in fp32 (not quantized) plus the saved adapter, mean loss per output token of the rows
as our data code renders and masks them (the template and masking every system trained with).

Measured: a callback injected into every Trainer (``transformers.Trainer.__init__`` patched in the
child process, `peers_child.py`) times from ``on_train_begin`` (model and data loading excluded) to
``on_train_end`` (epoch s), and the collator is wrapped to count each step's examples, trained tokens
and non-pad tokens (pad tails and attention-mask zeros left out; the Trainer's own ``num_input_tokens_seen`` is also shown,
but it counts LLaMA-Factory's packed padding and misses TRL's <|im_end|>, the pad id). Tokens/s leave
out the first ``--warmup`` optimizer steps. Equal wall time (``--budget``, default the shortest median
epoch): each slower system trains its one-epoch schedule again and stops at the first step end past
the budget (its learning rate not annealed); a system whose epoch fits keeps its one-epoch adapter.
``--repeats`` alternates the order (ours, trl, lf, lf-nopack, then reversed); before each run the
script waits up to ``--settle`` s for the 1-minute load to fall under 1.5 and warns if it did not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import site
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's qlora_studio, installed or not (as throughput.py)
from peers_child import RECIPE  # noqa: E402  (the recipe every system trains; the child process's code)
CACHE = Path(os.environ.get("QLORA_STUDIO_PEERS", Path.home() / ".cache" / "qlora-studio" / "peers"))
KEY_PACKAGES = ("qlora-studio", "trl", "llamafactory", "transformers", "peft", "datasets", "accelerate", "torch",
                "bitsandbytes", "tokenizers", "huggingface_hub")
LF_DEPS = ["transformers==5.6.0", "peft==0.18.1", "trl==0.24.0", "accelerate==1.11.0", "datasets==4.0.0",
           "tyro<0.9.0", "omegaconf", "fire", "einops", "sentencepiece", "tiktoken", "protobuf", "pydantic",
           "pyyaml", "scipy", "pandas", "torchaudio",  # torchaudio: imported by its data module
           "kernels==0.11.1"]  # ours (a dependency of newer transformers) is seen through the system site-packages,
# and kernels 0.19.1 refuses transformers 5.6's hub-kernel table at import ("Either a revision or a version must
# be specified"); 0.11.1 takes it (checked), so the venv gets that one
PEERS = {  # venv name: (version, pip install argument lists, run one after the other)
    "trl": ("1.16.0", [["trl[peft]==1.16.0"]]),
    "llamafactory": ("0.9.5", [["--no-deps", "llamafactory==0.9.5"], LF_DEPS]),
}
SYSTEMS = {  # name: (venv or None for ours, batching as configured)
    "ours": (None, "as shipped, every speed setting automatic (see settings)"),
    "ours-seq": (None, "batch_unit: sequences: 4 rows <= 512 tokens of whole examples, padding-free (the peers' step)"),
    "trl": ("trl", "packing=True: BFD rows <= 512 tokens, padding-free (batch rows flattened into one)"),
    "lf": ("llamafactory", "packing: true: greedy rows of 512 tokens, padded, examples attend across boundaries"),
    "lf-nopack": ("llamafactory", "default: examples padded to the batch's longest"),
}


# ------------------------------------------------------------------------------- environments


def venv_dir(peer: str) -> Path:
    return CACHE / f"{peer}-{PEERS[peer][0]}"


def venv_python(peer: str | None) -> str:
    return sys.executable if peer is None else str(venv_dir(peer) / "bin" / "python")


def ensure_venv(peer: str, force: bool = False) -> dict:
    """Create and fill the peer's venv unless a complete one with the same install lists is there."""
    folder, (version, installs) = venv_dir(peer), PEERS[peer]
    marker = folder / "peers-install.json"
    if not force and marker.is_file() and json.loads(marker.read_text()).get("installs") == installs:
        return json.loads(marker.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    start = time.time()
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(folder)], check=True)
    own = [d for d in site.getsitepackages() if not d.startswith(sys.base_prefix)]
    if own:  # this Python is a venv itself: its packages too (after the peer's own)
        purelib = subprocess.run([venv_python(peer), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        Path(purelib, "parent-env.pth").write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in own))
    constraints = folder / "constraints.txt"  # the compute kernels stay ours
    constraints.write_text("".join(f"{p}=={metadata.version(p)}\n" for p in ("torch", "bitsandbytes")))
    for args in installs:
        cmd = [venv_python(peer), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints), *args]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    # torchaudio (which LLaMA-Factory imports) ends at 2.11 on PyPI, its extension built against CUDA torch;
    # without the compiled files it imports as pure Python (its documented fallback), which is all LF needs
    for lib in folder.glob("lib/python*/site-packages/torchaudio/lib/*.so"):
        lib.unlink()
    info = {"peer": peer, "version": version, "installs": installs, "install_s": round(time.time() - start, 1),
            "size_mb": round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20, 1)}
    marker.write_text(json.dumps(info, indent=1))
    return info


def describe_env(peer: str | None) -> dict:
    """The key packages' versions as that environment imports them, and what the venv installed itself."""
    code = ("import json, importlib.metadata as m\nv = {}\nfor p in %r:\n    try: v[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\nprint(json.dumps(v))" % (KEY_PACKAGES,))
    out = subprocess.run([venv_python(peer), "-c", code], capture_output=True, text=True, check=True).stdout
    env = {"python": venv_python(peer), "versions": json.loads(out)}
    if peer is not None:
        freeze = subprocess.run([venv_python(peer), "-m", "pip", "freeze", "--local", "--disable-pip-version-check"],
                                capture_output=True, text=True).stdout
        env.update(venv=str(venv_dir(peer)), installed_in_venv=freeze.split(), **{
            k: v for k, v in json.loads((venv_dir(peer) / "peers-install.json").read_text()).items()
            if k in ("install_s", "size_mb")})
    return env


# ------------------------------------------------------------------------------------ the parent


def write_data(work: Path, a) -> dict:
    """The training rows (for ours and TRL), LLaMA-Factory's copy with the system prompt, the held-out rows."""
    sys.path.insert(0, str(HERE))
    from throughput import make_data

    from qlora_studio.data import default_system_prompt
    from qlora_studio.loading import load_tokenizer
    from qlora_studio.models import embedded_model_path

    shape = make_data(work / "train.jsonl", a.examples, max_words=RECIPE["max_len"], seed=0, kind="alpaca")
    held = make_data(work / "heldout.jsonl", a.heldout, max_words=RECIPE["max_len"], seed=1, kind="alpaca")
    system = default_system_prompt(load_tokenizer(embedded_model_path()))
    lf = work / "lf"
    lf.mkdir()
    rows = [dict(json.loads(line), system=system) for line in open(work / "train.jsonl", encoding="utf-8")]
    (lf / "train.json").write_text(json.dumps(rows))
    (lf / "dataset_info.json").write_text(json.dumps({"peers_train": {"file_name": "train.json", "columns": {
        "prompt": "instruction", "response": "output", "system": "system"}}}))
    return {"train": shape, "heldout": held, "system_prompt": system}


def fp32_view(model: str, folder: Path) -> str:
    """The model folder with config.json saying float32: LLaMA-Factory loads a checkpoint in its own dtype
    (``torch_dtype="auto"``, bf16 for SmolLM2; no setting changes it), the others load it in fp32."""
    folder.mkdir()
    for f in Path(model).iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((Path(model) / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, dtype="float32"), indent=1))
    return str(folder)


def run_one(system: str, spec: dict, work: Path, env: dict, tag: str, a) -> dict:
    from throughput import _rate

    waited = time.time()
    while os.getloadavg()[0] > 1.5 and time.time() - waited < a.settle:  # the previous run's load decays
        time.sleep(5)
    load = os.getloadavg()
    print(f"[{tag}] {system}: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (waited "
          f"{time.time() - waited:.0f} s)" + ("  WARNING: 1-min load > 1.5, the machine is busy" if load[0] > 1.5
                                               else ""), flush=True)
    spec = dict(spec, system=system, out=str(work / tag))
    Path(spec["out"]).mkdir(parents=True)
    cmd = [venv_python(SYSTEMS[system][0]), str(HERE / "peers_child.py"), json.dumps(spec)]
    start = time.time()
    proc = subprocess.run(cmd, cwd=spec["out"], env=env, capture_output=True, text=True)
    (Path(spec["out"]) / "log.txt").write_text(proc.stdout + "\n----- stderr\n" + proc.stderr)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{system} ({tag}) failed (exit {proc.returncode}), log in {spec['out']}/log.txt\n"
                         f"{proc.stderr[-4000:]}")
    r = json.loads(line[len("RESULT "):])
    recs = r.pop("records")
    last, steps = recs[-1], len(recs)
    r.update({k: last[k] for k in ("tokens", "trained", "examples", "rows", "positions", "trainer_tokens")})
    r.update(system=system, tag=tag, budget=spec["budget"], steps=steps,
             tokens_per_s=_rate(recs, a.warmup)[0] if steps > a.warmup else None,
             examples_per_step=last["examples"] / steps, rows_per_step=last["rows"] / steps,
             width=last["positions"] / last["rows"], padding_share=1 - last["tokens"] / last["positions"],
             final_loss=r["losses"][-1] if r["losses"] else None, process_s=time.time() - start)
    after = os.getloadavg()
    rate_text = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else "-"
    print(f"[{tag}] {system}: {rate_text} non-pad tokens/s, {r['steps']} steps, {r['epoch_s']:.1f} s training "
          f"({r['process_s']:.0f} s in all), {r['examples']} examples ({r['examples_per_step']:.1f}/step), "
          f"{r['tokens']} tokens ({r['trained']} trained), final loss {r['final_loss']}; "
          f"load after {after[0]:.2f}", flush=True)
    return r


def heldout_losses(model: str, heldout: Path, adapters: dict) -> dict:
    """Mean loss per output token on the held-out rows: the fp32 base, then the base plus each adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_studio.data import load_examples, tokenize_example
    from qlora_studio.loading import load_tokenizer

    tok = load_tokenizer(model)
    rows = [tokenize_example(tok, ex, RECIPE["max_len"]) for ex in load_examples(heldout, "alpaca")[0]]

    def score(m) -> float:
        total = count = 0.0
        m.eval()
        with torch.no_grad():
            for row in rows:
                logits = m(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].float()
                target = torch.tensor(row["labels"][1:])
                keep = target != -100
                total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
                count += int(keep.sum())
        return total / count

    def base():
        return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)

    out = {"base": score(base())}
    for key, path in adapters.items():
        out[key] = score(PeftModel.from_pretrained(base(), path))
        print(f"held-out loss {key}: {out[key]:.4f}", flush=True)
    return out


def summarize(systems: list[str], runs: list[dict], losses: dict, budget: float) -> tuple[list[dict], str]:
    """One row per system (medians over the repeats) and the markdown table."""
    med = statistics.median
    rows, lines = [], [
        f"| system | non-pad tok/s | steps | examples/step | rows x width/step | padding | epoch s | final loss | "
        f"held-out, 1 epoch | held-out, {budget:.0f} s | compute |", "|" + "---|" * 11]
    for s in systems:
        ep = [r for r in runs if r["system"] == s and r["budget"] is None]
        bud = next((r for r in runs if r["system"] == s and r["budget"] is not None), None)
        rates = [r["tokens_per_s"] for r in ep if r["tokens_per_s"]]
        first, m = ep[0], ep[0]["model"]
        row = dict(system=s, batching=SYSTEMS[s][1], tokens_per_s=med(rates) if rates else None,
                   tokens_per_s_all=rates, epoch_s=med(r["epoch_s"] for r in ep), compute=m,
                   heldout_epoch=med(losses[r["tag"]] for r in ep),
                   **{k: first[k] for k in ("steps", "examples_per_step", "rows_per_step", "width", "padding_share",
                                            "final_loss", "tokens", "trained", "examples")})
        bud = bud or dict(row, tag=ep[0]["tag"])  # an epoch within the budget: its one-epoch adapter
        row.update(heldout_budget=losses[bud["tag"]], budget_steps=bud["steps"], budget_s=bud["epoch_s"])
        rows.append(row)
        spread = f" ({min(rates):.0f}-{max(rates):.0f})" if len(rates) > 1 else ""
        compute = (f"NF4 {m['compute_dtype']}, frozen {m['frozen_dtype']}, LoRA {m['lora_dtype']}"
                   f"{', autocast ' + m['autocast'] if m['autocast'] else ''}, {m['attention']}")
        lines.append(
            f"| {s} | {row['tokens_per_s'] or 0:.1f}{spread} | {row['steps']} | {row['examples_per_step']:.1f} | "
            f"{row['rows_per_step']:.1f} x {row['width']:.0f} | {100 * row['padding_share']:.0f}% | "
            f"{row['epoch_s']:.1f} | "
            f"{row['final_loss']:.4f} | {row['heldout_epoch']:.4f} | {row['heldout_budget']:.4f} "
            f"({row['budget_steps']} steps, {row['budget_s']:.0f} s) | {compute} |")
    return rows, "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true", help="install (or reinstall) the peers' venvs, then exit")
    p.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--heldout", type=int, default=64, help="held-out rows (make_data seed 1)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of the rate")
    p.add_argument("--settle", type=float, default=60, help="seconds to wait at most for the load to fall")
    p.add_argument("--budget", type=float, help="seconds of training for the equal-time held-out loss "
                                                "(default: the shortest median one-epoch time)")
    p.add_argument("--max-steps", type=int, help="cut every run short (smoke test; the rates mean little)")
    p.add_argument("--peer-dtype", choices=["ours", "fp32", "bf16", "default"], default="ours",
                   help="ours: the compute dtype ours plans on this machine (bf16 on a CPU with native bf16, "
                        "else fp32); default: as they ship")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args()
    peers = sorted({SYSTEMS[s][0] for s in a.systems} - {None})
    for peer in peers:
        info = ensure_venv(peer, force=a.setup)
        print(f"{peer} {info['version']}: {venv_dir(peer)} ({info['size_mb']} MB, installed in "
              f"{info['install_s']} s)")
    envs = {peer or "ours": describe_env(peer) for peer in [None, *peers]}
    for name, env in envs.items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), flush=True)
    if a.setup:
        return 0

    from qlora_studio.models import embedded_model_path

    if a.peer_dtype == "ours":
        from qlora_studio.hardware import cpu_has_bf16
        from qlora_studio.plan import precision_for

        a.peer_dtype = "bf16" if precision_for("cpu", cpu_bf16=cpu_has_bf16()) == "bf16" else "fp32"
        print(f"peers' compute dtype: {a.peer_dtype}, as ours plans on this CPU", flush=True)
    work = Path(tempfile.mkdtemp(prefix="qlora-peers-"))
    model = str(embedded_model_path())
    data = write_data(work, a)
    env = dict(os.environ, QLORA_STUDIO_HOME=str(work / "home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_CACHE=str(work / "datasets"), TOKENIZERS_PARALLELISM="false")
    spec = {"model": model, "train": str(work / "train.jsonl"), "lf_dir": str(work / "lf"), "budget": None,
            "max_steps": a.max_steps, "peer_dtype": a.peer_dtype,
            "lf_model": fp32_view(model, work / "model-fp32") if a.peer_dtype == "fp32" else model}
    t = data["train"]
    print(f"work folder {work}\n{a.examples} alpaca rows (words: median {t['words_median']}, 90th percentile "
          f"{t['words_p90']}, max {t['words_max']}), {a.heldout} held-out rows, recipe {RECIPE}, "
          f"{a.warmup} warm-up steps left out, {os.cpu_count()} CPUs", flush=True)
    runs = []
    for rep in range(a.repeats):
        order = a.systems if rep % 2 == 0 else a.systems[::-1]
        runs += [run_one(s, spec, work, env, f"{s}-r{rep + 1}", a) for s in order]
    epoch_s = {s: statistics.median(r["epoch_s"] for r in runs if r["system"] == s) for s in a.systems}
    budget = a.budget or min(epoch_s.values())
    why = "given" if a.budget else "the shortest median epoch: " + min(epoch_s, key=epoch_s.get)
    print(f"budget {budget:.1f} s ({why})")
    for s in a.systems:
        if epoch_s[s] > budget:
            runs.append(run_one(s, dict(spec, budget=budget), work, env, f"{s}-budget", a))
    losses = heldout_losses(model, work / "heldout.jsonl", {r["tag"]: r["adapter"] for r in runs})
    rows, table = summarize(a.systems, runs, losses, budget)
    print(f"\nheld-out loss of the base model: {losses['base']:.4f}\n\n{table}\n")
    shown = ("precision", "batching", "attention", "logits", "gradient_checkpointing", "decoded_weights",
             "dropout_masks", "cross_entropy", "lora_update", "optimizer", "packing", "padding_free",
             "completion_only_loss", "template", "cutoff_len", "peer_dtype")
    for row in rows:
        r = next(x for x in runs if x["system"] == row["system"])
        print(f"{row['system']}: {row['batching']}; {r['steps']} steps: {r['examples']} examples, {r['tokens']} "
              f"non-pad tokens ({r['trainer_tokens']} by the Trainer's own count), {r['trained']} trained; "
              + json.dumps({k: v for k, v in r["settings"].items() if k in shown}))
    for row in rows:  # LLaMA-Factory at 64 rows: 5 steps, 3 counted; 160-197 tok/s across sittings
        counted = next(x for x in runs if x["system"] == row["system"])["steps"] - a.warmup
        if 0 < counted < 10:
            print(f"note: {row['system']}'s rate counts {counted} steps only; it varies between sittings "
                  "(more --examples give it more)")
    if not a.max_steps and len({row["trained"] for row in rows}) > 1:
        print("note: the systems trained different token totals (truncation or dropped long examples differ)")
    if a.out:
        Path(a.out).write_text(json.dumps(dict(recipe=RECIPE, data=data, args=vars(a), budget=budget, environments=envs,
                                               summary=rows, runs=runs, heldout_losses=losses, table=table), indent=1))
        print(f"results in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
