"""The run's configuration: a tree of typed dataclasses, loadable from a YAML recipe and from
`--section.field=value` overrides, checked before any work is done.

    config = load_config("examples/squad_llama3.2_1b_lora.yaml", ["--optim.lr=1e-4"])
    fastft.finetune(config)

Sections: model, data (fastft.data.DataConfig), lora, optim, train, distributed, checkpoint,
logging. Every field has a default: an empty recipe is the built-in default run (a tiny Llama
built from a config, the built-in SQuAD-format data, the built-in word-level tokenizer).

Adding a field is one line and its docstring (the string under it, which `fastft train --help`
and examples/README.md's table show): `name: type = default` then a string literal on the next line saying what it does.
Choices are `Literal[...]` types, ranges pydantic's constrained types (`PositiveInt`).

Parsing and type checks are pydantic's (sections are pydantic dataclasses: lax coercion of YAML
strings such as "3e-4", unknown fields refused, errors located by field); this file only turns
its errors into one line that names the field and the fix ("train.lr: unknown field; did you mean
optim.lr?"), and checks what needs more than one field ("distributed.cpu_offload needs FSDP").
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pathlib
from typing import Annotated, Literal, Union

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, StrictBool, TypeAdapter, ValidationError
from pydantic import field_validator
from pydantic.dataclasses import dataclass

from fastft.data.recipe import SECTION, DataConfig


class ConfigError(ValueError):
    """A bad recipe or override: the message names the field and what to do."""


# The built-in default model: a 2-layer, 64-wide Llama (about 100K matmul parameters) over the
# built-in word-level tokenizer, small enough for thousands of steps in a few minutes on two CPU
# cores. Initialised at std 0.1 (about 1/sqrt(64)) rather than transformers' 0.02: at 0.02 the
# attention logits start near zero and the run sits for thousands of steps at the answers' prior
# (EM under 15 after 1,500 steps, measured) before attention learns to find the span; at 0.1 it
# copies spans within a few hundred steps.
DEFAULT_TINY_MODEL = dict(
    model_type="llama", hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
    initializer_range=0.1,
)
# The default run's data shape (DataConfig's own defaults suit real models): rows of 128 words
# (two or three stories each), 8 rows per step; answers are at most 3 words.
DEFAULT_RUN_DATA = dict(max_seq_len=128, batch_size=8, eval_max_new_tokens=8)

Fraction = Annotated[float, Field(ge=0, le=1)]
Beta = Annotated[float, Field(ge=0, lt=1)]


@dataclass(config=SECTION)
class ModelConfig:
    name: str | None = None
    """a hub name or local folder; null: build model.config with random weights"""
    config: dict | None = None
    """a transformers config as a mapping with model_type, built with random weights (when name is null; null: the built-in tiny Llama)"""
    tokenizer: str | None = None
    """a hub name or folder, "words" (the built-in data's word-level tokenizer) or "byte" (byte-level); null: the model's own, else words for the built-in data, else byte"""
    dtype: Literal["auto", "float32", "bfloat16", "float64"] = "auto"
    """weights as loaded/built: auto is bf16 for frozen LoRA bases on one GPU, fp32 otherwise; float64 for reference runs"""
    patch: bool = True
    """fastft.patch with the fused kernels (on a CPU without TRITON_INTERPRET: their torch references)"""
    patch_options: dict[str, StrictBool] = dataclasses.field(default_factory=dict)
    """passed to fastft.patch, e.g. {attention: false}"""
    trust_remote_code: bool = False
    """run the model repository's own Python code (remote-code architectures)"""
    attn_implementation: str | None = None
    """for the unpatched model (patching sets "fastft")"""
    hub_kernels: bool = False
    """transformers' hub kernels (kernels-community: rotary, activations, ...) on the layers fastft leaves alone, fetched from the hub or its cache; false: off (README, "Transformers' hub kernels")"""
    quantization: Literal["none", "nf4", "fp4"] = "none"
    """QLoRA: nf4 or fp4 freezes the linear layers in 4 bits through bitsandbytes (needs lora.enabled and pip install "fastft[qlora]"; fastft/quantization.py); none keeps them dense"""
    double_quant: bool = True
    """QLoRA: quantize the 4-bit blocks' scales too (0.37 bit a parameter less)"""
    compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """QLoRA: what the 4-bit weights dequantize into and multiply in; auto is bf16 when training in bf16, else the weights' dtype"""
    tiled_mlp: Union[Literal["off", "auto"], PositiveInt] = "off"
    """gated MLPs over chunks of tokens (fastft/patching/tiled_mlp.py): off, auto (long rows only) or tokens per chunk"""


@dataclass(config=SECTION)
class LoraConfig:
    enabled: bool = False
    """false: full fine-tuning"""
    r: PositiveInt = 16
    """the adapters' rank"""
    alpha: PositiveInt = 32
    """scale alpha / r"""
    dropout: Fraction = 0.0
    target_modules: Union[str, list[str]] = "all-linear"
    """module names, or all-linear"""
    modules_to_save: list[str] | None = None
    """modules trained in full beside the adapters"""
    target_parameters: list[str] | None = None
    """PEFT target_parameters: MoE expert stacks, e.g. [mlp.experts.gate_up_proj, mlp.experts.down_proj]"""


@dataclass(config=SECTION)
class OptimConfig:
    name: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """adamw (torch's), or bitsandbytes' AdamW with 8-bit states (paged: evicted to the host under memory pressure; one process, not FSDP2)"""
    lr: PositiveFloat = 3e-3
    """the peak learning rate, reached after the warm-up"""
    weight_decay: NonNegativeFloat = 0.0
    """AdamW's decoupled decay (not on norms and biases)"""
    betas: Annotated[list[Beta], Field(min_length=2, max_length=2)] = dataclasses.field(
        default_factory=lambda: [0.9, 0.95])
    eps: PositiveFloat = 1e-8
    fused: bool | None = None
    """fused AdamW; null: on where torch supports it for these parameters"""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """the decay after the warm-up"""
    warmup_steps: NonNegativeInt | None = None
    """linear warm-up steps; null: 5% of train.max_steps"""
    min_lr_ratio: Fraction = 0.1
    """the schedule ends at lr x min_lr_ratio"""
    grad_clip: PositiveFloat | None = 1.0
    """max global L2 norm of the gradients; null: no clipping"""


@dataclass(config=SECTION)
class TrainConfig:
    max_steps: PositiveInt = 4000
    """optimizer steps; the learning-rate schedule spans them"""
    run_steps: PositiveInt | None = None
    """stop after this many steps in this invocation (checkpoint; resume later); null: run to max_steps"""
    global_batch_tokens: PositiveInt | None = None
    """token slots per optimizer step over all ranks and micro-batches (packed/flat); accumulation = global / (micro-batch x ranks)"""
    global_batch_rows: PositiveInt | None = None
    """or rows per optimizer step (rows of data.max_seq_len packed, examples padded); both null: one micro-batch per rank"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast/params on CUDA, fp32 on CPU"""
    seed: int = 0
    eval_every: NonNegativeInt = 1000
    """steps between evaluations (0: only before and after training)"""
    eval_batches: NonNegativeInt = 8
    """validation micro-batches for the val loss (in all, shared by the ranks)"""
    eval_generate: NonNegativeInt = 200
    """questions answered by greedy generation for SQuAD EM/F1 (0: none)"""
    eval_before: bool = True
    """evaluate once before the first step"""


@dataclass(config=SECTION)
class DistributedConfig:
    fsdp: bool | None = None
    """FSDP2; null: on when there are several processes"""
    reshard_after_forward: bool = True
    """false: keep the gathered params between forward and backward (ZeRO-2-like)"""
    cpu_offload: bool = False
    """parameters, gradients and optimizer state live on the CPU (FSDP2)"""
    param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """FSDP2 MixedPrecisionPolicy: auto is bf16 on CUDA, fp32 on CPU"""
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """FSDP2 gradient reduction"""
    activation_checkpointing: Literal["none", "full", "selective", "offload"] = "none"
    """recompute every block's activations (full) or every n-th (selective); offload: full, each block's saved input in pinned host memory"""
    checkpoint_every: PositiveInt = 2
    """selective: recompute every n-th block only"""
    compile: bool = False
    """torch.compile each decoder block (inductor on a GPU, aot_eager on the CPU)"""
    backend: str | None = None
    """process-group backend; null: nccl on CUDA, gloo on CPU"""
    load: Literal["rank0", "every_rank"] = "rank0"
    """FSDP2 with several processes: rank0 loads the full model on rank 0's CPU only and broadcasts it into the shards; every_rank loads it whole on each rank"""
    timeout_minutes: PositiveInt = 30
    """collective timeout"""
    expert_parallel: PositiveInt = 1
    """MoE models: each group of this many ranks splits every MoE layer's experts (all-to-all dispatch, fastft/expert_parallel.py); 1: off. Needs FSDP2 and load=every_rank"""


@dataclass(config=SECTION)
class CheckpointConfig:
    every: NonNegativeInt = 0
    """steps between sharded checkpoints (0: none, except on SIGTERM/SIGINT)"""
    keep: PositiveInt = 2
    """complete checkpoints kept (older ones are deleted)"""
    resume: bool = False
    """continue from the newest complete checkpoint in the run folder"""
    resume_from: str | None = None
    """or from this checkpoint folder"""
    export: bool = True
    """at the end: an HF folder (full fine-tuning) or a PEFT adapter folder (LoRA)"""
    export_merged: bool = False
    """LoRA: also <run_dir>/merged, the adapter merged into a bf16 HF model (a 4-bit base dequantized)"""


@dataclass(config=SECTION)
class LoggingConfig:
    run_dir: str | None = None
    """config.yaml, metrics.jsonl, curves.png, checkpoints/, export/; null: a new runs/<YYYYmmdd-HHMMSS> per run (runs/latest points at the newest); a folder holding another run's results is refused"""
    overwrite: bool = False
    """true: a run_dir holding an earlier run's results is cleared first"""
    progress_bar: bool = True
    tensorboard: bool = True
    """TensorBoard scalars too, when the tensorboard package is installed"""
    plot: bool = True
    """draw <run_dir>/curves.png at the end (needs matplotlib)"""
    log_every: PositiveInt = 1
    """steps between metric lines"""
    quiet: bool = False
    """no start-up report (tests)"""


@dataclass(config=SECTION)
class FinetuneConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(**DEFAULT_RUN_DATA))
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    @field_validator("*", mode="before")
    @classmethod
    def _section(cls, value, info):
        """An empty section (`data:` in YAML) is all defaults; the data section starts from the
        default run's shape."""
        value = {} if value is None else value
        if info.field_name == "data" and isinstance(value, dict):
            value = {**DEFAULT_RUN_DATA, **value}
        return value

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "FinetuneConfig":
        return validate(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(FinetuneConfig)}
_TREE = TypeAdapter(FinetuneConfig)

# Names people reach for from other trainers -> the field here.
ALIASES = {"learning_rate": "optim.lr", "lr": "optim.lr", "steps": "train.max_steps", "num_steps": "train.max_steps",
           "max_grad_norm": "optim.grad_clip", "clip_grad": "optim.grad_clip", "warmup": "optim.warmup_steps",
           "micro_batch_size": "data.batch_size", "batch_size": "data.batch_size", "seq_len": "data.max_seq_len",
           "lora_r": "lora.r", "rank": "lora.r", "lora_alpha": "lora.alpha", "output_dir": "logging.run_dir",
           "gradient_accumulation_steps": "train.global_batch_rows (accumulation is derived from it)",
           "gradient_checkpointing": "distributed.activation_checkpointing", "bf16": "train.precision"}


_FIELDS = {section: [f.name for f in dataclasses.fields(type(value))] for section, value in vars(FinetuneConfig()).items()}


def section_fields(section: str) -> list[str]:
    return _FIELDS[section]


# -- errors: pydantic's, in one line naming the field ---------------------------------------------

def _unknown(section: str, name: str) -> str:
    """The message for an unknown section (section == "") or field, with the likeliest fix."""
    owners = [s for s in SECTIONS if name in section_fields(s)]
    if not section:
        if owners:
            return f"{name}: not a section; did you mean {owners[0]}.{name}?"
        close = difflib.get_close_matches(name, list(SECTIONS), n=1)
        return f"{name}: unknown section; " + (f"did you mean {close[0]}?" if close else
                                               f"the sections are {', '.join(SECTIONS)}")
    where = f"{section}.{name}"
    if owners:
        return f"{where}: unknown field; did you mean {owners[0]}.{name}?"
    if name in ALIASES:
        return f"{where}: unknown field; did you mean {ALIASES[name]}?"
    names = section_fields(section)
    close = difflib.get_close_matches(name, names, n=1)
    return f"{where}: unknown field; " + (f"did you mean {section}.{close[0]}?" if close else
                                          f"the fields of {section} are {', '.join(names)}")


def _where(loc: tuple) -> str:
    """"optim.lr" from pydantic's location ("optim", "lr", "float" for a union member)."""
    return ".".join(str(part) for part in loc[:2])


def _typed(tree: dict) -> FinetuneConfig:
    try:
        return _TREE.validate_python(tree)
    except ValidationError as exc:
        errors = exc.errors()
    by_field: dict[str, list[dict]] = {}
    for error in errors:
        by_field.setdefault(_where(error["loc"]), []).append(error)
    types = {f.key: f.type for f in field_docs()}
    lines = []
    for where, group in by_field.items():
        error = group[0]
        if error["type"] == "unexpected_keyword_argument":
            lines += [_unknown(".".join(str(p) for p in e["loc"][:-1]), str(e["loc"][-1])) for e in group]
        elif error["type"] == "value_error":  # a section's own check (DataConfig's) names its field
            lines.append(error["msg"].removeprefix("Value error, "))
        elif len(group) > 1 and where in types:  # one error per member of a union: say the type once
            lines.append(f"{where}={error['input']!r}: expected {types[where]}")
        else:
            path = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"][2:])
            lines.append(f"{path}={error['input']!r}: {error['msg'][0].lower()}{error['msg'][1:]}")
    raise ConfigError("; ".join(lines))


def from_dict(tree: dict | None) -> FinetuneConfig:
    """The typed tree of a recipe as a dict (unknown or mistyped fields raise ConfigError); the
    checks across fields are `validate`'s."""
    return _typed(tree or {})


# -- recipe + overrides -> the tree ----------------------------------------------------------------

def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the `--section.field[=value]` overrides with their values): the one
    place that tells them apart (argparse would take "--a.b={x: 1, y: 2}" for a positional)."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.partition("=")[0]:
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                overrides.append(argv[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def parse_overrides(args: list[str]) -> dict:
    """`--section.field=value` (or `--section.field value`) -> a nested dict; values parsed as YAML."""
    import yaml

    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.partition("=")[0]:
            raise ConfigError(f"{arg!r}: overrides look like --section.field=value (e.g. --optim.lr=1e-4)")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg}: no value; write --{key}=VALUE")
            raw, i = args[i + 1], i + 1
        section, _, name = key.partition(".")
        if "." in name:
            raise ConfigError(f"--{key}: a field is --section.field; for a mapping field write it whole, e.g. "
                              f"--{section}.{name.split('.')[0]}={{{name.split('.', 1)[1]}: VALUE, ...}}")
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


def read_recipe(path: str | pathlib.Path) -> dict:
    import yaml

    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found; give a YAML file (see examples/)")
    try:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections ({', '.join(SECTIONS)})")
    return tree


def load_config(recipe: str | pathlib.Path | dict | None = None, overrides: list[str] | dict | None = None) -> FinetuneConfig:
    """A checked FinetuneConfig from a YAML recipe (path or dict; None: the built-in default) and
    overrides (`["--optim.lr=1e-4", ...]` or a nested dict)."""
    tree = {} if recipe is None else dict(recipe) if isinstance(recipe, dict) else read_recipe(recipe)
    if overrides:
        tree = _merge(tree, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return validate(_typed(tree))


def to_yaml(config: FinetuneConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)


# -- combinations ------------------------------------------------------------------------------

def validate(config: FinetuneConfig) -> FinetuneConfig:
    """Types again (fields may have been set in Python since), then the checks that need more than
    one field. Raises ConfigError naming the field. Fills model.config with the built-in default."""
    checked = _typed(config.to_dict())
    if checked != config:  # a field set in Python to something of another type: take the checked value
        for section in SECTIONS:
            setattr(config, section, getattr(checked, section))
    m, t, o, d, c, data = config.model, config.train, config.optim, config.distributed, config.checkpoint, config.data
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
    if m.patch_options:
        from fastft.patching import OPTIONS

        unknown = sorted(set(m.patch_options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"model.patch_options: unknown option(s) {unknown}; the options are {list(OPTIONS)}")
    if o.warmup_steps is not None and o.warmup_steps > t.max_steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} is more than train.max_steps={t.max_steps}: "
                          "lower the warm-up or train longer")
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
    _validate_bitsandbytes(config)
    if c.resume and c.resume_from:
        raise ConfigError("checkpoint.resume and checkpoint.resume_from are both set: resume_from names the "
                          "checkpoint, resume finds the newest in logging.run_dir; give one")
    return config


def _validate_bitsandbytes(config: FinetuneConfig) -> None:
    """QLoRA and 8-bit optimizer combinations (fastft/quantization.py)."""
    m, o = config.model, config.optim
    if m.quantization != "none" and not config.lora.enabled:
        raise ConfigError(f"model.quantization={m.quantization!r} freezes the base in 4 bits: train LoRA adapters "
                          "over it (QLoRA) with lora.enabled=true, or use model.quantization=none")
    if config.checkpoint.export_merged and not config.lora.enabled:
        raise ConfigError("checkpoint.export_merged merges a LoRA adapter into its base: it needs lora.enabled=true "
                          "(full fine-tuning exports a whole model already)")
    needs = [f"model.quantization={m.quantization}"] if m.quantization != "none" else []
    needs += [f"optim.name={o.name}"] if o.name != "adamw" else []
    if needs:
        from fastft.quantization import require_bitsandbytes

        try:
            require_bitsandbytes(" and ".join(needs))
        except ImportError as exc:
            raise ConfigError(str(exc)) from None


# -- derived sizes: what the trainer and the planner both read --------------------------------------

def batch_plan(config: FinetuneConfig, world_size: int) -> dict:
    """Micro-batch, accumulation and global batch, from the data section and the global batch
    (a ConfigError when the global batch is not a whole number of micro-batches on every rank)."""
    data, train = config.data, config.train
    micro_rows = 1 if data.batching == "flat" else data.batch_size
    micro_tokens = data.token_budget if data.batching == "flat" else data.batch_size * data.max_seq_len
    if train.global_batch_tokens is not None:
        field, want, per = "train.global_batch_tokens", train.global_batch_tokens, micro_tokens * world_size
    elif train.global_batch_rows is not None:
        field, want, per = "train.global_batch_rows", train.global_batch_rows, micro_rows * world_size
    else:
        field, want, per = None, None, None
    if field is None:
        accumulation = 1
    else:
        if want % per or want < per:
            raise ConfigError(
                f"{field}={want} is not a multiple of one micro-batch on every rank ({per} = "
                f"{'data.batch_size x data.max_seq_len' if 'tokens' in field else 'data.batch_size'} x "
                f"{world_size} rank(s)); use e.g. {max(1, round(want / per)) * per}, or change data.batch_size"
            )
        accumulation = want // per
    return {"world_size": world_size, "micro_batch_rows": micro_rows, "micro_batch_tokens": micro_tokens,
            "accumulation": accumulation, "global_batch_rows": micro_rows * accumulation * world_size,
            "global_batch_tokens": micro_tokens * accumulation * world_size}


# -- the field reference: `fastft train --help` and examples/README.md --------------------------

@dataclasses.dataclass
class FieldDoc:
    key: str  # "optim.lr"
    type: str  # "float > 0", "int | null", "cosine | linear | constant"
    default: str  # as YAML
    doc: str


def _schema_type(prop: dict, defs: dict) -> str:
    if "$ref" in prop:
        prop = defs[prop["$ref"].rsplit("/", 1)[1]]
    if "enum" in prop:
        return " | ".join(map(str, prop["enum"]))
    if "anyOf" in prop:
        return " | ".join(_schema_type(p, defs) for p in prop["anyOf"])
    kind = {"number": "float", "integer": "int", "boolean": "bool", "string": "str", "null": "null",
            "object": "mapping"}.get(prop.get("type"), prop.get("type", "any"))
    if kind == "mapping" and isinstance(prop.get("additionalProperties"), dict):
        kind = f"mapping of {_schema_type(prop['additionalProperties'], defs)}"
    if kind == "array":
        kind = f"list[{_schema_type(prop.get('items', {}), defs)}]"
        if prop.get("minItems") is not None and prop.get("minItems") == prop.get("maxItems"):
            kind += f" of {prop['minItems']}"
    bounds = [(">", "exclusiveMinimum"), (">=", "minimum"), ("<", "exclusiveMaximum"), ("<=", "maximum")]
    limits = [f"{op} {prop[key]:g}" for op, key in bounds if key in prop]
    return kind + (f" {', '.join(limits)}" if limits else "")


def field_docs() -> list[FieldDoc]:
    """Every field of the tree, from the pydantic schema (types, choices, bounds, docstrings) and
    the default config (values)."""
    import yaml

    schema = _TREE.json_schema()
    defs = schema["$defs"]
    default = FinetuneConfig()
    docs = []
    for section, ref in schema["properties"].items():
        props = defs[ref["$ref"].rsplit("/", 1)[1]]["properties"]
        for name, prop in props.items():
            value = getattr(getattr(default, section), name)
            text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("...").strip()
            if "\n" in text:  # a string with line breaks: JSON's double-quoted form is YAML too, on one line
                text = json.dumps(value)
            docs.append(FieldDoc(f"{section}.{name}", _schema_type(prop, defs), text,
                                 " ".join(prop.get("description", "").split())))
    return docs


def help_text(width: int = 100) -> str:
    """The fields for `fastft train --help`: one entry per field, grouped by section."""
    import textwrap

    lines, section = [], None
    for f in field_docs():
        if f.key.split(".")[0] != section:
            section = f.key.split(".")[0]
            lines.append(f"\n{section}:")
        head = f"  --{f.key}  ({f.type}; default {f.default})"
        lines.append(head)
        if f.doc:
            lines += textwrap.wrap(f.doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines).lstrip("\n")


TABLE_BEGIN = "<!-- config fields: generated by `python -m fastft.config examples/README.md`; do not edit -->"
TABLE_END = "<!-- end of config fields -->"


def markdown_table() -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    rows = ["| field | type | default | what it does |", "|---|---|---|---|"]
    rows += [f"| `{f.key}` | {cell(f.type)} | `{cell(f.default)}` | {cell(f.doc)} |" for f in field_docs()]
    return "\n".join(rows)


def update_readme(path: str | pathlib.Path) -> bool:
    """Rewrite the generated field table between TABLE_BEGIN and TABLE_END; True if it changed."""
    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8")
    head, begin, rest = text.partition(TABLE_BEGIN)
    _, end, tail = rest.partition(TABLE_END)
    if not begin or not end:
        raise ValueError(f"{path}: no {TABLE_BEGIN!r} ... {TABLE_END!r} block to fill")
    new = f"{head}{TABLE_BEGIN}\n{markdown_table()}\n{TABLE_END}{tail}"
    path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    import sys

    for readme in sys.argv[1:] or ["examples/README.md"]:
        print(f"{readme}: {'updated' if update_readme(readme) else 'already current'}")


__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "DistributedConfig", "FinetuneConfig", "LoggingConfig",
    "LoraConfig", "ModelConfig", "OptimConfig", "TrainConfig", "field_docs", "from_dict", "help_text", "load_config",
    "markdown_table", "parse_overrides", "split_overrides", "to_yaml", "validate",
]
