"""The tolerance rule for kernel tests (DESIGN.md; flash-attention's rule).

A kernel is compared with the float64 reference ("truth"). Its relative error
    err(kernel) = ||kernel - truth|| / ||truth||
must stay within FACTOR times the error eager torch makes on the same inputs in the same dtype
(the reference run without upcasting the inputs). The eager error is floored so that an
exactly-rounded eager result does not demand the impossible: at the unit roundoff u for 16-bit
dtypes (where the output rounding dominates), and at 16·u (about 1e-6) for float32 and float64,
where the error is the summation order of the row reductions (√H·u for H up to 32768), which
differs between any two correct kernels. A wrong formula or a missed element gives errors of 1e-2
and more, far above either bound.

The same rule serves model-level comparisons (patched vs unpatched, packed vs one document at a
time, packed vs padded): "truth" is the reference computation in float64, "eager" the reference
in the tested dtype, and every output and gradient of the tested computation must be within
FACTOR x eager's error (`ModelRun`, `run_model`, `assert_runs_within_eager`). Where the model
itself rounds to float32 on the way (transformers' loss upcasts the logits with `.float()`, its
eager attention takes the softmax in float32), a float64 model is compared at float32's floor:
`precision(model)` says which.

FACTOR = 2 unless a test states another multiple and why.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import torch

FACTOR = 2.0


def rel_err(a: torch.Tensor, truth: torch.Tensor) -> float:
    a = a.double()
    truth = truth.double()
    assert torch.isfinite(a).all(), "non-finite values"
    denom = truth.norm().item()
    diff = (a - truth).norm().item()
    return diff / denom if denom > 0 else diff


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def error_floor(dtype: torch.dtype) -> float:
    return unit_roundoff(dtype) * (16 if dtype in (torch.float32, torch.float64) else 1)


def assert_within_eager(name: str, kernel: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor,
                        dtype: torch.dtype, factor: float = FACTOR) -> None:
    assert kernel.shape == truth.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(truth.shape)}"
    k_err = rel_err(kernel, truth)
    e_err = rel_err(eager, truth)
    bound = factor * max(e_err, error_floor(dtype))
    if os.environ.get("FASTFT_NUMERICS_VERBOSE"):  # margins, for tuning a test: err / bound per check
        print(f"numerics {name}: {k_err:.2e} / {bound:.2e} = {k_err / bound:.2f} (eager {e_err:.2e}, {dtype})")
    assert k_err <= bound, (
        f"{name}: rel. error {k_err:.3e} > {factor} x max(eager {e_err:.3e}, "
        f"floor {error_floor(dtype):.1e}) in {dtype}"
    )


def check_against_reference(kernel_fn, reference_fn, inputs: dict, dtype: torch.dtype, device: str, *,
                            factor: float = FACTOR, grad_names: tuple[str, ...] | None = None,
                            kwargs: dict | None = None) -> None:
    """Output and every gradient of kernel_fn(**inputs, **kwargs) against reference_fn's.

    inputs holds float tensors (any dtype) and None; each is moved to `device` and cast to `dtype`
    for the kernel and for eager, and to float64 for the truth. Gradients are taken for grad_names (default: all tensors)
    with the same random upstream gradient on all three sides. Also checks that the kernel leaves
    its inputs unchanged.
    """
    kwargs = kwargs or {}
    names = [k for k, v in inputs.items() if v is not None]
    grad_names = tuple(names if grad_names is None else grad_names)

    def leaves(cast):
        out = {}
        for k, v in inputs.items():
            if v is None:
                out[k] = None
                continue
            t = v.detach().to(device=device, dtype=cast).clone()
            out[k] = t.requires_grad_(k in grad_names)
        return out

    truth_in, eager_in, kernel_in = leaves(torch.float64), leaves(dtype), leaves(dtype)
    before = {k: v.detach().clone() for k, v in kernel_in.items() if v is not None}
    truth = reference_fn(**truth_in, **kwargs)
    eager = reference_fn(**eager_in, **kwargs)
    out = kernel_fn(**kernel_in, **kwargs)
    assert out.dtype == eager.dtype, f"output dtype {out.dtype}, eager gives {eager.dtype}"
    assert_within_eager("output", out, eager, truth, dtype, factor)
    if not grad_names:
        return
    grad_out = torch.randn(truth.shape, dtype=torch.float64, device=truth.device)
    truth.backward(grad_out)
    eager.backward(grad_out.to(eager.dtype))
    out.backward(grad_out.to(out.dtype))
    for k in grad_names:
        assert kernel_in[k].grad is not None, f"no gradient for {k}"
        assert kernel_in[k].grad.dtype == kernel_in[k].dtype, f"grad of {k} has dtype {kernel_in[k].grad.dtype}"
        assert_within_eager(f"d{k}", kernel_in[k].grad, eager_in[k].grad, truth_in[k].grad, dtype, factor)
    for k, v in before.items():
        assert torch.equal(kernel_in[k].detach(), v), f"the kernel modified its input {k}"


def producer(y):
    """The autograd node that computed y, looking through the view that restores its shape."""
    node = y.grad_fn
    while node is not None and type(node).__name__.startswith("ViewBackward"):
        node = node.next_functions[0][0]
    return type(node).__name__


# -- model-level comparisons ----------------------------------------------------------------------

@dataclasses.dataclass
class ModelRun:
    """What a model computed on one batch: the loss, optionally the logits, every parameter gradient."""

    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    logits: torch.Tensor | None = None


def run_model(model, loss_fn=None, logits_inputs: dict | None = None, **inputs) -> ModelRun:
    """Forward `inputs`, backward the loss (the model's own, or `loss_fn(output)`), and collect the
    gradients (zeroed first); with `logits_inputs`, a no-grad forward of those gives the logits."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    loss = out.loss if loss_fn is None else loss_fn(out)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    logits = None
    if logits_inputs is not None:
        with torch.no_grad():
            logits = model(**logits_inputs).logits
    return ModelRun(loss.detach(), grads, logits)


def float64_twin(model):
    """The truth for a model-level comparison: an unpatched float64 copy of `model` (eager
    experts: grouped_mm has no float64 kernel; 4-bit layers dequantized, as bitsandbytes has no
    float64 kernels)."""
    twin = copy.deepcopy(model)
    if getattr(twin, "_fastft_patch_state", None) is not None:
        import fastft

        fastft.unpatch(twin)
    from fastft import quantization

    quantization.dequantize_model(twin, torch.float64)  # 4-bit bases (QLoRA): the same values, dense
    twin = twin.to(torch.float64)
    from fastft.model import eager_experts

    eager_experts(twin.get_base_model() if hasattr(twin, "get_base_model") else twin)
    return twin


def precision(model) -> torch.dtype:
    """The dtype whose rounding bounds what `model` computes: its parameters' dtype, but never
    finer than float32 (transformers' loss and eager softmax round to float32 whatever the model)."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return torch.float32 if dtype == torch.float64 else dtype


def assert_runs_within_eager(got: ModelRun, eager: ModelRun, truth: ModelRun, dtype: torch.dtype,
                             factor: float = FACTOR, context: str = "") -> None:
    """Loss, logits (when all three have them) and every gradient of `got` within `factor` x the
    error `eager` makes against `truth`, in `dtype`'s terms (assert_within_eager)."""
    assert_within_eager(f"{context}loss", got.loss, eager.loss, truth.loss, dtype, factor)
    if got.logits is not None and eager.logits is not None and truth.logits is not None:
        assert_within_eager(f"{context}logits", got.logits, eager.logits, truth.logits, dtype, factor)
    assert set(got.grads) == set(truth.grads) == set(eager.grads) and truth.grads, (
        f"{context}gradients for different parameters: {sorted(set(got.grads) ^ set(truth.grads))}")
    for name in truth.grads:
        assert_within_eager(f"{context}d {name}", got.grads[name], eager.grads[name], truth.grads[name], dtype,
                            factor)


def assert_curves_within_eager(name: str, got, eager, truth, factor: float = FACTOR) -> None:
    """Training curves (a loss per step): `got` within `factor` x the error of `eager` (the
    reference run in float32) against `truth` (the same run in float64, `model.dtype=float64`)."""
    as_tensor = lambda xs: torch.as_tensor(xs, dtype=torch.float64)  # noqa: E731
    assert len(got) == len(eager) == len(truth), f"{name}: {len(got)}, {len(eager)}, {len(truth)} steps"
    assert_within_eager(name, as_tensor(got), as_tensor(eager), as_tensor(truth), torch.float32, factor)
