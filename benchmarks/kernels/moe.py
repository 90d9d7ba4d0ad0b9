"""Benchmark: one MoE layer (router + routed experts) at Qwen3-30B-A3B and Mixtral-8x7B shapes.

    python -m benchmarks.kernels.moe [--smoke] [--out DIR] [--modes fwd,bwd,full] [--providers ...]
                                     [--ops moe_qwen3_30b_a3b,...]

Ops (bf16, 8192 tokens, the transformers block built from the checkpoint's config; random init, so
routing is near uniform):
  moe_qwen3_30b_a3b   128 experts, top-8, H=2048, expert I=768 (norm_topk_prob)
  moe_mixtral_8x7b    8 experts, top-2, H=4096, I=14336
  moe_*_lora          the same with PEFT LoRA r=16 on both expert stacks (target_parameters),
                      experts frozen; grads for x and the adapters
Providers (the router is the model's own module in all of them):
  fastft                     the block with fastft's grouped experts (fastft.patch, moe only)
  transformers grouped_mm    config._experts_implementation = "grouped_mm" (torch's grouped GEMM)
  transformers eager         the per-expert loop ("eager")
  liger fused_moe            Liger-Kernel's LigerFusedMoEFunction on the same routing (when installed;
                             full fine-tuning only: it has no LoRA path)
Full rows record `saved_mib` (activations autograd keeps for backward) next to peak memory. The
issue's goals (H100/H200): fastft full >= 2x transformers grouped_mm, peak memory <= 0.65x.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from benchmarks import harness
from benchmarks.kernels.lora import saved_activation_bytes_or_none

N_TOKENS = 8192
SHAPES = {
    "qwen3_30b_a3b": ("qwen3_moe", dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                                        num_experts_per_tok=8, norm_topk_prob=True)),
    "mixtral_8x7b": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                                     num_experts_per_tok=2)),
}
SMOKE = {"qwen3_30b_a3b": dict(hidden_size=32, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2),
         "mixtral_8x7b": dict(hidden_size=32, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)}
ONLY_MOE = dict(rms_norm=False, layer_norm=False, cross_entropy=False, attention=False)


def moe_block(model_type: str, shape: dict, dtype, device) -> nn.Module:
    """The transformers MoE block of that architecture (found as the parent of the experts module)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **shape, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=4, vocab_size=128, router_jitter_noise=0.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layer = model.model.layers[0]
    block = next(m for m in layer.modules() if hasattr(m, "experts"))
    block.config = config  # the experts read config._experts_implementation
    return block


def _set_experts(block: nn.Module, implementation: str) -> nn.Module:
    for m in block.modules():
        if hasattr(m, "config") and hasattr(m.config, "_experts_implementation"):
            m.config._experts_implementation = implementation
    return block


def _with_lora(block: nn.Module, r: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(block, LoraConfig(r=r, lora_alpha=2 * r, target_modules=[], init_lora_weights=False,
                                             target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    return model


class _Liger(nn.Module):
    """The block's own router, then Liger's fused experts on its routing."""

    def __init__(self, block):
        super().__init__()
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

        self.block, self.fn = block, LigerFusedMoEFunction
        self.router = next(c for n, c in block.named_children() if n != "experts")

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        _, weights, index = self.router(rows)
        experts = self.block.experts
        return self.fn.apply(rows, experts.gate_up_proj, experts.down_proj, index.to(torch.int32), weights.to(x.dtype))


def providers(name: str, dtype, device, smoke: bool, lora: bool):
    """{provider: (module, trainable params)}."""
    model_type, shape = SHAPES[name]
    if smoke:
        shape = {**shape, **SMOKE[name]}
    base = moe_block(model_type, shape, dtype, device)
    out = {}
    for provider, implementation in (("fastft", "grouped_mm"), ("transformers grouped_mm", "grouped_mm"),
                                     ("transformers eager", "eager")):
        block = _set_experts(copy.deepcopy(base), implementation)
        if lora:
            block = _with_lora(block, 16 if not smoke else 4)
        if provider == "fastft":
            import fastft

            fastft.patch(block, **ONLY_MOE)
        out[provider] = (block, [p for p in block.parameters() if p.requires_grad])
    if not lora and harness.liger_available():
        try:
            liger = _Liger(copy.deepcopy(base))
            out["liger fused_moe"] = (liger, [p for p in liger.parameters() if p.requires_grad])
        except ImportError as exc:
            print(f"{name}: liger fused_moe not available ({exc})")
    return out, shape


def _pop_ops(argv) -> tuple[list[str], list[str] | None]:
    """(--ops values, the other arguments): a subset of the ops, by name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ops = None
    for i, arg in enumerate(argv):
        if arg == "--ops" or arg.startswith("--ops="):
            value = arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
            del argv[i:i + (1 if "=" in arg else 2)]
            ops = [o for o in value.split(",") if o]
            break
    return argv, ops


def main(argv=None):
    argv, ops = _pop_ops(argv)
    args = harness.parse_args("MoE layer benchmark", argv)
    rec = harness.Recorder("moe", args)
    dtype = torch.bfloat16
    tokens = 16 if args.smoke else N_TOKENS
    for name in SHAPES:
        for lora in (False, True):
            op = f"moe_{name}" + ("_lora" if lora else "")
            if ops is not None and op not in ops:
                continue
            mods, shape = providers(name, dtype, args.device, args.smoke, lora)
            experts = shape.get("num_experts", shape.get("num_local_experts"))
            inter = shape.get("moe_intermediate_size", shape.get("intermediate_size"))
            top_k = shape["num_experts_per_tok"]
            hidden = shape["hidden_size"]
            # 3 GEMMs of 2·H·I per routed slot forward (gate, up, down); backward twice that when the
            # experts train (dX and dW), once with frozen experts (LoRA: dX only, plus rank-r terms).
            fwd_flops = 6 * tokens * top_k * hidden * inter
            row_shape = dict(N=tokens, H=hidden, I=inter, E=experts, top_k=top_k)
            for provider, (module, params) in mods.items():
                if args.providers and provider not in args.providers:
                    continue
                x = torch.randn(1, tokens, hidden, dtype=dtype, device=args.device, requires_grad=True)
                saved = saved_activation_bytes_or_none(f"{op} {provider}", lambda: module(x), module)
                for mode in args.modes:
                    flops = {"fwd": fwd_flops, "bwd": fwd_flops * (1 if lora else 2),
                             "full": fwd_flops * (2 if lora else 3)}[mode]
                    extra = {"saved_mib": round(saved / 2**20, 3)} if mode == "full" and saved is not None else {}
                    harness.measure(rec, op=op, provider=provider, mode=mode, shape=row_shape, dtype=dtype,
                                    forward=lambda: module(x), grads_of=[x, *params], flops=flops, **extra)
                x.grad = None
            del mods
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print(f"wrote {rec.save()}")
    return rec.rows


if __name__ == "__main__":
    main(sys.argv[1:])
