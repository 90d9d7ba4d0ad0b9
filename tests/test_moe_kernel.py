"""moe_experts (the grouped-GEMM experts kernel) against the per-expert loop: the output and the
gradients of x, the routing weights, both expert stacks and the LoRA factors, fp32 and bf16 under the
tolerance rule of tests/numerics.py; odd token counts, experts that get no tokens, slots with no
expert, top-k 1 / 2 / 8, 4 to 128 experts, concatenated / interleaved / transposed layouts."""

from __future__ import annotations

import pytest
import torch

from fastft.kernels.moe import ExpertLoRA, concatenated, moe_experts, moe_experts_reference
from numerics import check_against_reference

# N tokens, H, I, E experts, top-k, LoRA rank (0: none), layout, experts forced to get no tokens
CASES = [
    (13, 32, 16, 4, 2, 0, "concatenated", ()),
    (29, 48, 24, 8, 1, 0, "concatenated", (2, 5)),
    (17, 32, 16, 6, 2, 5, "interleaved", (1,)),
    (9, 32, 16, 16, 8, 0, "concatenated", ()),
    (33, 40, 20, 5, 2, 16, "concatenated", (0,)),
]
SLOW_CASES = [
    (41, 32, 16, 128, 8, 0, "concatenated", (7,)),
    (70, 64, 48, 32, 4, 8, "interleaved", ()),
]


def _routing(n, e, k, empty):
    logits = torch.randn(n, e)
    if empty:
        logits[:, list(empty)] = float("-inf")
    return logits.topk(k, dim=-1).indices


def _inputs(n, hidden, inter, e, k, r):
    inputs = dict(x=torch.randn(n, hidden), topk_w=torch.rand(n, k), gate_up=torch.randn(e, 2 * inter, hidden) / hidden**0.5,
                  down=torch.randn(e, hidden, inter) / inter**0.5)
    if r:
        inputs.update(a_gu=torch.randn(e, r, hidden) / hidden**0.5, b_gu=torch.randn(e, 2 * inter, r) / r**0.5,
                      a_d=torch.randn(e, r, inter) / inter**0.5, b_d=torch.randn(e, hidden, r) / r**0.5)
    return inputs


def _loras(a_gu, b_gu, a_d, b_d):
    return (None if a_gu is None else ExpertLoRA(a_gu, b_gu, 0.5)), (None if a_d is None else ExpertLoRA(a_d, b_d, 2.0))


def _check_case(case, dtype, device):
    n, hidden, inter, e, k, r, layout, empty = case
    idx = _routing(n, e, k, empty).to(device)

    def kernel(x, topk_w, gate_up, down, a_gu=None, b_gu=None, a_d=None, b_d=None):
        lg, ld = _loras(a_gu, b_gu, a_d, b_d)
        return moe_experts(x, idx, topk_w, gate_up, down, gate_up_lora=lg, down_lora=ld, layout=layout)

    def reference(x, topk_w, gate_up, down, a_gu=None, b_gu=None, a_d=None, b_d=None):
        lg, ld = _loras(a_gu, b_gu, a_d, b_d)
        if layout == "interleaved":
            gate_up = concatenated(gate_up, "interleaved")
            lg = lg and ExpertLoRA(lg.a, concatenated(lg.b, "interleaved"), lg.scale)
        return moe_experts_reference(x, idx, topk_w, gate_up, down, "silu", lg, ld)

    check_against_reference(kernel, reference, _inputs(n, hidden, inter, e, k, r), dtype, device)


def _ids(cases):
    return [f"N{c[0]}-H{c[1]}-I{c[2]}-E{c[3]}-k{c[4]}" + (f"-r{c[5]}" if c[5] else "") + (f"-{c[6][:5]}")
            + (f"-empty{len(c[7])}" if c[7] else "") for c in cases]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_grouped_experts_match_per_expert_loop(case, dtype, device):
    _check_case(case, dtype, device)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SLOW_CASES, ids=_ids(SLOW_CASES))
def test_grouped_experts_match_per_expert_loop_large(case, dtype, device):
    _check_case(case, dtype, device)


def test_gpu_launch_choices_compute_the_same(device):
    """The tiles a GPU launches (what benchmarks/COMPILE.md compiles) run here under the interpreter:
    sm_90's choices for fp32 dots, 64-row blocks over a grid at its upper bound (programs past the
    last tile return at once), K (32) in 16-deep steps, the LoRA rank (24) in two 16-rank steps, 64-column
    tiles over I = 80 (a masked second tile). bf16 cannot run so: the interpreter's bf16 dot is wrong."""
    from fastft.kernels._common import recording_launches

    if device != "cpu":
        pytest.skip("the GPU runs its own choices in the other tests")
    with recording_launches((9, 0), 132, run=True) as launches:
        _check_case((24, 32, 80, 3, 2, 24, "concatenated", (2,)), torch.float32, device)
    kernels = {launch.kernel.fn.__name__ for launch in launches}
    assert {"_glu_fwd_kernel", "_glu_bwd_kernel", "_grouped_mm_kernel", "_weight_grad_kernel"} <= kernels
    glu = next(launch.meta for launch in launches if launch.kernel.fn.__name__ == "_glu_fwd_kernel")
    assert (glu["BLOCK_M"], glu["BLOCK_N"], glu["BLOCK_K"], glu["BLOCK_R"], glu["R_STEP"], glu["FP32_DOT"]) == \
        (64, 64, 16, 32, 16, True)


@pytest.mark.slow
def test_128_experts_top8_fp32(device):
    """The 128-expert, top-8 routing of Qwen3-30B-A3B at a tiny width (the default suite stops at
    16 experts, top-8: the interpreter pays per program, and the weight gradients launch one per
    expert)."""
    _check_case((11, 32, 16, 128, 8, 0, "concatenated", (3,)), torch.float32, device)


def test_transposed_layout_and_weight_grad_scale(device):
    """[E, H, 2I] / [E, I, H] stacks (transposed=True) are the same computation (the tolerance rule
    against the per-expert loop on the usual layout); the expert weights' gradients (only those)
    are multiplied by weight_grad_scale (expert parallelism)."""
    n, hidden, inter, e, k = 15, 32, 16, 4, 2
    idx = _routing(n, e, k, ()).to(device)

    def transposed(x, topk_w, gate_up, down, scale=1.0):  # the stacks handed over as [E, H, 2I] / [E, I, H]
        return moe_experts(x, idx, topk_w, gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous(),
                           transposed=True, weight_grad_scale=scale)

    inputs = _inputs(n, hidden, inter, e, k, 0)
    check_against_reference(transposed, lambda **t: moe_experts_reference(**t, topk_idx=idx), inputs,
                            torch.float32, device)
    leaves = [t.to(device).requires_grad_() for t in inputs.values()]
    grad = torch.randn(n, hidden, device=device)
    plain, scaled = (torch.autograd.grad(transposed(*leaves, scale=s), leaves, grad) for s in (1.0, 0.25))
    # Only the weights' gradients scale, by a power of two: exactly, whatever the rounding.
    for name, p, q, s in zip(inputs, plain, scaled, (1, 1, 0.25, 0.25)):
        torch.testing.assert_close(q, s * p, rtol=0, atol=0, msg=name)


def test_slots_without_expert_and_empty_experts(device):
    """Expert id E marks a slot with no expert: it adds nothing and gets a zero routing-weight
    gradient; an expert without tokens gets an exactly zero weight gradient; no tokens at all works."""
    n, hidden, inter, e = 7, 32, 16, 4
    idx = torch.tensor([[0, 4], [4, 4], [1, 0], [1, 4], [0, 1], [4, 0], [1, 0]], device=device)  # experts 2, 3 idle
    x = torch.randn(n, hidden, device=device, requires_grad=True)
    w = torch.rand(n, 2, device=device, requires_grad=True)
    gate_up = (torch.randn(e, 2 * inter, hidden, device=device) / hidden**0.5).requires_grad_()
    down = (torch.randn(e, hidden, inter, device=device) / inter**0.5).requires_grad_()
    check_against_reference(lambda **t: moe_experts(**t, topk_idx=idx), lambda **t: moe_experts_reference(**t, topk_idx=idx),
                            dict(x=x, topk_w=w, gate_up=gate_up, down=down), torch.float32, device)
    out = moe_experts(x, idx, w, gate_up, down)
    assert torch.equal(out[1], torch.zeros(hidden, device=device))
    gk = torch.autograd.grad(out, (x, w, gate_up, down), torch.randn_like(out))
    assert not gk[1][idx == e].any()
    assert not gk[2][2:].any() and not gk[3][2:].any()
    empty = moe_experts(torch.randn(0, hidden, device=device), torch.zeros(0, 2, dtype=torch.long, device=device),
                        torch.zeros(0, 2, device=device), gate_up, down)
    assert empty.shape == (0, hidden)


def test_saves_less_than_the_per_expert_loop(device):
    """Saved for backward: x, the routing and gu [S, 2I], where the loop keeps every expert's
    gathered input, gate-up output, activation, product and down output."""
    n, hidden, inter, e, k = 32, 64, 32, 8, 2
    idx = _routing(n, e, k, ()).to(device)
    inputs = {name: t.to(device).requires_grad_() for name, t in _inputs(n, hidden, inter, e, k, 0).items()}

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(inputs["x"], idx, inputs["topk_w"], inputs["gate_up"], inputs["down"])
        params = {(t.data_ptr(), t.numel()) for t in inputs.values()}
        return sum(v for key, v in seen.items() if key not in params)

    ours, loop = saved_bytes(moe_experts), saved_bytes(moe_experts_reference)
    assert ours < 0.6 * loop, (ours, loop)


def test_bad_inputs_name_the_problem(device):
    x, idx, w = torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2)
    gate_up, down = torch.randn(2, 8, 8), torch.randn(2, 8, 4)
    with pytest.raises(TypeError, match="argument order"):
        moe_experts(x, w, idx, gate_up, down)
    with pytest.raises(ValueError, match=r"\[E, 2I, H\]"):
        moe_experts(x, idx, w, gate_up, torch.randn(2, 8, 3))
    with pytest.raises(ValueError, match="activation"):
        moe_experts(x, idx, w, gate_up, down, "relu")
