"""fused_linear_cross_entropy vs its reference: loss and every gradient, fp32 and bf16.

truth  = the reference in float64 on the (possibly bf16-rounded) inputs upcast to fp64,
eager  = the reference on the inputs as given (what Hugging Face eager computes),
kernel = the fused op; its error must stay within FACTOR x eager's (tests/numerics.py).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import fastft.kernels.fused_linear_cross_entropy as flce
from fastft.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from numerics import FACTOR, assert_within_eager

NAMES = ("loss", "d_hidden", "d_weight", "d_bias")


def make_inputs(N, H, V, dtype, device, *, bias=False, ignore_frac=0.25):
    """Logits of std ~2, a quarter of the tokens ignored; rounded to dtype once, so that the
    fp64 truth sees exactly the inputs the kernel sees."""
    x = torch.randn(N, H, device=device).to(dtype)
    w = (torch.randn(V, H, device=device) * 2 * H**-0.5).to(dtype)
    b = (0.5 * torch.randn(V, device=device)).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), device=device)
    y[torch.rand(N, device=device) < ignore_frac] = -100
    return x, w, b, y


def run(fn, x, w, b, y, grad_out=None, **kw):
    """(loss, dx, dw[, db]) of fn, with grad_out (default 1) as the loss's gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    loss = fn(leaves[0], leaves[1], y, bias=leaves[2] if b is not None else None, **kw)
    go = torch.ones_like(loss) if grad_out is None else grad_out.to(loss.dtype)
    return [loss.detach(), *torch.autograd.grad(loss, leaves, go)]


def check(x, w, b, y, dtype, *, grad_out=None, factor=FACTOR, **kw):
    """Assert the kernel is within factor x eager's error for the loss and every gradient."""
    up = [None if t is None else t.double() for t in (x, w, b)]
    truth = run(fused_linear_cross_entropy_reference, *up, y,
                None if grad_out is None else grad_out.double(), **kw)
    eager = run(fused_linear_cross_entropy_reference, x, w, b, y, grad_out, **kw)
    kernel = run(fused_linear_cross_entropy, x, w, b, y, grad_out, **kw)
    for name, k, e, t in zip(NAMES, kernel, eager, truth):
        assert_within_eager(name, k, e, t, dtype, factor)
    return kernel


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,H,V,bias", [
    (1, 40, 37, False),        # one token, H and V not powers of two
    (37, 96, 37, True),        # small vocabulary, with bias
    (6, 40, 50257, False),     # GPT-2 vocabulary: several BLOCK_V steps with a ragged tail
    (3, 24, 151936, True),     # Qwen2 vocabulary
])
def test_shapes(N, H, V, bias, dtype, device):
    # (a lone token is never ignored: all-ignored input has its own test)
    check(*make_inputs(N, H, V, dtype, device, bias=bias, ignore_frac=0.25 if N > 1 else 0.0),
          dtype)


OPTIONS = {
    "label_smoothing": dict(label_smoothing=0.1),
    "softcap": dict(softcap=5.0),                    # Gemma 2 style final-logit soft-capping
    "softcap_30": dict(softcap=30.0),                # Gemma 2's value: tanh's series branch
    "logit_scale": dict(logit_scale=1 / 8.0),        # Granite: 1 / logits_scaling
    "z_loss": dict(z_loss=1e-3),
    "sum": dict(reduction="sum"),
    "normalizer_float": dict(normalizer=50.0),
    "normalizer_tensor": dict(normalizer=torch.tensor(50)),  # HF's num_items_in_batch
    "everything": dict(label_smoothing=0.05, softcap=4.0, logit_scale=1.5, z_loss=1e-4,
                       reduction="sum"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("option", OPTIONS)
def test_options(option, dtype, device):
    check(*make_inputs(24, 48, 300, dtype, device, bias=True), dtype, **OPTIONS[option])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_reduction_none_per_token_grad_output(dtype, device):
    # The per-token gradient is only known in backward: the logits are recomputed there.
    x, w, b, y = make_inputs(20, 40, 300, dtype, device, bias=True)
    grad_out = torch.randn(20, device=device)
    check(x, w, b, y, dtype, grad_out=grad_out, reduction="none", softcap=6.0, chunk_size=8)
    losses = fused_linear_cross_entropy(x, w, y, bias=b, reduction="none")
    assert losses.shape == (20,) and losses.dtype == torch.float32
    assert (losses[y == -100] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_grad_output_not_one(dtype, device):
    # backward of loss * 3.7: the gradients made in forward are scaled by grad_output in place.
    check(*make_inputs(24, 48, 300, dtype, device, bias=True), dtype,
          grad_out=torch.tensor(3.7, device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_several_chunks(dtype, device):
    # 5 chunks of 8 rows (the last one short) and one chunk of all 37, each by the rule (so the
    # two agree within 2 x FACTOR x eager's error). dW is accumulated chunk by chunk, which in
    # bf16 rounds it once per chunk; measured, that stays within 2x eager here.
    x, w, b, y = make_inputs(37, 48, 300, dtype, device, bias=True)
    for chunk_size in (8, 64):
        check(x, w, b, y, dtype, chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_zero_not_nan(reduction, device):
    x, w, b, y = make_inputs(9, 40, 37, torch.float32, device, bias=True, ignore_frac=1.1)
    out = run(fused_linear_cross_entropy, x, w, b, y, **dict(reduction=reduction))
    for name, t in zip(NAMES, out):
        assert (t == 0).all(), f"{name} not exactly zero: {t}"


def test_matches_torch_cross_entropy_fp64(device):
    # Ties the reference (and so the kernel's target) to torch's own definition.
    x, w, b, y = make_inputs(16, 32, 100, torch.float64, device, bias=True)
    logits = x @ w.t() + b
    # The reference and torch are two float64 formulas of one loss: they agree to summation
    # order, a few u64 = 1.1e-16 per term; 1e-12 (~10^4 u64) is far below any formula difference
    # (1e-3 and more), and float64 has no finer truth to apply the rule against.
    for kw in (dict(), dict(label_smoothing=0.2)):
        expected = F.cross_entropy(logits, y, ignore_index=-100, **kw)
        got = fused_linear_cross_entropy_reference(x, w, y, bias=b, **kw)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
        # The kernel on float64 inputs: float64 logits, the softmax and the loss in fp32; its
        # eager counterpart is the reference in fp32.
        kernel = fused_linear_cross_entropy(x, w, y, bias=b, **kw)
        eager = fused_linear_cross_entropy_reference(x.float(), w.float(), y, bias=b.float(), **kw)
        assert_within_eager(f"kernel loss {kw}", kernel, eager, expected, torch.float32)
    lse = torch.logsumexp(logits, -1)
    keep = y != -100
    z_expected = expected + 1e-3 * (lse[keep] ** 2).mean()
    torch.testing.assert_close(  # float64 formulas again: as above
        fused_linear_cross_entropy_reference(x, w, y, bias=b, label_smoothing=0.2, z_loss=1e-3),
        z_expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_items", [None, 23])
def test_matches_hf_causal_lm_loss(num_items, dtype, device):
    # The loss a patched model must reproduce: transformers' ForCausalLMLoss on full logits
    # (labels shifted left, fp32 upcast, mean or sum / num_items_in_batch). Eager is that loss
    # on the logits in dtype, the truth the same loss on float64 logits (it takes the softmax in
    # fp32 from there, so in fp32 eager is near the truth and the bound is the floor, 16 u).
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    B, T, H, V = 2, 9, 32, 120
    x = torch.randn(B, T, H, device=device).to(dtype)
    w = (torch.randn(V, H, device=device) * H**-0.5).to(dtype)
    labels = torch.randint(0, V, (B, T), device=device)
    labels[0, :3] = -100  # a prompt
    n = None if num_items is None else torch.tensor(num_items, device=device)
    eager = loss_utils.ForCausalLMLoss(x @ w.t(), labels, V, num_items_in_batch=n)
    truth = loss_utils.ForCausalLMLoss(x.double() @ w.double().t(), labels, V, num_items_in_batch=n)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    got = fused_linear_cross_entropy(x.reshape(-1, H), w, shifted, normalizer=n)
    assert_within_eager("loss", got, eager, truth, dtype)


def test_deterministic_and_inputs_unchanged(device):
    x, w, b, y = make_inputs(37, 48, 300, torch.bfloat16, device, bias=True)
    copies = [t.clone() for t in (x, w, b, y)]
    first = run(fused_linear_cross_entropy, x, w, b, y, chunk_size=8, softcap=5.0)
    second = run(fused_linear_cross_entropy, x, w, b, y, chunk_size=8, softcap=5.0)
    for name, a, c in zip(NAMES, first, second):
        assert torch.equal(a, c), f"{name} differs between two runs"
    for original, now in zip(copies, (x, w, b, y)):
        assert torch.equal(original, now), "an input was modified"


def test_retained_graph_second_backward(device):
    # The first backward hands over the gradients made in forward; a second one through a
    # retained graph must recompute them, with its own grad_output.
    x, w, b, y = make_inputs(20, 40, 100, torch.float32, device, bias=True)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = fused_linear_cross_entropy(leaves[0], leaves[1], y, bias=leaves[2], chunk_size=8)
    first = torch.autograd.grad(loss, leaves, torch.tensor(2.0), retain_graph=True)
    second = torch.autograd.grad(loss, leaves, torch.tensor(-0.5))
    go = torch.tensor(-0.5)
    truth = run(fused_linear_cross_entropy_reference, x.double(), w.double(), b.double(), y, go, chunk_size=8)
    eager = run(fused_linear_cross_entropy_reference, x, w, b, y, go, chunk_size=8)
    for name, a, c, e, t in zip(NAMES[1:], first, second, eager[1:], truth[1:]):
        assert_within_eager(f"first {name} x -0.25", a * -0.25, e, t, torch.float32)  # x -0.25: exact
        assert_within_eager(f"second {name}", c, e, t, torch.float32)


def test_kernel_path_is_taken_and_chunks_are_bounded(device):
    # Guards the other tests: under the interpreter (or on a GPU) the fused path runs, not the
    # reference fallback, and the logits buffer stays within CHUNK_BYTES whatever N.
    x, w, b, y = make_inputs(4, 16, 30, torch.float32, device)
    loss = fused_linear_cross_entropy(x, w.requires_grad_(), y)
    assert "fastft_fused_linear_cross_entropy" in type(loss.grad_fn).__name__
    assert flce._chunk_rows(8192, 128256, 2, None) == 4096  # 4096 * 128256 * 2 B = 1002 MiB
    assert flce._chunk_rows(10 ** 6, 151936, 4, None) * 151936 * 4 <= flce.CHUNK_BYTES
    assert flce._chunk_rows(3, 37, 2, None) == 3 and flce._chunk_rows(7, 10 ** 9, 4, None) == 1
    assert flce._chunk_rows(100, 37, 2, 8) == 8


def test_partial_requires_grad_and_no_grad(device):
    x, w, b, y = make_inputs(20, 40, 100, torch.float32, device, bias=True)
    head = w.clone().requires_grad_()  # frozen input, trainable head (and the reverse below)
    loss = fused_linear_cross_entropy(x, head, y, bias=b)
    (dw,) = torch.autograd.grad(loss, [head])
    # the same chunks and matmuls as with every gradient asked for: bit for bit
    torch.testing.assert_close(dw, run(fused_linear_cross_entropy, x, w, b, y)[2], rtol=0, atol=0)
    hidden = x.clone().requires_grad_()
    loss = fused_linear_cross_entropy(hidden, w, y, bias=b)
    loss.backward()
    assert hidden.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(x, w, y, bias=b), loss.detach(),
                                   rtol=0, atol=0)


def test_cpu_fallback_is_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # off-GPU, no interpreter: plain torch
    x, w, b, y = make_inputs(8, 16, 30, torch.float32, "cpu", bias=True)
    torch.testing.assert_close(fused_linear_cross_entropy(x, w, y, bias=b, z_loss=1e-3),
                               fused_linear_cross_entropy_reference(x, w, y, bias=b, z_loss=1e-3),
                               rtol=0, atol=0)


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.zeros(2, 3, 16)), r"reshape to \[-1, hidden\]"),
    (dict(w=torch.zeros(30, 15)), r"weight must be \[vocab, hidden=16\]"),
    (dict(y=torch.zeros(7, dtype=torch.long)), r"labels must have shape \[8\]"),
    (dict(y=torch.zeros(8)), r"labels must be int64.*labels.long\(\)"),
    (dict(w=torch.zeros(30, 16, dtype=torch.float64)), r"must share one floating dtype"),
    (dict(b=torch.zeros(29)), r"bias must be \[30\]"),
    (dict(reduction="avg"), r"reduction='avg'"),
    (dict(reduction="none", normalizer=4.0), r"normalizer divides a summed loss"),
    (dict(normalizer=0), r"normalizer=0 must be a positive number"),
    (dict(normalizer=torch.ones(2)), r"normalizer tensor must hold one value"),
    (dict(label_smoothing=1.5), r"label_smoothing=1.5"),
    (dict(softcap=0.0), r"softcap=0.0 must be positive"),
    (dict(z_loss=-1.0), r"z_loss=-1.0"),
    (dict(chunk_size=0), r"chunk_size=0"),
])
def test_bad_inputs_raise(change, match):
    args = dict(x=torch.zeros(8, 16), w=torch.zeros(30, 16), y=torch.zeros(8, dtype=torch.long),
                b=None)
    args.update(change)
    x, w, y, b = (args.pop(k) for k in ("x", "w", "y", "b"))
    for fn in (fused_linear_cross_entropy, fused_linear_cross_entropy_reference):
        with pytest.raises(ValueError, match=match):
            fn(x, w, y, bias=b, **args)


def test_flce_benchmark_smoke(tmp_path):
    # The benchmark script runs end to end on tiny shapes; timings are never asserted.
    from benchmarks.kernels import fused_linear_cross_entropy as bench

    bench.main(["--smoke", "--out", str(tmp_path)])
    rows = [json.loads(line) for line in
            (tmp_path / "fused_linear_cross_entropy_smoke.jsonl").read_text().splitlines()]
    seen = {(r["op"], r["provider"], r["mode"]) for r in rows}
    assert ("matmul3", "torch.matmul", "full") in seen
    trl = [] if bench.trl_chunked_loss() is None else ["trl"]  # TRL's chunked log-prob head (test extra)
    for provider in ("fastft", "torch", *trl):
        for mode in ("fwd", "bwd", "full"):
            assert ("fused_linear_cross_entropy", provider, mode) in seen
    for r in rows:
        assert "error" not in r, r
        for key in ("device", "torch", "triton", "commit", "date", "shape", "dtype"):
            assert r[key], f"missing {key}"


def test_flce_benchmark_trl_provider_computes_the_same_loss(device):
    from benchmarks.kernels import fused_linear_cross_entropy as bench

    trl_loss = bench.trl_chunked_loss()
    if trl_loss is None:
        pytest.skip("trl is not installed")
    x, w, y = bench._inputs(64, 32, 300, torch.float32, device)
    # The truth is our reference in float64 (torch_eager_loss rounds its logits to fp32).
    truth = fused_linear_cross_entropy_reference(x.detach().double(), w.detach().double(), y)
    assert_within_eager("TRL loss", trl_loss(x, w, y).detach(), bench.torch_eager_loss(x, w, y).detach(), truth,
                        torch.float32)


def test_autocast_matches_eager_autocast(device):
    # fp32 master weights under autocast: the head runs in bf16 as nn.Linear would, and the
    # gradients come back in fp32 through the casts.
    x, w, b, y = make_inputs(24, 48, 300, torch.float32, device, bias=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        kernel = run(fused_linear_cross_entropy, x, w, b, y, softcap=5.0)
        eager = run(fused_linear_cross_entropy_reference, x, w, b, y, softcap=5.0)
    assert [t.dtype for t in kernel] == [t.dtype for t in eager] == [torch.float32] * 4
    truth = run(fused_linear_cross_entropy_reference,
                *[t.to(torch.bfloat16).double() for t in (x, w, b)], y, softcap=5.0)
    for name, k, e, t in zip(NAMES, kernel, eager, truth):
        assert_within_eager(name, k, e, t, torch.bfloat16)
