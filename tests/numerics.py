"""The tolerance rule for kernel tests (DESIGN.md; flash-attention's rule).

A kernel is compared with the float64 reference ("truth"). Its relative error
    err(kernel) = ||kernel - truth|| / ||truth||
must stay within FACTOR times the error eager torch makes on the same inputs in the same dtype
(the reference run without upcasting the inputs). The eager error is floored so that an
exactly-rounded eager result does not demand the impossible: at the unit roundoff u for 16-bit
dtypes (where the output rounding dominates), and at 16·u (about 1e-6) for float32, where the
error is the summation order of the row reductions (√H·u for H up to 32768), which differs
between any two correct kernels. A wrong formula or a missed element gives errors of 1e-2 and
more, far above either bound.

FACTOR = 2 unless a test states another multiple and why.
"""

from __future__ import annotations

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
    return unit_roundoff(dtype) * (16 if dtype == torch.float32 else 1)


def assert_within_eager(name: str, kernel: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor,
                        dtype: torch.dtype, factor: float = FACTOR) -> None:
    assert kernel.shape == truth.shape, f"{name}: shape {tuple(kernel.shape)} != {tuple(truth.shape)}"
    k_err = rel_err(kernel, truth)
    e_err = rel_err(eager, truth)
    bound = factor * max(e_err, error_floor(dtype))
    assert k_err <= bound, (
        f"{name}: kernel rel. error {k_err:.3e} > {factor} x max(eager {e_err:.3e}, "
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
