"""RMSNorm and LayerNorm kernels against their references (tests/numerics.py's rule, factor 2)."""

import pytest
import torch

from fastft.kernels.layer_norm import layer_norm, layer_norm_reference
from fastft.kernels.rms_norm import rms_norm, rms_norm_reference
from numerics import assert_within_eager, check_against_reference, producer

DTYPES = [torch.float32, torch.bfloat16]
# Leading shapes include a single row; hidden sizes include non powers of two and the extremes
# of the supported range (64 and 32768) with few rows, to keep the interpreter quick.
SHAPES = [(1, 64), (3, 5, 96), (7, 1000), (2, 4096), (2, 32768)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("casting,offset", [("llama", 0.0), ("gemma", 1.0), ("none", 0.0)])
def test_rms_norm_matches_reference(shape, dtype, casting, offset, device):
    hidden = shape[-1]
    inputs = {"x": torch.randn(shape) * 3, "weight": torch.rand(hidden) + 0.5}
    check_against_reference(rms_norm, rms_norm_reference, inputs, dtype, device,
                            kwargs={"eps": 1e-6, "offset": offset, "casting": casting})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_layer_norm_matches_reference(shape, dtype, affine, device):
    hidden = shape[-1]
    inputs = {
        # an offset mean, so that centring matters
        "x": torch.randn(shape) * 2 + 3,
        "weight": torch.rand(hidden) + 0.5 if affine != "none" else None,
        "bias": torch.randn(hidden) if affine == "weight+bias" else None,
    }
    check_against_reference(layer_norm, layer_norm_reference, inputs, dtype, device, kwargs={"eps": 1e-5})


def test_layer_norm_unit_offset_is_nemotron_scale(device):
    inputs = {"x": torch.randn(4, 80), "weight": torch.randn(80) * 0.1, "bias": torch.randn(80)}
    check_against_reference(layer_norm, layer_norm_reference, inputs, torch.bfloat16, device,
                            kwargs={"eps": 1e-5, "offset": 1.0})
    check_against_reference(lambda x, weight: layer_norm(x, weight, None, 1e-5, offset=1.0),
                            lambda x, weight: torch.nn.functional.layer_norm(x, (80,), 1 + weight, None, 1e-5),
                            {"x": torch.randn(4, 80), "weight": torch.randn(80)}, torch.float32, device)


def test_rms_norm_reference_is_hf_llama_and_gemma(device):
    """Tie the references to the modules they stand for."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(3, 64, dtype=torch.bfloat16, device=device)
    llama = LlamaRMSNorm(64, eps=1e-6).to(device, torch.bfloat16)
    llama.weight.data.normal_()
    assert torch.equal(llama(x), rms_norm_reference(x, llama.weight, 1e-6, 0.0, "llama"))
    assert torch.equal(llama(x), rms_norm(x, llama.weight, 1e-6, 0.0, "llama"))
    gemma = GemmaRMSNorm(64, eps=1e-6).to(device, torch.bfloat16)
    gemma.weight.data.normal_()
    assert torch.equal(gemma(x), rms_norm_reference(x, gemma.weight, 1e-6, 1.0, "gemma"))
    truth = rms_norm_reference(x.double(), gemma.weight.double(), 1e-6, 1.0, "gemma")
    assert_within_eager("gemma", rms_norm(x, gemma.weight, 1e-6, 1.0, "gemma"), gemma(x), truth, torch.bfloat16)


def test_rms_norm_mixed_dtype_promotes_like_llama(device):
    # bf16 activations with an fp32 weight (mixed precision without autocast): fp32 out, as HF.
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
    w = torch.rand(64, device=device, requires_grad=True)
    y = rms_norm(x, w)
    assert y.dtype == torch.float32
    # llama casting rounds x̂ to x's dtype before the weight: bf16's rounding bounds the output
    assert_within_eager("y", y, rms_norm_reference(x, w), rms_norm_reference(x.double(), w.double()), torch.bfloat16)
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_non_contiguous_input_and_grad(op, device):
    base = torch.randn(96, 6, device=device)
    w = torch.rand(96, device=device)
    fn = rms_norm if op == "rms_norm" else layer_norm
    ref = rms_norm_reference if op == "rms_norm" else layer_norm_reference
    g = torch.randn(6, 192, device=device)[:, ::2]  # a sliced, non-contiguous upstream gradient
    runs = []
    for f, dtype in ((fn, torch.float32), (ref, torch.float32), (ref, torch.float64)):  # kernel, eager, truth
        x = base.to(dtype, copy=True).t().requires_grad_()  # [6, 96], last-dim stride 6
        wd = w.to(dtype, copy=True).requires_grad_()
        y = f(x, wd)
        y.backward(g if dtype == torch.float32 else g.double())
        runs.append((y.detach(), x.grad, wd.grad))
    for name, *sides in zip(("y", "dx", "dw"), *runs):
        assert_within_eager(name, *sides, torch.float32)


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_only_x_or_only_weight_requires_grad(op, device):
    fn = rms_norm if op == "rms_norm" else layer_norm
    x = torch.randn(5, 64, device=device)
    w = torch.rand(64, device=device, requires_grad=True)
    fn(x, w).square().sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    x.requires_grad_()
    w2 = torch.rand(64, device=device)
    fn(x, w2).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_empty_input(device):
    x = torch.randn(0, 64, device=device, requires_grad=True)
    w = torch.rand(64, device=device, requires_grad=True)
    y = rms_norm(x, w)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(64, device=device))


def test_kernels_take_the_triton_path(device):
    """Here (interpreter on the CPU, compiled on a GPU) the tests above exercise the kernels,
    not the reference fallback."""
    from fastft.kernels._common import use_triton

    assert use_triton(torch.ones(1, device=device))
    x = torch.randn(2, 64, device=device, requires_grad=True)
    assert "fastft_rms_norm_fwd" in producer(rms_norm(x, torch.ones(64, device=device)))
    assert "fastft_layer_norm_fwd" in producer(layer_norm(x, torch.ones(64, device=device)))


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_output_can_be_modified_in_place(op, device):
    """Models write into these outputs in place; a view returned from inside a custom op's autograd
    would make autograd refuse that (kernels/_common.py, as_rows)."""
    fn, ref = (rms_norm, rms_norm_reference) if op == "rms_norm" else (layer_norm, layer_norm_reference)
    x0, w0 = torch.randn(2, 3, 64, device=device), torch.randn(64, device=device)
    grads = []
    for f, dtype in ((fn, torch.float32), (ref, torch.float32), (ref, torch.float64)):  # kernel, eager, truth
        x, w = x0.to(dtype, copy=True).requires_grad_(), w0.to(dtype, copy=True).requires_grad_()
        y = f(x, w)
        y.mul_(2.0).add_(1.0)
        (y * y).sum().backward()
        grads.append((x.grad, w.grad))
    for name, *sides in zip(("dx", "dw"), *grads):
        assert_within_eager(name, *sides, torch.float32)


def test_bad_inputs_name_the_value_and_fix():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="casting='lama'"):
        rms_norm(x, torch.ones(64), casting="lama")
    with pytest.raises(ValueError, match=r"weight shape \(32,\).*size 64"):
        rms_norm(x, torch.ones(32))
    with pytest.raises(ValueError, match=r"bias shape \(2, 64\)"):
        layer_norm(x, torch.ones(64), torch.ones(2, 64))
    with pytest.raises(TypeError, match="float64"):
        layer_norm(x.double(), torch.ones(64, dtype=torch.float64))


def test_cpu_fallback_without_interpreter(monkeypatch):
    """Off-GPU with no interpreter, the functional API is the reference (models still run)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = torch.randn(3, 64), torch.rand(64)
    assert torch.equal(rms_norm(x, w), rms_norm_reference(x, w))
    assert torch.equal(layer_norm(x, w, None), layer_norm_reference(x, w, None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor needs a GPU here; tests/test_custom_ops.py covers aot_eager on the CPU")
def test_kernels_under_torch_compile(device):
    """The custom ops under torch.compile's default backend (inductor) on a GPU; the CPU tests of
    compile use backend="aot_eager" (tests/test_custom_ops.py)."""
    from fastft.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

    x = torch.randn(64, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(256, device=device, dtype=torch.bfloat16, requires_grad=True)
    head = torch.randn(1000, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (64,), device=device)

    def step(x, w, head):
        h = layer_norm(rms_norm(x, w), w, None)
        return fused_linear_cross_entropy(h, head, labels)

    def truth_step(x, w, head):  # the tolerance rule's truth: the references in float64
        h = layer_norm_reference(rms_norm_reference(x, w), w, None)
        return fused_linear_cross_entropy_reference(h, head, labels)

    leaves = [t.detach().double().requires_grad_() for t in (x, w, head)]
    truth = truth_step(*leaves)
    truth_grads = torch.autograd.grad(truth, leaves)
    eager = step(x, w, head)
    eager_grads = torch.autograd.grad(eager, (x, w, head))
    compiled = torch.compile(step)(x, w, head)
    compiled_grads = torch.autograd.grad(compiled, (x, w, head))
    assert_within_eager("loss", compiled, eager, truth, torch.bfloat16)
    for name, *sides in zip(("dx", "dw", "dhead"), compiled_grads, eager_grads, truth_grads):
        assert_within_eager(name, *sides, torch.bfloat16)
