"""The run's configuration: a tree of typed dataclasses, loadable from a YAML recipe and from
`--section.field=value` overrides, checked before any work is done.

    config = load_config("examples/squad_llama3.2_1b_lora.yaml", ["--optim.lr=1e-4"])
    fastft.finetune(config)

Sections: model, data (fastft.data.DataConfig), lora, optim, train, distributed, checkpoint,
logging. Every field has a default: an empty recipe is the built-in default run (a tiny Llama
built from a config, the built-in SQuAD-format data, the byte-level tokenizer).

Errors name the field and the fix: an unknown field ("train.lr: unknown field; did you mean
optim.lr?"), a wrong type ("optim.lr: expected a float, got 'fast'"), an impossible combination
("distributed.cpu_offload needs FSDP (several processes, or distributed.fsdp=true)").
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import types
import typing
from typing import Any, Union

from fastft.data.recipe import DataConfig


class ConfigError(ValueError):
    """A bad recipe or override: the message names the field and what to do."""


# The built-in default model: a 4-layer, 128-wide Llama over the byte-level tokenizer (vocab 262).
# Small enough for a few hundred steps on two CPU cores in a couple of minutes.
DEFAULT_TINY_MODEL = dict(
    model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=10000.0,
)


@dataclasses.dataclass
class ModelConfig:
    name: str | None = None  # a hub name or local folder; None: build `config` with random weights
    config: dict | None = None  # a transformers config as a dict with "model_type" (random init); used when name is None
    tokenizer: str | None = None  # a hub name / folder, or "byte" (fastft's byte-level tokenizer); None: the model's own, or "byte"
    dtype: str = "auto"  # weights as loaded/built: "auto" (bf16 on CUDA, fp32 on CPU), "float32", "bfloat16", "float64" (reference runs)
    patch: bool = True  # fastft.patch with the fused kernels (on CPU without TRITON_INTERPRET: their torch references)
    patch_options: dict = dataclasses.field(default_factory=dict)  # passed to fastft.patch, e.g. {attention: false}
    trust_remote_code: bool = False
    attn_implementation: str | None = None  # for the unpatched model; patching sets "fastft"
    tiled_mlp: Union[str, int] = "off"  # gated MLPs over chunks of tokens: "off", "auto" (long rows only) or tokens per chunk


@dataclasses.dataclass
class LoraConfig:
    enabled: bool = False  # False: full fine-tuning
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"
    modules_to_save: list[str] | None = None
    # PEFT target_parameters: MoE expert stacks, e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj]
    target_parameters: list[str] | None = None


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    fused: bool | None = None  # fused AdamW; None: on where torch supports it for these parameters
    schedule: str = "cosine"  # "cosine", "linear" or "constant", after the warm-up
    warmup_steps: int | None = None  # None: 5% of train.max_steps
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    grad_clip: float | None = 1.0  # max global L2 norm of the gradients; None: no clipping


@dataclasses.dataclass
class TrainConfig:
    max_steps: int = 300  # optimizer steps; the learning-rate schedule spans them
    run_steps: int | None = None  # stop after this many steps in this invocation (checkpoint; resume later)
    # The global batch of one optimizer step, over all ranks and micro-batches: give one of these
    # (None for both: one micro-batch per rank). Accumulation = global / (micro-batch x ranks).
    global_batch_tokens: int | None = None  # token slots (packed/flat batching)
    global_batch_rows: int | None = None  # rows of data.max_seq_len (packed) or examples (padded)
    precision: str = "auto"  # "auto" (bf16 autocast/params on CUDA, fp32 on CPU), "bf16", "fp32"
    seed: int = 0
    eval_every: int = 100  # steps between evaluations (0: only before and after training)
    eval_batches: int = 8  # validation micro-batches for the val loss (in all, shared by the ranks)
    eval_generate: int = 32  # questions answered by greedy generation for EM/F1 (0: no generation)
    eval_before: bool = True  # evaluate once before the first step


@dataclasses.dataclass
class DistributedConfig:
    fsdp: bool | None = None  # FSDP2; None: on when there are several processes
    reshard_after_forward: bool = True  # False: keep the gathered params between forward and backward (ZeRO-2-like)
    cpu_offload: bool = False  # parameters, gradients and optimizer state live on the CPU
    param_dtype: str = "auto"  # FSDP2 MixedPrecisionPolicy: "auto" (bf16 on CUDA, fp32 on CPU), "bfloat16", "float32"
    reduce_dtype: str = "float32"
    activation_checkpointing: str = "none"  # "none", "full" (every block), "selective" or "offload" (full, inputs in host memory)
    checkpoint_every: int = 2  # selective: recompute every n-th block only
    compile: bool = False  # torch.compile each decoder block (not under the Triton interpreter)
    backend: str | None = None  # process-group backend; None: nccl on CUDA, gloo on CPU
    # Under FSDP2 with several processes: "rank0" (rank 0 alone loads or builds the full model on
    # its CPU, the others build it on the meta device, and the weights are broadcast into the
    # shards after fully_shard: one host copy per node) or "every_rank" (each rank loads it whole).
    load: str = "rank0"
    timeout_minutes: int = 30
    # Expert parallelism (MoE models): each group of this many ranks splits every MoE layer's experts
    # (all-to-all dispatch, fastft/expert_parallel.py); 1: off. Needs FSDP2 and load=every_rank.
    expert_parallel: int = 1


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 0  # steps between sharded checkpoints (0: none, except on SIGTERM/SIGINT)
    keep: int = 2  # complete checkpoints kept (older ones are deleted)
    resume: bool = False  # continue from the newest complete checkpoint in the run folder
    resume_from: str | None = None  # or from this checkpoint folder
    export: bool = True  # at the end: an HF folder (full) or a PEFT adapter folder (LoRA)


@dataclasses.dataclass
class LoggingConfig:
    # config.yaml, metrics.jsonl, checkpoints/, export/; None: a new runs/<YYYYmmdd-HHMMSS> per run
    # (runs/latest points at the newest). A folder holding another run's results is refused.
    run_dir: str | None = None
    overwrite: bool = False  # true: a run_dir holding an earlier run's results is cleared first
    progress_bar: bool = True
    tensorboard: bool = True  # when the tensorboard package is installed
    log_every: int = 1  # steps between metric lines
    quiet: bool = False  # no start-up report (tests)


@dataclasses.dataclass
class FinetuneConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(max_seq_len=512, batch_size=8))
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "FinetuneConfig":
        validate(self)
        return self


SECTIONS = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float64"),
    "optim.schedule": ("cosine", "linear", "constant"),
    "train.precision": ("auto", "bf16", "fp32"),
    "distributed.param_dtype": ("auto", "float32", "bfloat16"),
    "distributed.reduce_dtype": ("float32", "bfloat16"),
    "distributed.activation_checkpointing": ("none", "full", "selective", "offload"),
    "distributed.load": ("rank0", "every_rank"),
}


# -- building the tree from plain data (YAML, overrides), with type checks -----------------------

def _all_fields() -> dict[str, list[str]]:
    """field name -> the sections that have it (for "did you mean" messages)."""
    owners: dict[str, list[str]] = {}
    for section, f in SECTIONS.items():
        for sub in dataclasses.fields(_section_type(section)):
            owners.setdefault(sub.name, []).append(section)
    return owners


def _section_type(section: str) -> type:
    return typing.get_type_hints(FinetuneConfig)[section]


# Names people reach for from other trainers -> the field here.
ALIASES = {"learning_rate": "optim.lr", "lr": "optim.lr", "steps": "train.max_steps", "num_steps": "train.max_steps",
           "max_grad_norm": "optim.grad_clip", "clip_grad": "optim.grad_clip", "warmup": "optim.warmup_steps",
           "micro_batch_size": "data.batch_size", "batch_size": "data.batch_size", "seq_len": "data.max_seq_len",
           "lora_r": "lora.r", "rank": "lora.r", "lora_alpha": "lora.alpha", "output_dir": "logging.run_dir",
           "gradient_accumulation_steps": "train.global_batch_rows (accumulation is derived from it)",
           "gradient_checkpointing": "distributed.activation_checkpointing", "bf16": "train.precision"}


def _unknown(section: str, name: str) -> ConfigError:
    where = f"{section}.{name}" if section else name
    if not section:
        close = difflib.get_close_matches(name, list(SECTIONS), n=1)
        hint = f"did you mean {close[0]}?" if close else f"the sections are {', '.join(SECTIONS)}"
        return ConfigError(f"{where}: unknown section; {hint}")
    owners = _all_fields().get(name, [])
    if not owners and name in ALIASES:
        return ConfigError(f"{where}: unknown field; did you mean {ALIASES[name]}?")
    if owners:
        return ConfigError(f"{where}: unknown field; did you mean {owners[0]}.{name}?")
    names = [f.name for f in dataclasses.fields(_section_type(section))]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {section}.{close[0]}?" if close else f"the fields of {section} are {', '.join(names)}"
    return ConfigError(f"{where}: unknown field; {hint}")


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a float", str: "a string",
            dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(where: str, value: Any, tp) -> Any:
    """`value` as type `tp`, or a ConfigError naming the field. Numbers written as strings
    ("3e-4", which YAML 1.1 reads as a string) are accepted for numeric fields."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):  # str last
            try:
                return _coerce(where, value, arg)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
        return [_coerce(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                    if f.is_integer():
                        return int(f)
                except ValueError:
                    pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    elif tp is type(None):
        if value is None:
            return None
    raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")


def _build_section(section: str, values: dict) -> Any:
    cls = _section_type(section)
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected a mapping of fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        if name not in names:
            raise _unknown(section, name)
        kwargs[name] = _coerce(f"{section}.{name}", value, hints[name])
    if section == "data":  # the default run's data shape differs from DataConfig's own defaults
        kwargs = {**dataclasses.asdict(FinetuneConfig().data), **kwargs}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # DataConfig's own checks name their field
        raise ConfigError(str(exc)) from exc


def from_dict(tree: dict | None) -> FinetuneConfig:
    tree = tree or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"a recipe is a mapping of sections ({', '.join(SECTIONS)}), got {type(tree).__name__}")
    sections = {}
    for section, values in tree.items():
        if section not in SECTIONS:
            owners = _all_fields().get(section)
            if owners:
                raise ConfigError(f"{section}: not a section; did you mean {owners[0]}.{section}?")
            raise _unknown("", section)
        sections[section] = _build_section(section, values or {})
    return FinetuneConfig(**sections)


def parse_overrides(args: list[str]) -> dict:
    """`--section.field=value` (or `--section.field value`) -> a nested dict; values parsed as YAML."""
    import yaml

    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"{arg!r}: overrides look like --section.field=value (e.g. --optim.lr=1e-4)")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg}: no value; write --{key}=VALUE")
            raw, i = args[i + 1], i + 1
        section, _, name = key.partition(".")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        tree.setdefault(section, {})[name] = value
        i += 1
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def load_config(recipe: str | pathlib.Path | dict | None = None, overrides: list[str] | dict | None = None) -> FinetuneConfig:
    """A checked FinetuneConfig from a YAML recipe (path or dict; None: the built-in default) and
    overrides (`["--optim.lr=1e-4", ...]` or a nested dict)."""
    import yaml

    if recipe is None:
        tree: dict = {}
    elif isinstance(recipe, dict):
        tree = recipe
    else:
        path = pathlib.Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} not found; give a YAML file (see examples/)")
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a recipe is a mapping of sections ({', '.join(SECTIONS)})")
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        tree = _merge(tree, extra)
    return validate(from_dict(tree))


def to_yaml(config: FinetuneConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)


# -- combinations ------------------------------------------------------------------------------

def validate(config: FinetuneConfig) -> FinetuneConfig:
    """Checks that need more than one field, and value ranges. Raises ConfigError naming the field."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            raise ConfigError(f"{key}={value!r}: use one of {', '.join(map(repr, choices))}")
    m, t, o, d, c, lo, data = (config.model, config.train, config.optim, config.distributed, config.checkpoint,
                               config.logging, config.data)
    if m.name is None and m.config is None:
        m.config = dict(DEFAULT_TINY_MODEL)
    if m.dtype == "float64" and t.precision != "fp32":
        raise ConfigError(f"model.dtype=float64 (a reference run) needs train.precision=fp32, not {t.precision!r}: "
                          "bf16 autocast would undo what float64 weights are for")
    if m.name is not None and m.config is not None:
        raise ConfigError("model.name and model.config are both set: give a pretrained model (name) or a config "
                          "to build with random weights, not both")
    if m.config is not None and "model_type" not in m.config:
        raise ConfigError("model.config needs a model_type (e.g. llama, qwen3, gemma3_text, mistral)")
    if m.tiled_mlp not in ("off", "auto") and not (isinstance(m.tiled_mlp, int) and m.tiled_mlp >= 1):
        raise ConfigError(f"model.tiled_mlp={m.tiled_mlp!r}: use 'off', 'auto' or a number of tokens per chunk (>= 1)")
    if m.patch_options:
        from fastft.patching import OPTIONS

        unknown = sorted(set(m.patch_options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"model.patch_options: unknown option(s) {unknown}; the options are {list(OPTIONS)}")
        for name, value in m.patch_options.items():
            if not isinstance(value, bool):
                raise ConfigError(f"model.patch_options.{name}={value!r}: must be true or false "
                                  "(LoRA adapters are configured in the lora section)")
    positive = {"train.max_steps": t.max_steps, "lora.r": config.lora.r, "logging.log_every": lo.log_every,
                "checkpoint.keep": c.keep, "distributed.checkpoint_every": d.checkpoint_every}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value}: must be >= 1")
    if t.run_steps is not None and t.run_steps < 1:
        raise ConfigError(f"train.run_steps={t.run_steps}: must be >= 1, or null to run to train.max_steps")
    for key, value in {"train.eval_every": t.eval_every, "train.eval_batches": t.eval_batches,
                       "train.eval_generate": t.eval_generate, "checkpoint.every": c.every,
                       "optim.warmup_steps": o.warmup_steps or 0}.items():
        if value < 0:
            raise ConfigError(f"{key}={value}: must be >= 0")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr}: must be > 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas={o.betas}: two numbers in [0, 1), e.g. [0.9, 0.95]")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio}: must be in [0, 1]")
    if o.warmup_steps is not None and o.warmup_steps > t.max_steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} is more than train.max_steps={t.max_steps}: "
                          "lower the warm-up or train longer")
    if o.grad_clip is not None and o.grad_clip <= 0:
        raise ConfigError(f"optim.grad_clip={o.grad_clip}: must be > 0, or null for no clipping")
    if t.global_batch_tokens is not None and t.global_batch_rows is not None:
        raise ConfigError("train.global_batch_tokens and train.global_batch_rows are both set: give one")
    if t.global_batch_tokens is not None and data.batching == "padded":
        raise ConfigError("train.global_batch_tokens needs data.batching 'packed' or 'flat' (fixed token slots); "
                          "with padded batches use train.global_batch_rows")
    if t.global_batch_rows is not None and data.batching == "flat":
        raise ConfigError("train.global_batch_rows does not apply to data.batching='flat' (one row of "
                          "data.token_budget tokens per micro-batch): use train.global_batch_tokens")
    if t.eval_generate and data.format != "squad":
        raise ConfigError("train.eval_generate > 0 scores SQuAD EM/F1 and needs data.format='squad'; "
                          "set train.eval_generate=0 for other data")
    if d.fsdp is False and (d.cpu_offload or not d.reshard_after_forward):
        raise ConfigError("distributed.cpu_offload / distributed.reshard_after_forward are FSDP2 options: "
                          "they need distributed.fsdp=true (or null with several processes)")
    if d.expert_parallel < 1:
        raise ConfigError(f"distributed.expert_parallel={d.expert_parallel}: must be >= 1 (1: no expert parallelism)")
    if d.expert_parallel > 1:
        if d.fsdp is False:
            raise ConfigError("distributed.expert_parallel > 1 runs on FSDP2 (the dense gradients are reduced by it): "
                              "leave distributed.fsdp unset or true")
        if d.load != "every_rank":
            raise ConfigError("distributed.expert_parallel > 1 needs distributed.load=every_rank (each rank loads the "
                              "model and keeps its experts; the rank-0 broadcast does not split experts)")
        if c.every or c.resume or c.resume_from or c.export:
            raise ConfigError("distributed.expert_parallel > 1: checkpoints and the export of split experts are not "
                              "written yet; set checkpoint.every=0 and checkpoint.export=false (and no resume)")
    if d.compile:
        import os

        if os.environ.get("TRITON_INTERPRET") == "1":
            raise ConfigError("distributed.compile=true cannot run under the Triton interpreter "
                              "(TRITON_INTERPRET=1: dynamo cannot trace the kernels); unset one of them")
    if c.resume and c.resume_from:
        raise ConfigError("checkpoint.resume and checkpoint.resume_from are both set: resume_from names the "
                          "checkpoint, resume finds the newest in logging.run_dir; give one")
    return config


__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "DistributedConfig", "FinetuneConfig", "LoggingConfig",
    "LoraConfig", "ModelConfig", "OptimConfig", "TrainConfig", "from_dict", "load_config", "parse_overrides",
    "to_yaml", "validate",
]
