"""The settings of a run, each declared once: type, default, choices, range, help, and whether it may be
left to the planner ("automatic", stored as None).

`TrainConfig` is a dataclass whose fields carry that declaration (`setting(...)`, in the manner of peft's
config dataclasses); `SETTINGS` lists them. Everything else is generated from it: reading a config file
or a form (`TrainConfig.from_dict`, which coerces and validates each value by its declaration), the
command line's flags (`add_flags` / `flag_overrides`) and the Train tab's form (`ui/train.py`). The
settings stay as the user wrote them (config.json); what the planner resolves goes beside them
(plan.json, see `plan.py`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .estimator import OPTIMIZERS
from .metrics import METRICS

AUTO = "auto"


@dataclass(frozen=True)
class Setting:
    """One setting's declaration. ``kind``: str | int | float | bool | choice | targets."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple = ()
    auto: bool = False  # None is allowed and means: the planner decides
    auto_help: str = ""  # what "automatic" resolves to, for the form and --help
    auto_label: str = AUTO  # the word a form or a flag uses for "automatic" ("none" for the task)
    minimum: float | None = None
    maximum: float | None = None
    above: bool = False  # the minimum itself is not allowed (value > minimum)
    below: bool = False  # the maximum itself is not allowed (value < maximum)
    group: str = "run"  # where the form shows it: model | lora | schedule | batch | speed | parallel | run | internal
    flag: str | None = ""  # command-line flag name ("" = from the name, None = no flag)
    custom: bool = False  # a choice that also accepts other values (a model id, a task name)
    aliases: tuple = ()  # more command-line flags for the same setting ("--nproc" for --gpus)

    @property
    def flag_name(self) -> str | None:
        if self.flag is None:
            return None
        return "--" + (self.flag or self.name.replace("_", "-"))

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")

    def describe(self) -> str:
        text = self.help
        if self.auto and self.auto_help:
            text += f" (automatic: {self.auto_help})"
        return text


def setting(default, help: str, kind: str, **declaration):
    """A dataclass field declared as a `Setting` (the name is filled in by `SETTINGS`)."""
    return field(default=default, metadata={"setting": dict(kind=kind, help=help, default=default, **declaration)})


@dataclass
class TrainConfig:
    # -- what to train on
    model: str = setting("embedded", "the base model: embedded, a Hub id, a model folder or a .gguf file", "str",
                         group="model", choices=("embedded",), custom=True)
    data: str = setting("", "training data file (.jsonl .json .csv .parquet)", "str", group="model")
    task: str | None = setting(None, "the task, for task evaluation and the automatic LoRA choice (e.g. sql)",
                               "choice", choices=("sql",), auto=True, auto_help="none", auto_label="none", custom=True, group="model")
    test_data: str | None = setting(None, "held-out file for task evaluation (not trained on)", "str", auto=True,
                                    group="internal")
    data_format: str | None = setting(None, "the data's format", "choice", auto=True, auto_help="detected",
                                      choices=("chat", "alpaca", "prompt_completion", "text"), group="internal")
    system_prompt: str | None = setting(
        None, "the system message of conversations that have none (rows with their own keep it); 'none': no "
        "system message at all, not even the model's default", "str", auto=True,
        auto_help="the model's default (the Data tab shows it)", group="model")
    # -- quantization and LoRA
    quant: str = setting("nf4", "how the frozen base is stored: 4-bit NF4 or FP4, or 16-bit", "choice",
                         choices=("nf4", "fp4", "none"), group="model")
    double_quant: bool = setting(True, "quantize the 4-bit scales too (saves ~0.4 bit per weight)", "bool",
                                 group="model")
    rank: int | None = setting(None, "LoRA rank", "int", auto=True, auto_help="by model size and task",
                               minimum=1, maximum=1024, group="lora")
    alpha: int | None = setting(None, "LoRA alpha (scale = alpha / rank)", "int", auto=True,
                                auto_help="2 x rank", minimum=1, group="lora")
    targets: str | list[str] | None = setting(
        None, "layers LoRA adapts: attention, all (linear layers), or a list of module names", "targets",
        choices=("attention", "all"), auto=True, auto_help="all under 3B or for format tasks, else attention",
        group="lora")
    lora_dropout: float = setting(0.05, "dropout on the adapters' input", "float", minimum=0, maximum=1, below=True,
                                  group="lora")
    # -- schedule
    learning_rate: float = setting(2e-4, "peak learning rate (cosine schedule)", "float", minimum=0, maximum=1,
                                   above=True, below=True, group="schedule")
    epochs: float = setting(1.0, "passes over the training data", "float", minimum=0, above=True, group="schedule")
    max_steps: int | None = setting(None, "optimizer steps (overrides epochs)", "int", auto=True,
                                    auto_help="from epochs", minimum=0, group="schedule")
    warmup_ratio: float = setting(0.05, "share of the steps spent warming the learning rate up", "float",
                                  minimum=0, maximum=1, group="schedule")
    weight_decay: float = setting(0.0, "AdamW weight decay", "float", minimum=0, group="internal")
    max_grad_norm: float = setting(1.0, "gradient clipping norm", "float", minimum=0, group="internal")
    # -- batching
    batch_size: int = setting(4, "examples per forward pass (micro-batch)", "int", minimum=1, group="batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step", "int", minimum=1, group="batch")
    batch_unit: str = setting(
        "examples", "what the batch size counts: examples, or sequences of max_seq_len tokens filled with whole "
        "examples (bigger steps and fewer of them, as TRL's and LLaMA-Factory's packing do)", "choice",
        choices=("examples", "sequences"), group="batch")
    max_seq_len: int = setting(512, "tokens per example; longer ones are cut", "int", minimum=1, group="batch")
    eval_fraction: float = setting(0.1, "share of the data held out for evaluation", "float", minimum=0, maximum=1,
                                   below=True, group="batch")
    eval_steps: int | None = setting(None, "steps between evaluations", "int", auto=True,
                                     auto_help="about 5 per run", minimum=1, group="internal")
    save_steps: int | None = setting(None, "steps between checkpoints", "int", auto=True,
                                     auto_help="with each evaluation", minimum=1, group="internal")
    logging_steps: int = setting(1, "steps between logged metrics", "int", minimum=1, group="internal")
    # -- task evaluation while training (see `golden` and `taskeval`)
    golden_prompts: int = setting(3, "held-out prompts answered at each evaluation (samples.jsonl); 0: none",
                                  "int", minimum=0, maximum=64, group="schedule")
    golden_max_new_tokens: int = setting(48, "the longest reply to a golden prompt, in tokens", "int", minimum=1,
                                         maximum=1024, group="schedule")
    golden_time_share: float = setting(0.25, "the most time golden prompts may take, as a share of the training "
                                       "time so far (past it they are reduced, then skipped)", "float", minimum=0,
                                       maximum=1, group="internal")
    eval_metric: str | None = setting(None, "how answers are scored: " + ", ".join(METRICS[:-1]) + " or " + METRICS[-1],
                                      "choice", choices=METRICS, auto=True,
                                      auto_help="by the kind of answer", group="model")
    eval_db: str | None = setting(None, "SQLite database the sql metric runs queries on", "str", auto=True,
                                  auto_help="the sample warehouse for task sql", group="internal")
    # -- speed
    gradient_checkpointing: bool | None = setting(
        None, "recompute activations in backward (less memory, ~1/3 more compute)", "bool", auto=True,
        auto_help="on with a GPU; off on the CPU when the run fits in RAM without it", group="speed")
    decoded_weights: bool | None = setting(
        None, "keep the 4-bit base weights decoded in the compute dtype instead of decoding them at each use "
        "(the same numbers; faster on the CPU, a copy of the base in the compute dtype in memory)", "bool", auto=True,
        auto_help="on the CPU when the run fits in half of the free RAM with the copy; off with a GPU", group="speed")
    batching: str | None = setting(
        None, "how a step's examples become a batch: packed (no padding), grouped by length, or padded", "choice",
        choices=("packed", "grouped", "padded"), auto=True,
        auto_help="packed where the model's attention keeps examples apart, else grouped", group="speed")
    attention: str | None = setting(
        None, "attention implementation: packed_sdpa (SDPA on each packed example alone), sdpa, or eager", "choice",
        choices=("packed_sdpa", "sdpa", "eager"), auto=True,
        auto_help="packed_sdpa on the CPU with packed batches, else eager; sdpa on a GPU", group="speed")
    logits: str | None = setting(
        None, "where the LM head and the loss are computed: labelled (only positions whose next token is trained; "
        "the same loss) or all", "choice", choices=("labelled", "all"), auto=True,
        auto_help="labelled where the model takes a mask of positions", group="speed")
    cross_entropy: str | None = setting(
        None, "how the loss is computed from the LM head's logits: chunked (a few rows at a time, without an fp32 "
        "copy of all of them; the same loss up to fp32 rounding) or torch (transformers' cross-entropy)", "choice",
        choices=("chunked", "torch"), auto=True, auto_help="chunked on the CPU, torch on a GPU", group="speed")
    lora_update: str | None = setting(
        None, "how the LoRA update joins the base layer's output: fused (one matrix product adds it, rounded once) "
        "or peft (peft's layer: a copy, the product, the scaling and the sum, each a pass over the output)",
        "choice", choices=("fused", "peft"), auto=True, auto_help="fused on the CPU, peft on a GPU", group="speed")
    dropout_masks: str | None = setting(
        None, "how LoRA dropout draws its masks: 16bit (16-bit random numbers, four from each SplitMix64 number, "
        "computed on every core; the probability rounded to 1/65536) or torch (torch's own dropout)", "choice",
        choices=("16bit", "torch"), auto=True, auto_help="16bit on the CPU, torch on a GPU", group="speed")
    cpu_threads: int | None = setting(
        None, "torch threads when training on the CPU", "int", auto=True, minimum=1, maximum=1024,
        auto_help="one per core that other processes leave free, checked between steps", group="speed")
    optimizer: str | None = setting(None, "optimizer", "choice",
                                    choices=OPTIMIZERS, auto=True,
                                    auto_help="paged_adamw_8bit on a GPU, adamw_torch_fused on the CPU", group="speed")
    device: str | None = setting(None, "where to train", "choice", choices=("cuda", "cpu"), auto=True,
                                 auto_help="the GPU if there is one", group="speed")
    seed: int = setting(42, "random seed", "int", minimum=0, group="speed")
    # -- more than one process (the plan decides with `parallel.split_processes` / `choose_parallel`; `launcher`
    #    starts them; the Train tab shows these only where more than one GPU is detected)
    processes: int | None = setting(
        None, "training processes: one per GPU; on the CPU, gloo worker processes (for testing, not speed)", "int",
        auto=True, auto_help="1", minimum=1, maximum=1024, flag="gpus", aliases=("--nproc",), group="parallel")
    parallel: str | None = setting(
        None, "how the processes share the work: ddp (a 4-bit copy of the model per GPU, the data split) or fsdp "
        "(the model sharded across the GPUs, for a model that does not fit one)", "choice", choices=("ddp", "fsdp"),
        auto=True, auto_help="ddp; fsdp when a copy of the model does not fit one GPU but a shard does",
        group="parallel")
    # -- the run
    trust_remote_code: bool = setting(False, "run code that ships with the model", "bool", group="internal")
    name: str | None = setting(None, "the run folder's name (letters, digits, . _ -)", "str", auto=True,
                               auto_help="date-model-data", flag="output", group="internal")
    oom_retries: int = setting(3, "automatic out-of-memory recoveries (the CPU's kept decoded weights first, then "
                               "half micro-batch, twice accumulation)", "int", minimum=0, group="internal")
    init_adapter: str | None = setting(None, "start from these LoRA weights (a checkpoint of an earlier run)", "str",
                                       auto=True, flag=None, group="internal")
    init_step: int = setting(0, "the earlier run's step those weights come from", "int", minimum=0, flag=None,
                             group="internal")

    # ---------------------------------------------------------------- reading

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """Settings from a mapping (a file, a form, the command line): each coerced and checked by its
        declaration; raises `ConfigError` naming the source and the field."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping of settings, got {type(d).__name__}")
        known = {s.name: s for s in SETTINGS}
        values = {}
        for key, value in d.items():
            if key not in known:
                raise ConfigError.at(source, key, f"unknown setting; known settings: {', '.join(sorted(known))}")
            values[key] = coerce(known[key], value, source)
        cfg = cls(**values)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Each value against its declaration, then the rules that involve several settings."""
        for s in SETTINGS:
            coerce(s, getattr(self, s.name), source)
        if not self.data:
            raise ConfigError.at(source, "data", "no training data file given")
        if self.init_adapter is not None and not (Path(self.init_adapter) / "adapter_model.safetensors").is_file():
            raise ConfigError.at(source, "init_adapter", f"{self.init_adapter}: no adapter_model.safetensors there")
        if self.eval_metric == "sql" and not self.eval_db and (self.task or "").lower() != "sql":
            raise ConfigError.at(source, "eval_db", "the sql metric needs the SQLite database its queries run on",
                                 hint="set eval_db (--eval-db FILE)")
        if self.eval_db is not None and not Path(self.eval_db).expanduser().is_file():
            raise ConfigError.at(source, "eval_db", f"{self.eval_db}: no such file")
        # 0 steps is allowed for a run that starts from an adapter: it evaluates and keeps that adapter.
        if self.max_steps is not None and self.max_steps < (0 if self.init_adapter else 1):
            raise ConfigError.at(source, "max_steps", f"must be >= 1, got {self.max_steps!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def known(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum


def _declare() -> tuple[Setting, ...]:
    out = []
    for f in fields(TrainConfig):
        meta = dict(f.metadata["setting"])
        out.append(Setting(name=f.name, **meta))
    return tuple(out)


SETTINGS: tuple[Setting, ...] = _declare()
BY_NAME = {s.name: s for s in SETTINGS}


# ---------------------------------------------------------------- coercion


def _number(s: Setting, value, source: str, whole: bool):
    if isinstance(value, bool):
        raise ConfigError.at(source, s.name, f"must be {'a whole number' if whole else 'a number'}, got {value!r}")
    if isinstance(value, str):  # YAML reads 2e-4 as text; a form or a flag gives text
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError.at(source, s.name, f"must be {'a whole number' if whole else 'a number'}, got {value!r}") from None
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError.at(source, s.name, f"must be {'a whole number' if whole else 'a number'}, got {value!r}")
    if whole:
        if float(value) != int(value):
            raise ConfigError.at(source, s.name, f"must be a whole number, got {value!r}")
        value = int(value)
    else:
        value = float(value)
    low = s.minimum is not None and (value <= s.minimum if s.above else value < s.minimum)
    high = s.maximum is not None and (value >= s.maximum if s.below else value > s.maximum)
    if low or high:
        lo = "" if s.minimum is None else f"{'>' if s.above else '>='} {s.minimum:g}"
        hi = "" if s.maximum is None else f"{'<' if s.below else '<='} {s.maximum:g}"
        raise ConfigError.at(source, s.name, f"must be {' and '.join(x for x in (lo, hi) if x)}, got {value!r}")
    return value


def coerce(s: Setting, value, source: str = "config"):
    """``value`` as setting ``s`` stores it (None: automatic, where allowed); raises `ConfigError`."""
    if isinstance(value, str) and s.auto and value.strip().lower() in ("", AUTO, s.auto_label):
        value = None
    if value is None:
        if s.auto:
            return None
        raise ConfigError.at(source, s.name, "needs a value (it has no automatic choice)")
    if s.kind in ("int", "float"):
        return _number(s, value, source, whole=s.kind == "int")
    if s.kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "on", "false", "off"):
            return value.strip().lower() in ("true", "on")
        if not isinstance(value, bool):
            raise ConfigError.at(source, s.name, f"must be true or false{', or automatic' if s.auto else ''}, "
                                                 f"got {value!r}")
        return value
    if s.kind == "targets" and isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, str) and v for v in value):
            raise ConfigError.at(source, s.name, f"a list of module names must hold non-empty names, got {value!r}")
        return list(value)
    if not isinstance(value, str):
        raise ConfigError.at(source, s.name, f"expected text, got {value!r}")
    if s.kind == "targets" and value not in s.choices:
        names = [v.strip() for v in value.split(",") if v.strip()]
        if not names:
            raise ConfigError.at(source, s.name, f"{value!r} is not attention, all, or a list of module names")
        return names
    if s.choices and not s.custom and value not in s.choices:
        raise ConfigError.at(source, s.name, f"{value!r} is not one of {', '.join(s.choices)}"
                                             + (" (or automatic)" if s.auto else ""))
    return value


# ---------------------------------------------------------------- the command line


def add_flags(parser: argparse.ArgumentParser, groups: tuple[str, ...] | None = None) -> None:
    """One flag per setting (``--batch-size``...); a flag left out stays None (the file's or the default)."""
    for s in SETTINGS:
        if s.flag_name is None or (groups is not None and s.group not in groups):
            continue
        help_text = s.describe() + (f"; default {s.default}" if s.default not in (None, "") else "")
        help_text = help_text.replace("%", "%%")
        if s.kind == "bool":
            parser.add_argument(s.flag_name, *s.aliases, dest=s.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif s.kind in ("int", "float"):
            parser.add_argument(s.flag_name, *s.aliases, dest=s.name, type=str, default=None, metavar="N",
                                help=help_text)
        elif s.choices and not s.custom and s.kind != "targets":
            parser.add_argument(s.flag_name, *s.aliases, dest=s.name, default=None,
                                choices=list(s.choices) + ([AUTO] if s.auto else []), help=help_text)
        else:
            parser.add_argument(s.flag_name, *s.aliases, dest=s.name, default=None, help=help_text)


def flag_overrides(args: argparse.Namespace) -> dict:
    """The settings given on the command line (raw: `TrainConfig.from_dict` coerces them)."""
    return {s.name: getattr(args, s.name) for s in SETTINGS
            if s.flag_name is not None and getattr(args, s.name, None) is not None}
