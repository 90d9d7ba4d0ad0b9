"""QLoRA: frozen 4-bit (NF4 / FP4) bases through bitsandbytes, as fastft loads, prepares, patches,
shards, checkpoints and exports them.

bitsandbytes does the 4-bit work (quantization, its `Linear4bit` modules, dequantization on the
GPU); it is an optional extra, `pip install "fastft[qlora]"`, imported only when asked for. What
fastft adds around it:

- Loading. A pretrained model loads through transformers' own path
  (`from_pretrained(name, quantization_config=BitsAndBytesConfig(...))`). A model built from a
  config (random weights: tests, benchmarks) or on the meta device (the FSDP2 rank-0 load) is
  quantized in place by `quantize_model`: the same modules transformers converts (every plain
  nn.Linear but the output embeddings, tied and fp32-kept modules, and `llm_int8_skip_modules`)
  become bitsandbytes `Linear4bit` layers holding the same 4-bit values (tested equal).
- Preparing for training (`prepare`, reported at start-up): what PEFT's
  `prepare_model_for_kbit_training` does that training needs, and not what it does for fp16:
  every base parameter frozen; nothing upcast to fp32 (norms, embeddings and the LM head stay in
  the model dtype, since the fused kernels accumulate in fp32 anyway; the LoRA adapters, which
  train, are fp32 by PEFT's default); no `enable_input_require_grads` (it serves reentrant
  activation checkpointing, fastft's is non-reentrant). And one thing it does not do: on CPUs
  with AVX512-BF16, bitsandbytes' eval-mode forward rewrites a Linear4bit's weight in place into
  a CPU layout with its block scales rounded to bf16, through a kernel that autograd cannot
  differentiate; fastft turns that off (`keep_layout`) so that an evaluation or a patch probe
  never changes the weights being trained.
- The fused path (fastft/patching/lora.py): `quant4bit` reads a Linear4bit's packed weight and
  quantization state as the kernels' `Quant4bit`, by structure (a weight with bitsandbytes'
  `quant_state` fields), under FSDP2 too (the module keeps the state when the weight is sharded).
- FSDP2: the packed weight is a uint8 parameter [(out·in + 1) / 2, 1] that fully_shard splits
  along dim 0 like any other; MixedPrecisionPolicy never casts an integer parameter, and FSDP2
  all-gathers mixed dtypes through uint8 views. So uint8 storage shards as it is (a float storage
  dtype, FSDP1's requirement, would be cast as numbers by a param_dtype that differs from it). The
  quantization state (block scales, 1/64 of the weight's elements) stays whole on every rank; for
  the rank-0 load, `broadcast_states` sends rank 0's states to the meta-built ranks (with
  fastft.collectives.broadcast_object: this module imports collectives, never fastft.distributed).
- Memory: `parameter_bytes` gives a parameter's real size (a 4-bit weight's packed bytes plus its
  state), `bytes_4bit` the size of a planned one: for a memory planner.
- Export: `dense_weight` dequantizes a base weight, for the merged bf16 export (checkpoint.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from fastft import collectives

EXTRA = 'pip install "fastft[qlora]"'
QUANT_TYPES = ("nf4", "fp4")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require_bitsandbytes(what: str):
    """bitsandbytes, or an ImportError naming the extra that installs it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError(f"{what} needs bitsandbytes, fastft's optional extra for QLoRA and 8-bit optimizers: "
                          f"{EXTRA} (or pip install 'bitsandbytes>=0.50')") from exc
    return bitsandbytes


def wants_bitsandbytes(quantization_config) -> bool:
    """A transformers quantization config that loads through bitsandbytes (4- or 8-bit)."""
    method = getattr(quantization_config, "quant_method", None)
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
    return str(getattr(method, "value", method)) == "bitsandbytes"


class Settings(NamedTuple):
    """How a model's linear layers are quantized (fastft's config fields, as one value)."""
    quant_type: str                 # "nf4" or "fp4"
    double_quant: bool
    compute_dtype: torch.dtype
    quant_storage: torch.dtype = torch.uint8
    blocksize: int = 64             # bitsandbytes' default; transformers does not expose another

    def bitsandbytes_config(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=self.compute_dtype, bnb_4bit_quant_storage=self.quant_storage)

    def describe(self) -> str:
        return (f"{self.quant_type}{', double quant' if self.double_quant else ''}, compute "
                f"{str(self.compute_dtype).removeprefix('torch.')}, storage {str(self.quant_storage).removeprefix('torch.')}")


def settings(quantization: str, double_quant: bool, compute_dtype: str, model_dtype: torch.dtype) -> Settings:
    """Settings from the config fields (model.quantization, double_quant, compute_dtype); "auto" is
    the model's dtype (float64 reference runs quantize from float32: bitsandbytes has no float64
    kernels). Storage is uint8, which FSDP2 shards as it is (module docstring)."""
    compute = model_dtype if compute_dtype == "auto" else _DTYPES[compute_dtype]
    return Settings(quantization, double_quant, torch.float32 if compute == torch.float64 else compute)


# -- the 4-bit layers, by structure ----------------------------------------------------------------

def quant_state(base: nn.Module):
    """bitsandbytes' QuantState of a 4-bit layer: on its weight, or kept by the module when the weight
    was replaced (FSDP2's sharded and unsharded parameters are plain tensors)."""
    state = getattr(getattr(base, "weight", None), "quant_state", None)
    return state if state is not None else getattr(base, "quant_state", None)


def is_4bit(base: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (Linear4bit, LinearNF4, LinearFP4): an nn.Linear with a
    module-level quant_state slot and a compute dtype."""
    return isinstance(base, nn.Linear) and hasattr(base, "quant_state") and hasattr(base, "compute_dtype")


def is_quantized_base(base: nn.Module) -> bool:
    """Any quantized base layer (4-bit, LLM.int8, another library's): not a floating-point weight."""
    weight = getattr(base, "weight", None)
    return (is_4bit(base) or not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point
            or type(base).__module__.startswith("bitsandbytes"))


def fused_4bit_reason(base: nn.Module) -> str:
    """Why the fused LoRA kernels cannot take this 4-bit base now, or ''."""
    if not is_4bit(base):
        return (f"quantized base layer {type(base).__name__} ({type(getattr(base, 'weight', None)).__name__} weight):"
                " kept on PEFT's own path (the fused kernels take dense or bitsandbytes 4-bit weights)")
    state = quant_state(base)
    quant_type = getattr(state, "quant_type", None) or getattr(base.weight, "quant_type", None)
    if quant_type not in QUANT_TYPES:
        return f"4-bit type {quant_type!r} (not nf4/fp4): kept on PEFT"
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        return "4-bit weight in bitsandbytes' CPU inference layout (bf16 block scales): kept on PEFT"
    return ""


def weight_dtype(base: nn.Module) -> torch.dtype:
    """The dtype the layer's inputs come in: that of the weight before quantization."""
    state = quant_state(base)
    return state.dtype if state is not None else (base.compute_dtype or torch.float32)


def quant4bit(base: nn.Module, compute: torch.dtype | None = None):
    """The kernels' Quant4bit of a 4-bit layer's weight (the parameter's own tensors, detached), to
    be dequantized into `compute` (default: the layer's compute dtype, else its input dtype); None
    while the layer has no quantization state."""
    from fastft.kernels.dequantize_4bit import Quant4bit

    state = quant_state(base)
    if state is None or fused_4bit_reason(base):
        return None
    dtype = compute or base.compute_dtype or state.dtype
    nested = (state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize) if state.nested else ()
    return Quant4bit(base.weight.detach(), state.absmax, state.code, tuple(state.shape), state.blocksize,
                     state.quant_type, dtype, *nested)


def dense_weight(base: nn.Module, data: torch.Tensor | None = None, dtype=torch.float32) -> torch.Tensor:
    """A 4-bit layer's weight [out, in] in `dtype` (data: the packed weight, e.g. gathered by FSDP2)."""
    from fastft.kernels.dequantize_4bit import dequantize_4bit

    q = quant4bit(base, torch.float32)
    if q is None:
        raise ValueError(f"{type(base).__name__}: no quantization state to dequantize with")
    if data is not None:
        q = q._replace(data=data.to(q.absmax.device))
    return dequantize_4bit(q).to(dtype)


def keep_layout(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU eval-mode weight repacking on every 4-bit layer (module
    docstring); returns how many layers there are."""
    n = 0
    for module in model.modules():
        if is_4bit(module):
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def is_quantized_model(model: nn.Module) -> bool:
    return any(is_4bit(m) for m in model.modules())


# -- quantizing a built model ------------------------------------------------------------------------

def _skipped(model: nn.Module, bnb_config) -> list[str]:
    """The module names transformers' from_pretrained keeps unquantized."""
    skip = list(getattr(bnb_config, "llm_int8_skip_modules", None) or [])
    try:
        from transformers.quantizers.base import HfQuantizer

        return HfQuantizer.get_modules_to_not_convert(model, skip or None, getattr(model, "_keep_in_fp32_modules", None))
    except (ImportError, AttributeError, TypeError):  # another transformers: the output embeddings at least
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return skip + [n for n, m in model.named_modules() if m is head]


def _converted(name: str, skipped: list[str]) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        return not any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skipped)
    return should_convert_module(name, skipped)


def quantize_model(model: nn.Module, quant: Settings) -> int:
    """Replace the model's linear layers by bitsandbytes 4-bit ones in place, as from_pretrained with
    `quant.bitsandbytes_config()` would; on the meta device the layers get their packed shape
    and no state yet (broadcast_states fills it). Returns the number of layers quantized."""
    bnb = require_bitsandbytes(f"model.quantization={quant.quant_type}")
    skipped = _skipped(model, quant.bitsandbytes_config())
    n = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not _converted(name, skipped):
            continue
        weight = module.weight.detach()
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, module.bias is not None,
                                  compute_dtype=quant.compute_dtype, compress_statistics=quant.double_quant,
                                  quant_type=quant.quant_type, quant_storage=quant.quant_storage, device="meta")
        if weight.is_meta:  # the packed shape: two 4-bit values a byte
            packed = math.ceil(weight.numel() / 2 / torch.empty(0, dtype=quant.quant_storage).element_size())
            data = torch.empty(packed, 1, dtype=quant.quant_storage, device="meta")
            layer.weight = bnb.nn.Params4bit(data, requires_grad=False, blocksize=quant.blocksize,
                                             compress_statistics=quant.double_quant, quant_type=quant.quant_type,
                                             quant_storage=quant.quant_storage, module=layer, bnb_quantized=True)
        else:  # bitsandbytes quantizes a Params4bit when it is moved to a device
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=quant.blocksize,
                                             compress_statistics=quant.double_quant, quant_type=quant.quant_type,
                                             quant_storage=quant.quant_storage, module=layer).to(weight.device)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
        layer.requires_grad_(False)
        model.set_submodule(name, layer)
        n += 1
    model.is_loaded_in_4bit = True  # what PEFT reads to wrap these layers in its 4-bit LoRA layers
    keep_layout(model)
    return n


def requantize_random(model: nn.Module, generator: torch.Generator) -> int:
    """Give every 4-bit layer of a CPU model random 4-bit weights with its own settings: random
    packed values and block scales about those of a N(0, 1/in) weight, with bitsandbytes' code
    tables (what a probe of a meta-built block runs on: fastft/patching/lora.py). Drawn, not
    quantized: bitsandbytes' CPU quantization of an 8B model's MLP takes seconds a weight."""
    n = 0
    for module in model.modules():
        if not is_4bit(module):
            continue
        bnb = require_bitsandbytes("a 4-bit layer")
        old = module.weight
        blocksize, double_quant = getattr(old, "blocksize", 64), getattr(old, "compress_statistics", True)
        quant_type, storage = getattr(old, "quant_type", "nf4"), getattr(old, "quant_storage", torch.uint8)
        numel = module.out_features * module.in_features
        data = torch.randint(0, 256, (_packed_bytes(numel, storage),), dtype=torch.uint8, generator=generator)
        data = data.view(storage).reshape(-1, 1)
        state = _new_state(module, blocksize, quant_type, double_quant, module.compute_dtype or torch.float32,
                           torch.device("cpu"), generator)
        module.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=blocksize,
                                          compress_statistics=double_quant, quant_type=quant_type,
                                          quant_storage=storage, module=module, bnb_quantized=True)
        module.quant_state = state
        module.support_avx512bf16_for_cpu = False
        n += 1
    return n


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every 4-bit layer by an nn.Linear holding its dequantized values in `dtype`: the
    float64 reference runs (the same 4-bit values, in exact arithmetic as far as float64 goes)."""
    n = 0
    for name, module in list(model.named_modules()):
        if not is_4bit(module):
            continue
        linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, device="meta")
        linear.weight = nn.Parameter(dense_weight(module, dtype=dtype), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
        n += 1
    model.is_loaded_in_4bit = False
    return n


def prepare(model: nn.Module, quant: Settings | None = None) -> list[str]:
    """Ready a 4-bit model for (Q)LoRA training as the module docstring says; the start-up report's lines."""
    layers = [m for m in model.modules() if is_4bit(m)]
    if not layers:
        return []
    keep_layout(model)
    frozen = [p for m in layers for p in m.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    four_bit = sum(parameter_bytes(m.weight, m) for m in layers)
    others = {p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    kind = quant.describe() if quant is not None else layers[0].weight.quant_type
    name = lambda ds: "/".join(sorted(str(d).removeprefix("torch.") for d in ds)) or "none"  # noqa: E731
    size = f"{four_bit / 2**30:.2f} GiB" if four_bit >= 2**30 else f"{four_bit / 2**20:.2f} MiB"
    return [f"QLoRA: {len(layers)} 4-bit layers ({kind}), {size} with their quantization state; frozen",
            f"QLoRA: kept as loaded (not upcast as prepare_model_for_kbit_training would): other frozen weights "
            f"{name(others)} (the fused kernels accumulate in fp32); trained parameters {name(trained)}; input "
            "gradients not forced (activation checkpointing is non-reentrant); bitsandbytes' CPU inference "
            "repacking off"]


# -- sizes -------------------------------------------------------------------------------------------

def _state_layout(numel: int, blocksize: int = 64, double_quant: bool = True) -> dict[str, tuple[tuple, torch.dtype]]:
    """bitsandbytes' quantization state of a 4-bit weight of `numel` values, {field: (shape, dtype)}:
    the per-block absmax (fp32; double quantization: uint8 indices, with fp32 scales per 256
    blocks, a 256-entry table and the fp32 mean they were taken around) and the 16-entry code.
    bitsandbytes keeps one copy of each per layer (functional.quantize_4bit / quantize_blockwise)."""
    blocks = math.ceil(numel / blocksize)
    if not double_quant:
        return {"absmax": ((blocks,), torch.float32), "code": ((16,), torch.float32)}
    return {"absmax": ((blocks,), torch.uint8), "code": ((16,), torch.float32),
            "nested_absmax": ((math.ceil(blocks / 256),), torch.float32), "nested_code": ((256,), torch.float32),
            "offset": ((), torch.float32)}


def _state_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    return sum(math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
               for shape, dtype in _state_layout(numel, blocksize, double_quant).values())


def _packed_bytes(numel: int, storage: torch.dtype = torch.uint8) -> int:
    """Bytes of `numel` 4-bit values packed two a byte, in whole elements of the storage dtype."""
    item = torch.empty(0, dtype=storage).element_size()
    return math.ceil(math.ceil(numel / 2) / item) * item


def bytes_4bit(numel: int, blocksize: int = 64, double_quant: bool = True, storage: torch.dtype = torch.uint8) -> int:
    """Bytes of a 4-bit weight of `numel` values with its quantization state (bitsandbytes' layout):
    the packed values and _state_layout's tensors."""
    return _packed_bytes(numel, storage) + _state_bytes(numel, blocksize, double_quant)


def _new_state(module: nn.Module, blocksize: int, quant_type: str, double_quant: bool, dtype: torch.dtype,
               device: torch.device, generator: torch.Generator | None = None):
    """bitsandbytes' QuantState of a 4-bit layer's [out, in] weight quantized from `dtype`, of
    _state_layout's tensors on `device`: without values (generator None: the memory planner's fake
    tensors) or random ones (a probe's: block scales in [0.5, 1.5] x 2.5/sqrt(in), about a block of
    64 N(0, 1/in) values' absolute maximum; bitsandbytes' own code tables)."""
    from bitsandbytes import functional as F
    from bitsandbytes.functional import QuantState

    numel = module.out_features * module.in_features
    t = {k: torch.empty(shape, dtype=dt, device=device)
         for k, (shape, dt) in _state_layout(numel, blocksize, double_quant).items()}
    if generator is not None:
        scale = 2.5 / module.in_features ** 0.5
        t["code"] = F.get_4bit_type(quant_type, device=device)
        blocks = t["absmax"].shape
        if double_quant:  # absmax = nested_code[index] * nested_absmax + offset
            t["absmax"] = torch.randint(0, 256, blocks, dtype=torch.uint8, generator=generator).to(device)
            t["nested_code"] = F.create_dynamic_map().to(device)
            t["nested_absmax"].fill_(scale / 2)
            t["offset"].fill_(scale)
        else:
            t["absmax"] = (scale * (0.5 + torch.rand(blocks, generator=generator))).to(device)
    nested = (QuantState(absmax=t["nested_absmax"], code=t["nested_code"], blocksize=256, dtype=torch.float32)
              if double_quant else None)
    return QuantState(absmax=t["absmax"], shape=torch.Size([module.out_features, module.in_features]), code=t["code"],
                      blocksize=blocksize, quant_type=quant_type, dtype=dtype, offset=t.get("offset"), state2=nested)


def planned_states(model: nn.Module, quant: Settings, dtype: torch.dtype) -> int:
    """Give every 4-bit layer without a quantization state (built on the meta device, then
    materialised by the memory planner as fake tensors: fastft/planning/) a state of bitsandbytes'
    layout at its real size and without values, on its weight's device, so that the layer is
    counted at its real size and runs (fused or through bitsandbytes) as a loaded one does. `dtype`
    is the dtype the weights were quantized from (the model's). Returns the number of layers."""
    n = 0
    for module in model.modules():
        if not is_4bit(module) or quant_state(module) is not None:
            continue
        module.quant_state = _new_state(module, quant.blocksize, quant.quant_type, quant.double_quant, dtype,
                                        module.weight.device)
        if collectives.is_dtensor(module.weight):  # FSDP2: the module keeps the state, given to each unsharded weight
            module.register_forward_pre_hook(_state_to_weight)
        else:
            module.weight.quant_state = module.quant_state
        n += 1
    return n


def _state_to_weight(module: nn.Module, args) -> None:
    """What bitsandbytes' Linear4bit.forward does first when FSDP2 has swapped in an unsharded weight
    (fix_4bit_weight_quant_state_from_module), without re-wrapping the weight as a Params4bit:
    the memory planner's fake tensors cannot be (FakeTensorMode) and the bytes are the same."""
    if getattr(module.weight, "quant_state", None) is None:
        module.weight.quant_state = module.quant_state


# bitsandbytes 0.50's CUDA gemm_4bit (backends/cuda/ops.py): up to this many rows a fused kernel
# reads the 4-bit weight; past it (every training micro-batch) it dequantizes W into A's dtype,
# with fp32 block scales (twice, nested), runs F.linear and frees them.
_GEMM_4BIT_FUSED_ROWS = 1536


def gemm_4bit_workspace(op, args: tuple, kwargs: dict) -> int:
    """What one call of bitsandbytes' gemm_4bit op holds inside beyond its output, on the GPU (0
    for another op): the memory planner's count for Linear4bit's forward (fastft/planning/)."""
    if getattr(getattr(op, "_schema", None), "name", None) != "bitsandbytes::gemm_4bit":
        return 0
    names = ("A", "B", "shapeB", "absmax", "blocksize", "quant_type", "bias", "absmax_8bit")
    bound = {**dict(zip(names, args)), **kwargs}
    a, shape = bound["A"], bound["shapeB"]
    if a.numel() // a.shape[-1] <= _GEMM_4BIT_FUSED_ROWS:
        return 0
    numel = math.prod(shape)
    scales = 8 * math.ceil(numel / bound["blocksize"]) if bound.get("absmax_8bit") is not None else 0
    return numel * a.element_size() + scales


def four_bit_bytes(model: nn.Module) -> dict[str, int]:
    """The 4-bit layers of a model, and what they hold on this rank: packed weights, quantization states."""
    layers = [m for m in model.modules() if is_4bit(m)]
    local = lambda t: t.to_local() if collectives.is_dtensor(t) else t  # noqa: E731
    return {"layers": len(layers), "packed": sum(local(m.weight).numel() * m.weight.element_size() for m in layers),
            "states": sum(t.numel() * t.element_size() for t in state_tensors(model))}


# bitsandbytes 0.50's Optimizer8bit.get_state_buffer pages (cudaMallocManaged) the moments of
# parameters with at least this many elements; the blockwise scales and smaller moments are not.
_PAGED_FROM = 100_000


def paged_state_bytes(optimizer) -> int:
    """Bytes of a bitsandbytes paged optimizer's states that live in CUDA unified memory on a GPU."""
    return sum(s[k].numel() * s[k].element_size() for p, s in optimizer.state.items() if p.numel() >= _PAGED_FROM
               for k in ("state1", "state2") if torch.is_tensor(s.get(k)))


def state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The quantization states' tensors of every 4-bit layer (not parameters, but held with them)."""
    return [t for module in model.modules() if is_4bit(module) for t in _tensors_of(quant_state(module))]


def _tensors_of(state) -> list[torch.Tensor]:
    if state is None:
        return []
    out = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code, state.offset] if state.nested else [])
    return [t for t in out if isinstance(t, torch.Tensor)]


def parameter_bytes(param: torch.Tensor, module: nn.Module | None = None) -> int:
    """A parameter's real size in bytes: for a 4-bit weight (its module given, or a Params4bit), the
    packed values plus the quantization state, on any device (meta included)."""
    state = quant_state(module) if module is not None and is_4bit(module) else getattr(param, "quant_state", None)
    own = param.numel() * param.element_size()
    if state is None:
        if module is not None and is_4bit(module) and param is module.weight:  # meta: not quantized yet
            return bytes_4bit(module.in_features * module.out_features, getattr(param, "blocksize", 64),
                              bool(getattr(param, "compress_statistics", True)), param.dtype)
        return own
    return own + sum(t.numel() * t.element_size() for t in _tensors_of(state))


# -- FSDP2 rank-0 load --------------------------------------------------------------------------------

def broadcast_states(model: nn.Module, full: nn.Module | None, device: torch.device) -> int:
    """Give every 4-bit layer of a meta-built, sharded `model` the quantization state of the same
    layer of `full` (rank 0's loaded model; None on the other ranks), on `device`. Collective."""
    names = [n for n, m in model.named_modules() if is_4bit(m)]
    if not names:
        return 0
    states = None
    if full is not None:
        modules = dict(full.named_modules())
        states = {n: quant_state(modules[n]).as_dict(packed=False) for n in names}
        states = {n: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for n, s in states.items()}
    states = collectives.broadcast_object(states)
    from bitsandbytes.functional import QuantState

    for name in names:
        layer = model.get_submodule(name)
        layer.quant_state = QuantState.from_dict(dict(states[name]), device)
    return len(names)
