"""The memory planner (fastft/planning/) against exact counts from real CPU steps.

Planned parameter, gradient and optimizer-state bytes must equal a real step's; planned
activation bytes (what the forward leaves for the backward) must be within 5% of the exact count
of a real CPU forward of the same small config (planning.measure_activations: every storage
saved for backward through torch.autograd.graph.saved_tensors_hooks, and what else the graph and
the loop hold).
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from fastft import distributed, planning as planner
from fastft.planning import __main__ as plan_cli, search, setup as plan_setup
from fastft.architectures import TINY
from fastft.config import load_config
from fastft.data import model_inputs

_SHAPE = {k: v for k, v in TINY.items() if k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads", "vocab_size")}


def _config(model_type="llama", *, lora=False, ac="none", rows=2, tokens=48, precision="bf16", patch_options=None,
            quantization="none", double_quant=True, optim="adamw", r=4, **extra):
    model = {"model_type": model_type, **_SHAPE, **extra}
    return load_config({"model": {"config": model, "patch_options": patch_options or {}, "quantization": quantization,
                                  "double_quant": double_quant},
                        "lora": {"enabled": lora, "r": r}, "optim": {"name": optim},
                        "data": {"batch_size": rows, "max_seq_len": tokens, "batching": "packed"},
                        "train": {"precision": precision},
                        "distributed": {"activation_checkpointing": ac}})


def _real_model(config, provider="hf"):
    """The planned model built for real (random weights, CPU), wrapped the same way."""
    from fastft.model import build_model

    planned, _ = plan_setup.planned_config(config, provider, None, None)
    setup = plan_setup.decide(planned, 1)
    model, _ = build_model(planned, plan_setup.tokenizer(planned), setup.weights, patch=provider == "fastft")
    d = planned.distributed
    distributed.apply_activation_checkpointing(model, d.activation_checkpointing, d.checkpoint_every)
    batch, _ = plan_setup.micro_batch(planned, provider, model.config.vocab_size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=setup.autocast)
    return model.train(), batch, autocast, setup


needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason='QLoRA and 8-bit optimizers need bitsandbytes: "fastft[qlora]"')

CASES = [
    ("llama", dict()),
    ("llama", dict(lora=True, ac="full")),
    ("qwen3", dict(ac="full", head_dim=16), "slow"),
    ("qwen3", dict(lora=True, rows=1, tokens=96, head_dim=16), "slow"),
    ("gemma3_text", dict(lora=True, head_dim=16, sliding_window=8)),
    ("mistral", dict(ac="selective", precision="fp32")),
    ("llama", dict(lora=True, quantization="nf4", num_hidden_layers=1), needs_bitsandbytes),  # HF+PEFT+bitsandbytes
]


@pytest.mark.parametrize("model_type,kw", [pytest.param(*c[:2], marks=[pytest.mark.slow if m == "slow" else m
                                                                       for m in c[2:]],
                                                        id=f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items())}")
                                           for c in CASES])
def test_planned_activations_match_saved_tensors(model_type, kw):
    config = _config(model_type, **kw)
    planned = planner.plan(config, provider="hf")
    exact = planner.measure_activations(config, provider="hf")
    assert abs(planned.activations - exact) <= 0.05 * exact, (planned.activations, exact)


FASTFT_CASES = [pytest.param("llama", dict(lora=True), id="llama-lora"),
                pytest.param("qwen3", dict(ac="full", head_dim=16), marks=pytest.mark.slow, id="qwen3-full-ac"),
                pytest.param("llama", dict(lora=True, quantization="nf4"), marks=needs_bitsandbytes, id="llama-qlora")]


@pytest.mark.parametrize("model_type,kw", FASTFT_CASES)
def test_fastft_provider_activations_match_saved_tensors(model_type, kw):
    """The fused kernels' custom ops: their fake implementations in the plan, the Triton
    interpreter in the real step (norms, the fused loss, LoRA linear and the LoRA MLP block).
    Attention stays SDPA in both here: the varlen op the plan uses (torch's) runs on CUDA only,
    so a CPU step has nothing to count against it."""
    config = _config(model_type, rows=1, tokens=32, num_hidden_layers=1, patch_options={"attention": False}, **kw)
    planned = planner.plan(config)
    assert {"rms_norm", "cross_entropy"} <= set(planned.setup["patched"])
    exact = planner.measure_activations(config, provider="fastft")
    assert abs(planned.activations - exact) <= 0.05 * exact, (planned.activations, exact)


STATE_CASES = [
    pytest.param(dict(), id="full"),
    pytest.param(dict(lora=True), id="lora"),
    pytest.param(dict(lora=True, quantization="nf4", num_hidden_layers=1), id="qlora-nf4", marks=needs_bitsandbytes),
    # r=64: A [64, 64] and B [128, 64] take bitsandbytes' 8-bit states, B [32, 64] (k, v) its fp32 ones (< 4096)
    pytest.param(dict(lora=True, quantization="fp4", double_quant=False, r=64, optim="paged_adamw_8bit",
                      num_hidden_layers=1), id="qlora-fp4-paged_adamw_8bit", marks=needs_bitsandbytes),
]


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("kw", STATE_CASES)
def test_planned_state_bytes_are_exact(kw):
    """Parameters (4-bit weights packed), buffers (with the 4-bit layers' quantization states),
    gradients and optimizer states (torch's fused AdamW, bitsandbytes' 8-bit AdamW) after a real
    CPU step of the same (quantized) model through the trainer's own optimizer, byte for byte."""
    from fastft import quantization
    from fastft.optim import build_optimizer

    config = _config(ac="full", **kw)
    planned = planner.plan(config, provider="hf")
    model, batch, autocast, setup = _real_model(config)
    planned_config, _ = plan_setup.planned_config(config, "hf", None, None)
    params, optimizer, *_ = build_optimizer(model, planned_config, setup.decision, torch.device("cpu"))
    with autocast:
        out = model(**model_inputs(batch), num_items_in_batch=batch["num_target_tokens"])
    out.loss.backward()
    optimizer.step()
    nbytes = lambda ts: sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # noqa: E731
                             for t in ts if torch.is_tensor(t)}.values())
    assert planned.state["parameters"] == nbytes(model.parameters())
    assert planned.state["buffers"] == nbytes([*model.buffers(), *quantization.state_tensors(model)])
    assert planned.state["gradients"] == nbytes(p.grad for p in params)
    assert planned.state["optimizer states"] == nbytes(v for s in optimizer.state.values() for v in s.values())
    if kw.get("quantization"):  # the base at its packed size: 4 bits a weight of the decoder layers' projections
        four_bit = [m for m in model.modules() if quantization.is_4bit(m)]
        assert sum(m.weight.numel() for m in four_bit) * 2 == sum(m.in_features * m.out_features for m in four_bit)


def _mlp_4bit_case(N=64, H=128, I=320, r=8):
    """A 4-bit LoRA MLP's op arguments (nf4, double quantization, bf16), and the same MLP dense."""
    from torch import nn

    from fastft import quantization
    from fastft.kernels.lora import flatten_projections

    torch.manual_seed(0)
    dense = [nn.Linear(i, o, bias=False).to(torch.bfloat16) for i, o in ((H, I), (H, I), (I, H))]
    quantized = nn.Sequential(*dense)
    quantization.quantize_model(quantized, quantization.settings("nf4", True, "bfloat16", torch.bfloat16))
    weights = [quantization.quant4bit(m, torch.bfloat16) for m in quantized]
    adapters = [(torch.randn(r, w.shape[1]) * 0.1, torch.randn(w.shape[0], r) * 0.1) for w in weights]
    four_bit = flatten_projections([(w, None, a, b) for w, (a, b) in zip(weights, adapters)])
    plain = [t for m, (a, b) in zip(dense, adapters) for t in (m.weight.detach(), a, b)]
    return torch.randn(N, H, dtype=torch.bfloat16), four_bit, plain, weights


def _workspace_both_ways(name: str, args: tuple) -> int:
    """The workspace of one call of fastft op `name`, measured as the planner does (its host code on
    meta copies) and asserted equal to the same host code run on the real CPU tensors under
    MemTracker (launches dropped, as the planner does), and not zero."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from fastft.kernels import _common
    from fastft.planning import workspace

    op = getattr(torch.ops.fastft, name).default
    host = _common.HOST_CODE[op._schema.name]
    tracker = MemTracker()
    tracker.track_external(*[t for t in torch.utils._pytree.tree_leaves(args) if torch.is_tensor(t)])
    with _common.recording_launches(workspace.CAPABILITY, workspace.SM_COUNT, keep=False), tracker:
        before = workspace._total(tracker.get_tracker_snapshot())
        out = host(*args)
        peak = workspace._total(tracker.get_tracker_snapshot("peak"))
    outputs = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(t) and t.numel()}
    real = peak - before - sum(outputs.values())
    measured = workspace.measure(host, op._schema, args, {})
    assert measured == real > 0, name
    return measured


@needs_bitsandbytes
def test_workspace_is_what_the_op_holds_inside():
    """An op's workspace (what a tracker, seeing outputs only, misses) is measured from the op's own
    host code on meta tensors: equal to the same host code run on real CPU tensors under torch's
    MemTracker (launches dropped, as the planner does); and over a 4-bit base the forward holds one
    dequantized weight more than dense, W_down [H, I] in bf16 with its fp32 block scales."""
    from fastft.kernels import _common

    x, (params, has_bias, meta), plain, weights = _mlp_4bit_case()
    seeds, drops, scales = torch.zeros(3, dtype=torch.int64), [0.0] * 3, [2.0] * 3
    calls = {"lora_mlp_4bit": (x, params, has_bias, meta, "silu", drops, seeds, scales),
             "lora_mlp": (x, plain, [False] * 3, "silu", drops, seeds, scales)}
    outs = {name: _common.HOST_CODE[f"fastft::{name}"](*args) for name, args in calls.items()}
    dy = torch.randn_like(x)
    needs = [True] + [t.dtype == torch.float32 and t.dim() == 2 for t in params]  # dX and the adapters
    calls["lora_mlp_4bit_bwd"] = (dy, x, *outs["lora_mlp_4bit"][1:], params, has_bias, meta, "silu", drops, seeds,
                                  scales, needs)
    measured = {name: _workspace_both_ways(name, args) for name, args in calls.items()}
    w_down = weights[2]
    dequantized = w_down.shape[0] * w_down.shape[1] * 2 + 4 * w_down.absmax.numel()
    assert measured["lora_mlp_4bit"] - measured["lora_mlp"] == dequantized


def test_moe_workspace_is_measured(monkeypatch):
    """The MoE experts op's host code routes on the device (kernels/grouped_gemm.py: route, no host read), so
    its workspace is measured like the others, forward and backward, with and without expert LoRA:
    in the forward, with the op's outputs (the fake run's picture) made before the peak: at least
    h [S, I] and the per-slot outputs ys [S, H] (alive together, and freed before the combined
    output [N, H] exists), less that output."""
    from fastft.kernels import _common, grouped_gemm
    from fastft.planning import tracking, workspace

    torch.manual_seed(0)
    n_tokens, hidden, inter, n_experts, top_k, rank = 24, 32, 16, 4, 2, 4
    x = torch.randn(n_tokens, hidden, dtype=torch.bfloat16)
    idx = torch.randint(0, n_experts, (n_tokens, top_k))
    w = torch.rand(n_tokens, top_k, dtype=torch.bfloat16)
    gate_up = torch.randn(n_experts, 2 * inter, hidden, dtype=torch.bfloat16)
    down = torch.randn(n_experts, hidden, inter, dtype=torch.bfloat16)
    factors = (torch.randn(n_experts, rank, hidden), torch.randn(n_experts, 2 * inter, rank),
               torch.randn(n_experts, rank, inter), torch.randn(n_experts, hidden, rank))
    slots, block_m = n_tokens * top_k, grouped_gemm.expert_block_m(workspace.CAPABILITY, n_tokens * top_k, n_experts)
    for loras in ((None,) * 4, tuple(f.to(torch.bfloat16) for f in factors)):
        forward = (x, idx, w, gate_up, down, *loras, "silu", "concatenated", 2.0, 2.0, 1.0, block_m)
        fwd = _workspace_both_ways("moe_experts", forward)
        assert fwd >= (slots * (inter + hidden) - n_tokens * hidden) * x.element_size()
        _, gu, xa, hd = _common.HOST_CODE["fastft::moe_experts"](*forward)
        needs = [True, True, loras[0] is None, loras[0] is None] + [loras[0] is not None] * 4
        backward = (torch.randn_like(x), x, idx, w, gate_up, down, *loras, gu, xa, hd, "silu", "concatenated",
                    2.0, 2.0, 1.0, block_m, needs)
        _workspace_both_ways("moe_experts_bwd", backward)
    # and a MoE model's plan counts it (its peak falls without it), naming no op as unmeasured
    config = _config("qwen3_moe", rows=1, tokens=32, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                     head_dim=16)
    counted = planner.plan(config)
    assert "moe" in counted.setup["patched"] and not counted.setup.get("workspace_unmeasured")
    measured = tracking.op_workspace
    monkeypatch.setattr(tracking, "op_workspace", lambda func, args, kwargs: 0 if "moe" in str(func)
                        else measured(func, args, kwargs))
    assert planner.plan(config).peak < counted.peak


class _TwoUses(torch.nn.Module):
    """One weight used twice, as a tied embedding and lm_head: its gradient is the sum of two."""

    def __init__(self, autocast: bool, vocab: int = 4096, hidden: int = 64):
        super().__init__()
        self.weight, self.autocast = torch.nn.Parameter(torch.randn(vocab, hidden)), autocast

    def forward(self, ids):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            hidden = torch.nn.functional.embedding(ids, self.weight)
            return torch.nn.functional.linear(hidden.to(torch.bfloat16) if self.autocast else hidden,
                                              self.weight).float().sum()


@pytest.mark.parametrize("autocast", [True, False])
def test_gradient_sums_are_planned_as_the_engine_makes_them(monkeypatch, autocast):
    """The autograd engine sums a tensor's two gradients in place when it can (under autocast the
    lm_head's arrives as a fresh fp32 cast: in place; without, as a view: out of place), but always
    out of place under a dispatch mode, so the tracker holds back such a sum's peak
    (tracking._is_accumulation). The engine's choice, seen by the profiler (no dispatch mode), is
    what the planned backward peak follows: one [vocab, hidden] fp32 buffer less when in place, the
    same when not."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastft.planning import tracking

    ids = torch.randint(0, 4096, (32,))
    model = _TwoUses(autocast)
    loss = model(ids)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    in_place = "aten::add_" in {e.name for e in prof.events()}
    assert in_place == autocast  # the premise: what the engine does in eager

    def backward_peak():
        Tracker, _ = tracking.trackers()
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake, fake_ids = _TwoUses(autocast), torch.randint(0, 4096, (32,))
            tracker = Tracker(fake)
            tracker.track_external(fake)
            with tracker:
                fake(fake_ids).backward()
        return tracker.phase_peaks["backward"]

    planned = backward_peak()
    monkeypatch.setattr(tracking, "_dense", lambda t: False)  # no sum taken for in place
    traced = backward_peak()  # every sum out of place, as traced
    if not in_place:
        assert traced == planned
    else:  # the traced peak is the out-of-place sum; the planned one just before it (a [tokens, hidden] apart)
        assert abs((traced - planned) - 4096 * 64 * 4) <= 32 * 64 * 4


def test_an_op_whose_host_code_cannot_run_on_meta_is_named(monkeypatch):
    """Host code that reads values (say, a count read with .item()) cannot run on meta tensors: that
    op's workspace counts as none, and the plan says so (Plan.setup["workspace_unmeasured"])."""
    from fastft.kernels import _common
    from fastft.planning import workspace

    monkeypatch.setitem(_common.HOST_CODE, "fastft::lora_dropout", lambda x, p, seed: x.sum().item())
    monkeypatch.setattr(workspace, "_MEASURED", {})
    args = (torch.zeros(4, 8), 0.1, torch.zeros(1, dtype=torch.int64))
    assert workspace.op_workspace(torch.ops.fastft.lora_dropout.default, args, {}) == 0
    assert "meta" in workspace.UNMEASURED.pop("fastft::lora_dropout")


@needs_bitsandbytes
def test_qlora_plan_counts_the_workspaces(monkeypatch):
    """The same QLoRA plan with the workspaces left out: the state is the same, the peak lower."""
    from fastft.planning import tracking

    config = _config(lora=True, quantization="nf4", rows=1, tokens=32, num_hidden_layers=1,
                     patch_options={"attention": False})
    counted = planner.plan(config)
    monkeypatch.setattr(tracking, "op_workspace", lambda func, args, kwargs: 0)
    left_out = planner.plan(config)
    assert counted.state == left_out.state and counted.activations == left_out.activations
    assert counted.peak > left_out.peak and "op workspace" not in left_out.at_peak


def test_fsdp_shards_over_a_fake_process_group():
    """Two ranks: each holds its FSDP2 shard (dim 0 split, padded to the world size)."""
    config = _config(ac="full")
    one, two = (planner.plan(config, world_size=w, provider="hf") for w in (1, 2))
    model, *_ = _real_model(config)
    shard = sum(math.ceil(p.shape[0] / 2) * p[0].numel() * p.element_size() for p in model.parameters())
    assert two.setup["fsdp"] and two.state["parameters"] == shard
    assert two.state["optimizer states"] < one.state["optimizer states"] and two.peak < one.peak


def test_offload_keeps_block_inputs_off_the_device():
    """Offloaded checkpointing: the planned activations drop by exactly every block's input."""
    full = planner.plan(_config(ac="full"), provider="hf")
    offload = planner.plan(_config(ac="offload"), provider="hf")
    per_block = 2 * 48 * _SHAPE["hidden_size"] * 4  # rows x tokens x hidden, fp32 (the embedding's output dtype)
    assert full.activations - offload.activations == _SHAPE["num_hidden_layers"] * per_block


def test_peak_is_located_and_first_step_derived():
    p = planner.plan(_config(), provider="hf")
    assert p.phase in ("forward", "backward", "optimizer") and p.where
    assert p.peak == max(p.phase_peaks.values())
    assert p.first_step_peak == max(max(p.phase_peaks["forward"], p.phase_peaks["backward"])
                                    - p.state["optimizer states"], p.phase_peaks["optimizer"])
    record = json.loads(json.dumps(p.record()))
    assert record["plan_version"] == planner.PLAN_VERSION and record["peak"] == p.peak


def test_max_context_is_the_longest_row_that_fits():
    config = _config(ac="full")
    capacity, reserve, step = 24 * 2**20, 2**20, 512
    found = planner.max_context(config, capacity=capacity, reserve=reserve, provider="hf", granularity=step,
                                start=2048)
    assert found.longest > 0 and found.longest % step == 0
    assert found.plans[found.longest].fits(capacity, reserve)
    above = planner.plan(search._row_config(config), provider="hf", rows=1, tokens=found.longest + step)
    assert not above.fits(capacity, reserve)


def test_activations_grow_linearly_with_the_row():
    lines = planner.scaling(_config(), [256, 512, 1024], provider="hf")
    assert not [line for line in lines if "faster than linear" in line], "\n".join(lines)
    total = next(line for line in lines if line.startswith("(model)"))
    assert abs(float(total.split()[-1]) - 1.0) < 0.05


def test_published_configs_build_without_the_hub():
    config = load_config("examples/squad_llama3.1_8b_lora.yaml")
    fields, source = planner.resolve_model(config)
    assert fields["hidden_size"] == 4096 and "PUBLISHED" in source


def test_cli_prints_a_plan_and_refuses_bad_input(capsys):
    from fastft.cli import main

    assert main(["plan", "--provider", "hf", "--data.max_seq_len=64", "--data.batch_size=2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "peak per GPU" in out[1] and json.loads(out[-1])["provider"] == "hf"
    assert main(["plan", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    assert plan_cli._memory("80GiB") == 80 * 2**30 and plan_cli._memory("H100") == planner.GPU_MEMORY["H100"]


@pytest.mark.parametrize("subprocess", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_trainer_stops_before_loading_when_the_plan_cannot_fit(monkeypatch, tmp_path, subprocess):
    """The preflight (on CUDA, here forced with a tiny device): it plans (as the trainer does, in
    a subprocess; in the default suite in this process, to save the start-up), stops with the
    planned alternatives, and nothing is loaded or trained."""
    import fastft
    from fastft import train

    from fastft.planning import trainer as preflight

    monkeypatch.setattr(preflight, "device_capacity", lambda device: 8 * 2**20)
    if not subprocess:
        def in_process(config, *, world_size, capacity, reserve=planner.RESERVE):
            base, rows = planner.fit_report(config, world_size=world_size, capacity=capacity, reserve=reserve)
            return json.loads(json.dumps({"plan": base.record(), "alternatives": rows}))

        monkeypatch.setattr(preflight, "plan_in_subprocess", in_process)
    loaded = []  # the trainer's next step after the preflight (the planner needs no tokenizer here)
    monkeypatch.setattr(train, "load_tokenizer", lambda *a, **k: loaded.append(1))
    config = load_config({"model": {"patch": False, "config": {"model_type": "llama", **_SHAPE}},
                          "data": {"batch_size": 4, "max_seq_len": 256},
                          "logging": {"run_dir": str(tmp_path / "run"), "quiet": True}})
    with pytest.raises(planner.PlanDoesNotFit) as info:
        fastft.finetune(config)
    message = str(info.value)
    assert not loaded
    assert "per GPU planned" in message and "--distributed.activation_checkpointing=full" in message
    assert "QLoRA" in message and "--model.quantization=nf4" in message and "GiB" in message


def _examples():
    import pathlib

    return sorted(str(p) for p in (pathlib.Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("recipe", [r for r in _examples() if any(k in r for k in ("3.2_1b_lora", "gemma3_1b_full",
                                                                                   "qwen3_8b"))],
                         ids=lambda r: r.rsplit("/", 1)[-1])
def test_example_recipes_plan_at_one_layer(recipe, monkeypatch):
    """Recipes naming hub models plan without the hub (PUBLISHED), here cut to one layer."""
    for name, fields in list(plan_setup.PUBLISHED.items()):
        monkeypatch.setitem(plan_setup.PUBLISHED, name, {**fields, "num_hidden_layers": 1})
    p = planner.plan(recipe, provider="fastft")
    assert p.peak > p.state["parameters"] > 0 and "PUBLISHED" in p.setup["source"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", _examples(), ids=lambda r: r.rsplit("/", 1)[-1])
def test_every_example_recipe_plans_on_a_cpu(recipe):
    """Every recipe in examples/ at full size, both providers where the kernels can be planned."""
    for provider in ("fastft", "hf"):
        p = planner.plan(recipe, provider=provider)
        assert p.peak > 0 and p.seconds < 600, (recipe, provider, p.seconds)
