"""Benchmark: LoRA blocks at Llama-3.1-8B shapes, fastft against PEFT and against the no-LoRA floor.

    python -m benchmarks.kernels.lora [--smoke] [--out DIR]

Ops, each over the modes fwd / bwd / full (harness.MODES), bf16, rank 16:
  lora_mlp   gated MLP (SwiGLU) H=4096, I=14336, N=8192 tokens, LoRA on gate/up/down
  lora_qkv   attention projections q [4096], k, v [1024] (GQA) of one x, LoRA on each
  qlora_mlp  the same MLP over NF4 bases (double quantization, bf16 compute), when bitsandbytes is
             installed: fastft's lora_mlp over the 4-bit weights, PEFT's 4-bit LoRA layers, and the
             4-bit base alone as the floor
  dequantize_4bit  (fwd) one [I, H] NF4 weight into bf16 with bitsandbytes' kernel, GB/s over the
             packed bytes read and the bf16 bytes written: what decides whether a Triton
             dequantization kernel could pay (kernels/dequantize_4bit.py, benchmarks/NOTES.md)
Providers:
  fastft                 fastft.kernels.lora_mlp / lora_linear_many
  peft                   PEFT's eager LoRA layers around the same nn.Linear modules
  torch.compile(peft)    the PEFT module through torch.compile (skipped in the CPU smoke run)
  no lora (frozen base)  the same block without adapters, base frozen, grads for x only: the floor
The issue's targets (H100): fastft full within 1.15x of the floor, >= 1.3x faster than peft and
faster than torch.compile(peft). Each "full" row also records `saved_mib`: the activation bytes
the autograd graph holds between forward and backward (torch.autograd.graph.saved_tensors_hooks,
unique storages, parameters excluded), which works on the CPU as well.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from benchmarks import harness
from fastft.kernels.lora import lora_linear_many
from fastft.kernels.lora_mlp import lora_mlp

FULL = dict(N=8192, H=4096, I=14336, KV=1024, r=16)
SMOKE = dict(N=64, H=64, I=128, KV=32, r=8)


def saved_activation_bytes(fn, module: nn.Module | None = None) -> int:
    """Bytes of the distinct tensors autograd saves while fn() builds its graph (parameters of
    `module` excluded: they are not activations)."""
    params = {p.data_ptr() for p in module.parameters()} if module is not None else set()
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = max(storages.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def saved_activation_bytes_or_none(label: str, fn, module: nn.Module | None = None) -> int | None:
    """saved_activation_bytes, or None (printed) when the provider fails: `measure` records the error."""
    try:
        return saved_activation_bytes(fn, module)
    except Exception as exc:  # noqa: BLE001 - recorded by measure as well
        print(f"{label}: saved bytes failed: {type(exc).__name__}: {exc}")
        return None


class MLP(nn.Module):
    def __init__(self, H, I):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(H, I, bias=False), nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class QKV(nn.Module):
    def __init__(self, H, KV):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(H, H, bias=False), nn.Linear(H, KV, bias=False), \
            nn.Linear(H, KV, bias=False)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


def _peft(module, targets, r):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(module, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets),
                           autocast_adapter_dtype=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def _layer(model, name):
    layer = getattr(model.base_model.model, name)
    return (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
            layer.lora_B["default"].weight, float(layer.scaling["default"]))


def providers(op, s, dtype, device, smoke):
    """{name: (callable x -> y, module holding its parameters, trainable params)}."""
    torch.manual_seed(0)
    if op == "lora_mlp":
        base, targets = MLP(s["H"], s["I"]), ["gate_proj", "up_proj", "down_proj"]
    else:
        base, targets = QKV(s["H"], s["KV"]), ["q_proj", "k_proj", "v_proj"]
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    floor = copy.deepcopy(base)
    peft_model = _peft(base, targets, s["r"]).to(device=device, dtype=dtype)
    lora_params = [p for p in peft_model.parameters() if p.requires_grad]
    layers = [_layer(peft_model, t) for t in targets]
    if op == "lora_mlp":
        def fastft(x):
            return lora_mlp(x, *layers, activation="silu")
    else:
        def fastft(x):
            return torch.cat(lora_linear_many(x, layers), dim=-1)
    out = {"fastft": (fastft, peft_model, lora_params), "peft": (peft_model, peft_model, lora_params)}
    compiled = harness.compiled(peft_model, smoke)
    if compiled is not None:
        out["torch.compile(peft)"] = (compiled, peft_model, lora_params)
    out["no lora (frozen base)"] = (floor, floor, [])
    return out


def qlora_providers(s, dtype, device):
    """{name: (x -> y, module, trainable params)} for the MLP over NF4 bases."""
    from fastft import quantization
    from fastft.patching import lora as lora_patch
    from fastft.patching.report import PatchReport

    torch.manual_seed(0)
    quant = quantization.Settings("nf4", True, dtype)
    base = MLP(s["H"], s["I"]).to(device=device, dtype=dtype).requires_grad_(False)
    floor = copy.deepcopy(base)
    quantization.quantize_model(base, quant)
    quantization.quantize_model(floor, quant)
    peft_model = _peft(base, ["gate_proj", "up_proj", "down_proj"], s["r"]).to(device=device)
    fused = copy.deepcopy(peft_model)
    lora_patch.install(fused, PatchReport("MLP"), skip=set())
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    return {"fastft": (fused, fused, params(fused)), "peft": (peft_model, peft_model, params(peft_model)),
            "no lora (4-bit base)": (floor, floor, [])}


def _dequantize_rows(rec, s, dtype, device):
    from fastft import quantization
    from fastft.kernels.dequantize_4bit import dequantize_4bit

    layer = nn.Sequential(nn.Linear(s["H"], s["I"], bias=False)).to(device=device, dtype=dtype)
    quantization.quantize_model(layer, quantization.Settings("nf4", True, dtype))
    q = quantization.quant4bit(layer[0])
    moved = quantization.parameter_bytes(layer[0].weight, layer[0]) + s["I"] * s["H"] * 2
    harness.measure(rec, op="dequantize_4bit", provider="bitsandbytes", mode="fwd",
                    shape={"I": s["I"], "H": s["H"]}, dtype=dtype, forward=lambda: dequantize_4bit(q),
                    grads_of=[], bytes_moved=moved)


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("qlora_mlp, dequantize_4bit: skipped (no bitsandbytes; pip install 'fastft[qlora]')")
        return False
    return True


def main(argv=None):
    args = harness.parse_args("LoRA MLP and attention-projection benchmark", argv)
    rec = harness.Recorder("lora", args)
    s = SMOKE if args.smoke else FULL
    dtype = torch.bfloat16
    quantized = _has_bitsandbytes()
    for op in ("lora_mlp", "lora_qkv") + (("qlora_mlp",) if quantized else ()):
        shape = {k: s[k] for k in (("N", "H", "KV", "r") if op == "lora_qkv" else ("N", "H", "I", "r"))}
        table = qlora_providers(s, dtype, args.device) if op == "qlora_mlp" else \
            providers(op, s, dtype, args.device, args.smoke)
        for name, (fn, module, params) in table.items():
            if args.providers and name not in args.providers:
                continue
            x = torch.randn(s["N"], s["H"], dtype=dtype, device=args.device, requires_grad=True)
            saved = saved_activation_bytes_or_none(f"{op} {name}", lambda: fn(x), module)
            for mode in args.modes:
                extra = {"saved_mib": round(saved / 2**20, 3)} if mode == "full" and saved is not None else {}
                harness.measure(rec, op=op, provider=name, mode=mode, shape=shape, dtype=dtype,
                                forward=lambda: fn(x), grads_of=[x, *params], **extra)
            x.grad = None
    if quantized and "fwd" in args.modes:
        _dequantize_rows(rec, s, dtype, args.device)
    print(f"wrote {rec.save()}")
    return rec.rows


if __name__ == "__main__":
    main(sys.argv[1:])
