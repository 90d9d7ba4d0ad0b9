"""The fused ops as torch.library custom ops (kernels/_common.py, kernel_op).

- Each op is registered in the "fastft" namespace with a fake implementation and an autograd
  formula, and passes torch.library.opcheck (schema, fake tensors, autograd registration).
- torch.compile(backend="aot_eager", fullgraph=True) traces each functional API whole, forward
  and backward: the ops are opaque nodes that run eagerly inside the compiled graph, so this
  works under the Triton interpreter on the CPU, and equals eager.
- Under FakeTensorMode and on the meta device each op gives the shapes and dtypes of its outputs
  and gradients without computing anything (what a memory planner needs).
Model-level tests (a patched tiny model compiled, faked, trained with distributed.compile) are in
tests/test_compile_model.py.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastft.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from fastft.kernels.layer_norm import layer_norm
from fastft.kernels.lora import lora_dropout, lora_linear_many
from fastft.kernels.lora_mlp import lora_mlp
from fastft.kernels.moe import moe_experts
from fastft.kernels.rms_norm import rms_norm


def _rms(make):
    x, w = make(3, 5, 64, dtype=torch.bfloat16), make(64, dtype=torch.bfloat16)
    return (lambda x, w: rms_norm(x, w, 1e-6, 1.0, "gemma")), (x, w)


def _layer(make):
    x, w, b = make(6, 48), make(48), make(48)
    return (lambda x, w, b: layer_norm(x, w, b)), (x, w, b)


def _flce(make, reduction="mean"):
    x, w, b = make(10, 32), make(100, 32), make(100)
    labels = torch.randint(0, 100, (10,), device=make.device)
    labels[::3] = -100

    def fn(x, w, b):
        loss = fused_linear_cross_entropy(x, w, labels, bias=b, reduction=reduction, softcap=5.0)
        return loss if reduction != "none" else loss * torch.arange(10, dtype=loss.dtype, device=loss.device)
    return fn, (x, w, b)


def _lora_qkv(make, seeds=(3, 4, 5)):
    x = make(2, 7, 32)
    layers = [(make(o, 32).detach(), None, make(8, 32), make(o, 8), 0.5) for o in (32, 16, 16)]

    def fn(x, *params):
        triples = [params[i:i + 2] for i in range(0, len(params), 2)]
        got = lora_linear_many(x, [(w, b, a, bm, s) for (w, b, _, _, s), (a, bm) in zip(layers, triples)],
                               dropout=0.1, seeds=None if seeds is None else list(seeds))
        return torch.cat(got, dim=-1)
    return fn, (x, *[t for (_, _, a, bm, _) in layers for t in (a, bm)])


def _lora_mlp(make, seeds=(1, 2, 3), rows=9, dropout=0.1):
    x = make(rows, 32)
    gate, up, down = [(make(o, i).detach(), None, make(8, i), make(o, 8), 2.0) for o, i in ((64, 32), (64, 32), (32, 64))]

    def fn(x, ag, bg, au, bu, ad, bd):
        return lora_mlp(x, (gate[0], None, ag, bg, 2.0), (up[0], None, au, bu, 2.0), (down[0], None, ad, bd, 2.0),
                        dropout=dropout, seeds=None if seeds is None else list(seeds))
    return fn, (x, gate[2], gate[3], up[2], up[3], down[2], down[3])


def _moe(make):
    from fastft.kernels.moe import ExpertLoRA

    experts, hidden, inter, rank = 4, 16, 8, 4
    x = make(6, hidden)
    topk_idx = torch.randint(0, experts, (6, 2), device=make.device)
    topk_w = make(6, 2)
    gate_up, down = make(experts, 2 * inter, hidden), make(experts, hidden, inter)
    a, b = make(experts, rank, hidden), make(experts, 2 * inter, rank)

    def fn(x, topk_w, gate_up, down, a, b):
        return moe_experts(x, topk_idx, topk_w, gate_up, down, gate_up_lora=ExpertLoRA(a, b, 0.5))
    return fn, (x, topk_w, gate_up, down, a, b)


def _quant4bit(make, out, inp, nested):
    """A 4-bit weight with random packed values and scales (the ops do not care what they mean)."""
    from fastft.kernels.dequantize_4bit import Quant4bit

    device, blocks = make.device, -(-out * inp // 64)
    data = torch.randint(0, 256, ((out * inp + 1) // 2, 1), dtype=torch.uint8, device=device)
    code = torch.linspace(-1, 1, 16, device=device)
    if not nested:
        return Quant4bit(data, torch.rand(blocks, device=device) + 0.5, code, (out, inp), 64, "nf4", torch.float32)
    return Quant4bit(data, torch.randint(0, 256, (blocks,), dtype=torch.uint8, device=device), code, (out, inp), 64,
                     "nf4", torch.float32, torch.rand(-(-blocks // 256), device=device) + 0.5,
                     torch.linspace(-1, 1, 256, device=device), torch.tensor(0.1, device=device))


def _lora_qkv_4bit(make):
    x = make(2, 7, 64)
    layers = [(_quant4bit(make, o, 64, nested=o == 64), make(o).detach() if o == 32 else None, make(8, 64),
               make(o, 8), 0.5) for o in (64, 32)]

    def fn(x, *params):
        pairs = [params[i:i + 2] for i in range(0, len(params), 2)]
        got = lora_linear_many(x, [(w, b, a, bm, s) for (w, b, _, _, s), (a, bm) in zip(layers, pairs)],
                               dropout=0.1, seeds=[3, 4])
        return torch.cat(got, dim=-1)
    return fn, (x, *[t for (_, _, a, bm, _) in layers for t in (a, bm)])


def _lora_mlp_4bit(make):
    x = make(9, 64)
    gate, up, down = [(_quant4bit(make, o, i, nested=True), None, make(8, i), make(o, 8), 2.0)
                      for o, i in ((128, 64), (128, 64), (64, 128))]

    def fn(x, ag, bg, au, bu, ad, bd):
        return lora_mlp(x, (gate[0], None, ag, bg, 2.0), (up[0], None, au, bu, 2.0), (down[0], None, ad, bd, 2.0),
                        dropout=0.1, seeds=[1, 2, 3])
    return fn, (x, gate[2], gate[3], up[2], up[3], down[2], down[3])


def _dropout(make):
    x = make(4, 40)
    return (lambda x: lora_dropout(x, 0.25, 7)), (x,)


CASES = {"rms_norm": _rms, "layer_norm": _layer, "fused_linear_cross_entropy": _flce,
         "fused_linear_cross_entropy_none": lambda make: _flce(make, "none"), "lora_linear_qkv": _lora_qkv,
         "lora_mlp": _lora_mlp, "lora_dropout": _dropout, "moe_experts": _moe,
         # one row, no dropout: the shared rank-r product's two halves are each contiguous (no aliasing)
         "lora_mlp_one_row": lambda make: _lora_mlp(make, rows=1, dropout=0.0), "lora_linear_4bit": _lora_qkv_4bit,
         "lora_mlp_4bit": _lora_mlp_4bit}


def _maker(device="cpu"):
    def make(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, device=device).requires_grad_()
    make.device = device
    return make


def _value_and_grads(fn, inputs):
    out = fn(*inputs)
    grads = torch.autograd.grad(out.float().sum() if out.dim() else out, inputs)
    return out, grads


def test_every_fused_op_is_a_registered_custom_op():
    from torch._library.custom_ops import OPDEFS

    ours = {name.split("::")[1]: op for name, op in OPDEFS.items() if name.startswith("fastft::")}
    forward = {"rms_norm_fwd", "layer_norm_fwd", "fused_linear_cross_entropy", "lora_linear", "lora_mlp",
               "lora_dropout", "moe_experts", "lora_linear_4bit", "lora_mlp_4bit"}
    backward = {"rms_norm_bwd", "layer_norm_bwd", "fused_linear_cross_entropy_bwd", "lora_linear_bwd",
                "lora_mlp_bwd", "moe_experts_bwd", "lora_linear_4bit_bwd", "lora_mlp_4bit_bwd"}
    assert forward | backward <= set(ours)
    for name, op in ours.items():
        assert op._abstract_fn is not None, f"{name} has no fake implementation"
    for name in forward:
        assert ours[name]._backward_fn is not None, f"{name} has no autograd formula"


@pytest.mark.parametrize("name", ["rms_norm", "layer_norm", "fused_linear_cross_entropy", "lora_linear_qkv",
                                  "lora_mlp", "lora_mlp_one_row", "lora_dropout", "moe_experts", "lora_linear_4bit",
                                  "lora_mlp_4bit"])
def test_opcheck(name):
    """torch.library.opcheck on the op calls each functional API makes: schema (no hidden
    mutation or aliasing), fake tensors against the real outputs, the autograd registration."""
    from torch.utils._python_dispatch import TorchDispatchMode

    fn, inputs = CASES[name](_maker())
    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "fastft":
                calls.append((func, args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    with Record():
        fn(*inputs)
    assert calls, f"{name}: no fastft op ran"
    for op, args, kwargs in calls:
        torch.library.opcheck(op, args, kwargs, test_utils=("test_schema", "test_autograd_registration",
                                                           "test_faketensor"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_whole_equals_eager(name):
    fn, inputs = CASES[name](_maker())
    eager_out, eager_grads = _value_and_grads(fn, inputs)
    explanation = torch._dynamo.explain(fn)(*inputs)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out, grads = _value_and_grads(compiled, inputs)
    # Bit for bit: aot_eager runs the very op calls eagerly (deterministic kernels, no atomics)
    # and the glue around them (cat, casts, the sum's backward) is exact.
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["lora_linear_qkv", "lora_mlp"])
def test_dropout_seeds_drawn_inside_the_graph(name):
    """Seeds drawn by the API (draw_seed, a CPU tensor read inside the op) keep the graph whole."""
    fn, inputs = {"lora_linear_qkv": _lora_qkv, "lora_mlp": _lora_mlp}[name](_maker(), seeds=None)
    explanation = torch._dynamo.explain(fn)(*inputs)
    assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons]


@pytest.mark.parametrize("name", sorted(CASES))
def test_fake_and_meta_give_every_shape_and_dtype(name):
    torch.manual_seed(0)
    fn, inputs = CASES[name](_maker())
    out, grads = _value_and_grads(fn, inputs)
    with FakeTensorMode():
        torch.manual_seed(0)
        fake_fn, fake_inputs = CASES[name](_maker())
        fake_out, fake_grads = _value_and_grads(fake_fn, fake_inputs)
    meta_fn, meta_inputs = CASES[name](_maker("meta"))
    meta_out, meta_grads = _value_and_grads(meta_fn, meta_inputs)
    for other in ((fake_out, fake_grads), (meta_out, meta_grads)):
        assert (other[0].shape, other[0].dtype) == (out.shape, out.dtype)
        for got, want in zip(other[1], grads):
            assert (got.shape, got.dtype) == (want.shape, want.dtype)
    assert meta_out.device.type == "meta"
