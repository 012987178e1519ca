"""A run exported as a self-contained job for a bigger machine or a cluster (``qlora-studio job``).

`export_job` prepares a run folder as `train` would -- config.json, plan.json (planned for the target:
``--gpu CARD`` and ``--gpus N``, on ``--nodes M`` machines) and status.json -- and does not train it. In
``<run>/job/`` it writes what the other machine needs:

- ``accelerate_config.yaml``: `accelerate launch`'s configuration for the plan (`parallel.accelerate_config`:
  the same FSDP2 settings the worker gives the Trainer), checked by accelerate's own loader before it is kept;
- ``config.json`` and ``plan.json``: the resolved run settings and the plan, for reading;
- ``data/``: the data file (and the held-out file, if any), used when the original path is not there;
- ``launch.sh``: the one-line launch, on one machine (``accelerate launch``) or on several (``torchrun`` with
  its c10d rendezvous; run on every node, the run folder on a filesystem all of them share).

Take the run folder to the machine, run ``bash <run>/job/launch.sh`` there (``--resume`` continues it after
an interruption), then bring the folder back into the studio's ``runs/``: it is a run like any other.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from .errors import ConfigError

JOB_DIR = "job"
RDZV_PORT = 29500


def commands(run_name: str, plan: dict, nodes: int) -> dict:
    """The one-line launches, run from the folder that holds the run folder."""
    n = plan["processes"]
    run = shlex.quote(run_name)
    single = f"accelerate launch --config_file {run}/{JOB_DIR}/accelerate_config.yaml -m qlora_studio.worker {run}"
    multi = (f"torchrun --nnodes {nodes} --nproc-per-node {n // nodes} --rdzv-backend c10d "
             f"--rdzv-endpoint HOST:{RDZV_PORT} --rdzv-id {run} -m qlora_studio.worker {run}")
    return {"single_node": single, "multi_node": multi}


def _launch_script(run_name: str, plan: dict, nodes: int, machine: str) -> str:
    n = plan["processes"]
    return f"""#!/usr/bin/env bash
# QLoRA Studio job: the run {run_name}, planned for {n} process{'es' if n != 1 else ''} ({plan['parallel']}) on {machine}.
# Every machine needs qlora-studio installed (pip install qlora-studio, the version that exported it) and the
# base model ({plan['model']}) reachable: a Hub id downloads there, a local folder must be copied.
#
#   one machine with {n} GPU{'s' if n != 1 else ''}:  bash {run_name}/{JOB_DIR}/launch.sh
#   {nodes if nodes > 1 else 'several'} machines:  NNODES={nodes if nodes > 1 else 2} MASTER=<host of the first>:{RDZV_PORT} bash {run_name}/{JOB_DIR}/launch.sh  (on each;
#                  the run folder on a filesystem they share, at the same path)
#   after an interruption: the same command with --resume
#
# Bring the run folder back into the studio's runs/ folder afterwards: it is a run like any other.
set -euo pipefail
RUN="$(cd "$(dirname "${{BASH_SOURCE[0]}}")/.." && pwd)"
NNODES="${{NNODES:-{nodes}}}"
PROCESSES={n}
if [ "$NNODES" = 1 ]; then
  exec accelerate launch --config_file "$RUN/{JOB_DIR}/accelerate_config.yaml" -m qlora_studio.worker "$RUN" "$@"
fi
if [ $((PROCESSES % NNODES)) != 0 ]; then echo "$PROCESSES processes do not split over $NNODES machines" >&2; exit 2; fi
exec torchrun --nnodes "$NNODES" --nproc-per-node $((PROCESSES / NNODES)) --rdzv-backend c10d \\
  --rdzv-endpoint "${{MASTER:?set MASTER=host:port of the first machine}}" --rdzv-id "$(basename "$RUN")" \\
  -m qlora_studio.worker "$RUN" "$@"
"""


def _check_accelerate_config(path: Path) -> None:
    """The file as `accelerate launch` reads it (its own loader): refuse to hand over one it would not."""
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(path))
    if loaded.num_processes is None or loaded.distributed_type is None:
        raise ConfigError(f"{path}: accelerate read it without processes or a distributed type")


def export_job(cfg, gpu: str | None = None, nodes: int = 1, name: str | None = None) -> tuple:
    """(run folder, job description) of ``cfg`` exported for ``cfg.processes`` GPUs of kind ``gpu`` (a catalog
    card; None: this machine's) on ``nodes`` machines. Nothing trains."""
    import yaml

    from .hardware import close_gpu_names, find_gpu
    from .parallel import accelerate_config
    from .plan import Machine, RunPlan, plan_for
    from .runs import atomic_write_json
    from .training import prepare_run

    if nodes < 1:
        raise ConfigError(f"--nodes must be 1 or more, got {nodes}", field="nodes")
    machine = None
    if gpu:
        spec = find_gpu(gpu)
        if spec is None:
            raise ConfigError(f"--gpu {gpu}: not a card the catalog knows; close: {', '.join(close_gpu_names(gpu))}",
                              field="gpu")
        machine = Machine.for_gpu(spec, count=cfg.processes or 1)
    plan = plan_for(cfg, machine)
    if plan.processes % nodes:
        raise ConfigError(f"{plan.processes} processes cannot be split evenly over {nodes} machines", field="processes",
                          hint="--gpus must be a multiple of --nodes")
    run = prepare_run(cfg, name=name, plan=plan)
    job = run.path / JOB_DIR
    try:
        (job / "data").mkdir(parents=True)
        stored = run.config()
        for key in ("data", "test_data"):
            if stored.get(key):
                shutil.copy2(stored[key], job / "data" / Path(stored[key]).name)
        atomic_write_json(job / "config.json", stored)
        atomic_write_json(job / "plan.json", run.plan())
        config_path = job / "accelerate_config.yaml"
        config_path.write_text(yaml.safe_dump(accelerate_config(plan, nodes), sort_keys=False), encoding="utf-8")
        _check_accelerate_config(config_path)
        plan_doc = RunPlan.to_dict(plan)
        script = job / "launch.sh"
        script.write_text(_launch_script(run.name, plan_doc, nodes, plan.machine), encoding="utf-8")
        script.chmod(0o755)
    except BaseException:
        shutil.rmtree(run.path, ignore_errors=True)
        raise
    run.set_status("interrupted", phase="exported job", error=f"exported as a job: run {JOB_DIR}/launch.sh on the "
                   "machine it was planned for, then bring the folder back")
    described = {"run": str(run.path), "job": str(job), "processes": plan.processes, "parallel": plan.parallel,
                 "nodes": nodes, "machine": plan.machine, "files": sorted(p.name for p in job.iterdir()),
                 "commands": commands(run.name, plan_doc, nodes)}
    (job / "job.json").write_text(json.dumps(described, indent=2), encoding="utf-8")
    return run, described


# ------------------------------------------------------------------ the command line


def cmd_job(args) -> int:
    from .cli import _config_from_args, _print_json

    cfg = _config_from_args(args)
    run, described = export_job(cfg, gpu=args.gpu, nodes=args.nodes)
    if args.json:
        _print_json(described)
        return 0
    print(f"{described['processes']} processes ({described['parallel']}) on {described['machine']}"
          + (f", {described['nodes']} machines" if described["nodes"] > 1 else ""))
    print(f"job files in {described['job']}: {', '.join(described['files'])}")
    print("from the folder that holds the run folder, on one machine:")
    print("  " + described["commands"]["single_node"])
    print("on each of several machines (the run folder on a shared filesystem):")
    print("  " + described["commands"]["multi_node"])
    print(run.path)
    return 0


def add_job_verb(sub, settings_parser) -> None:
    j = settings_parser(sub, "job", "export a run as a job for a bigger machine or a cluster (prints the run folder last)")
    j.add_argument("--gpu", help="the card the job is planned for (a catalog name, e.g. A100-80GB); default: this machine's")
    j.add_argument("--nodes", type=int, default=1, help="machines the processes (--gpus) are spread over")
    j.set_defaults(func=cmd_job)
