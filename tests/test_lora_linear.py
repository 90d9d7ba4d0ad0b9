"""lora_linear against PEFT's own LoRA Linear: outputs and gradients of x, A, B (and W, b when the
base is trainable), fp32 and bf16, odd shapes, ranks 1..64, dropout with the same mask on both
sides, bias, rsLoRA. The tolerance rule of tests/numerics.py (float64 truth, eager in the dtype)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.func import functional_call

from fastft.kernels.lora import lora_dropout, lora_linear, lora_linear_many, lora_linear_reference
from fastft.kernels.lora import draw_seed
from fastft.patching import lora as lora_patch
from fastft.patching.probe import is_lora_layer
from numerics import assert_within_eager, check_against_reference


class SeededDropout(nn.Module):
    """PEFT-side dropout applying the kernels' mask for a seed drawn as the fused layer draws it."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return lora_dropout(x, self.p, draw_seed())


def use_kernel_dropout(*models, p: float) -> None:
    """Give every PEFT LoRA layer of `models` SeededDropout(p): a reference that applies the
    fused layers' masks (drawn in the same order under the same torch seed)."""
    for model in models:
        for m in model.modules():
            if is_lora_layer(m) and p > 0:
                for k in m.lora_dropout:
                    m.lora_dropout[k] = SeededDropout(p)


def peft_linear(in_f, out_f, r, bias, dropout, rslora, alpha=16):
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(in_f, out_f, bias=bias)

    model = get_peft_model(Wrap(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"],
                                              lora_dropout=dropout, use_rslora=rslora))
    return model.base_model.model.proj.train()


def _params(x, weight, lora_a, lora_b, bias):
    p = {"base_layer.weight": weight, "lora_A.default.weight": lora_a, "lora_B.default.weight": lora_b}
    if bias is not None:
        p["base_layer.bias"] = bias
    return p


CASES = [  # N, in, out, r, dropout, bias, rslora, base trainable
    (37, 50, 70, 1, 0.0, True, False, True),
    (33, 96, 65, 8, 0.2, False, True, False),
    (70, 64, 40, 16, 0.0, True, True, False),
    (20, 130, 48, 64, 0.1, True, False, True),
    (1, 7, 3, 5, 0.5, False, False, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"N{c[0]}-{c[1]}x{c[2]}-r{c[3]}-p{c[4]}{'-bias' if c[5] else ''}"
                                             f"{'-rs' if c[6] else ''}{'-trainW' if c[7] else ''}" for c in CASES])
def test_patched_peft_linear_matches_peft(case, dtype, device):
    n, in_f, out_f, r, p, bias, rslora, train_base = case
    reference = peft_linear(in_f, out_f, r, bias, p, rslora)
    if p > 0:
        reference.lora_dropout["default"] = SeededDropout(p)
    fused = copy.deepcopy(peft_linear(in_f, out_f, r, bias, p, rslora))
    assert lora_patch.static_reason(fused) == ""
    lora_patch.install_layer(fused)
    inputs = dict(x=torch.randn(n, in_f), weight=torch.randn(out_f, in_f) / in_f**0.5,
                  lora_a=torch.randn(r, in_f) / in_f**0.5, lora_b=torch.randn(out_f, r) / r**0.5,
                  bias=torch.randn(out_f) if bias else None)
    grads = ("x", "lora_a", "lora_b") + (("weight",) + (("bias",) if bias else ()) if train_base else ())

    def call(layer):
        def fn(x, **params):
            torch.manual_seed(7)  # the same dropout seed drawn on both sides
            return functional_call(layer.to(device), _params(x, **params), (x,))
        return fn

    check_against_reference(call(fused), call(reference), inputs, dtype, device, grad_names=grads)


def test_lora_linear_functional_leading_dims_and_seed(device):
    x = torch.randn(2, 5, 24, device=device, requires_grad=True)
    w, a, b = torch.randn(12, 24, device=device), torch.randn(4, 24, device=device), torch.randn(12, 4, device=device)
    y1 = lora_linear(x, w, a, b, 0.5, dropout=0.3, seed=11)
    y2 = lora_linear(x, w, a, b, 0.5, dropout=0.3, seed=11)
    y3 = lora_linear(x, w, a, b, 0.5, dropout=0.3, seed=12)
    assert y1.shape == (2, 5, 12) and torch.equal(y1, y2) and not torch.equal(y1, y3)
    eager = lora_linear_reference(x, w, a, b, 0.5, dropout=0.3, seed=11)
    truth = lora_linear_reference(*(t.double() for t in (x, w, a, b)), 0.5, dropout=0.3, seed=11)  # the same mask
    assert_within_eager("y", y1, eager, truth, torch.float32)
    keep = (lora_dropout(torch.ones(1000, 40, device=device), 0.3, 5) > 0).float().mean().item()
    assert abs(keep - 0.7) < 0.02


@pytest.mark.parametrize("lead", [(2, 3), (1, 1)], ids=["rows", "one-row"])
@pytest.mark.parametrize("op", ["lora_linear", "lora_linear_many", "lora_mlp"])
def test_outputs_can_be_modified_in_place(op, lead, device):
    """Falcon writes into its fused QKV projection's output in place; a view returned from inside
    an autograd Function would make autograd refuse that (kernels/_common.py, as_rows). One row
    (a tiled MLP's last chunk, generation): a slice of it is contiguous already, and the ops'
    outputs must still not alias one another (torch's custom-op rule)."""
    from fastft.kernels.lora_mlp import lora_mlp, lora_mlp_reference

    g = torch.Generator().manual_seed(0)

    def layer(o, i, r=4):
        return [torch.randn(o, i, generator=g).to(device) / i**0.5, None,
                torch.randn(r, i, generator=g).to(device) / i**0.5, torch.randn(o, r, generator=g).to(device), 0.5]

    x0 = torch.randn(*lead, 32, generator=g).to(device)
    layers0 = {"lora_linear": [layer(16, 32)], "lora_linear_many": [layer(16, 32), layer(8, 32)],
               "lora_mlp": [layer(24, 32), layer(24, 32), layer(32, 24)]}[op]

    def run(fused, dtype):
        """dx and every dA, on copies in dtype (A trainable)."""
        x = x0.to(dtype, copy=True).requires_grad_()
        layers = [[t if t is None or isinstance(t, float) else t.to(dtype, copy=True) for t in l_] for l_ in layers0]
        for layer_ in layers:
            layer_[2].requires_grad_()
        if op == "lora_linear":
            w, b, a, bb, s = layers[0]
            outs = [lora_linear(x, w, a, bb, s) if fused else lora_linear_reference(x, w, a, bb, s)]
        elif op == "lora_linear_many":
            outs = list(lora_linear_many(x, layers) if fused else
                        [lora_linear_reference(x, w, a, bb, s, b) for w, b, a, bb, s in layers])
        else:
            outs = [(lora_mlp if fused else lora_mlp_reference)(x, *layers, "silu")]
        for y in outs:
            y.mul_(2.0).add_(1.0)
        sum((y * y).sum() for y in outs).backward()
        return [x.grad] + [layer_[2].grad for layer_ in layers]

    # the tolerance rule: kernel, eager (the reference in fp32), truth (the reference in float64)
    for i, sides in enumerate(zip(run(True, torch.float32), run(False, torch.float32), run(False, torch.float64))):
        assert_within_eager("dx" if i == 0 else f"dA{i}", *sides, torch.float32)


@pytest.mark.parametrize("drops", [(0.0, 0.25, 0.1), (0.0, 0.0, 0.0)], ids=["dropout", "stacked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_linear_many_matches_separate_layers(dtype, drops, device):
    """q/k/v of one x with one Function (one saved x): outputs and grads as three references."""
    hidden, outs, ranks = 48, (48, 16, 24), (8, 3, 16)
    inputs = {"x": torch.randn(29, hidden)}
    for i, (o, r) in enumerate(zip(outs, ranks)):
        inputs.update({f"w{i}": torch.randn(o, hidden) / hidden**0.5, f"b{i}": torch.randn(o),
                       f"a{i}": torch.randn(r, hidden) / hidden**0.5, f"bb{i}": torch.randn(o, r)})
    seeds, scales = (0, 3, 4), (2.0, 0.5, 1.0)

    def layers(kw):
        return [(kw[f"w{i}"], kw[f"b{i}"], kw[f"a{i}"], kw[f"bb{i}"], scales[i]) for i in range(3)]

    def fused(x, **kw):  # one output for the check: the three concatenated
        return torch.cat(lora_linear_many(x, layers(kw), drops, seeds), dim=-1)

    def reference(x, **kw):
        return torch.cat([lora_linear_reference(x, w, a, bb, s, b, p, seed)
                          for (w, b, a, bb, s), p, seed in zip(layers(kw), drops, seeds)], dim=-1)

    check_against_reference(fused, reference, inputs, dtype, device,
                            grad_names=("x", "a0", "bb0", "a1", "bb1", "a2", "bb2", "b1"))


def test_errors_name_the_problem(device):
    x = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match="must be \\[r, in=8\\]"):
        lora_linear(x, torch.randn(4, 8, device=device), torch.randn(2, 7, device=device),
                    torch.randn(4, 2, device=device), 1.0)
    with pytest.raises(ValueError, match="dropout"):
        lora_linear(x, torch.randn(4, 8, device=device), torch.randn(2, 8, device=device),
                    torch.randn(4, 2, device=device), 1.0, dropout=1.0)
