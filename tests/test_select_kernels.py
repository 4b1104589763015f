"""The Triton selection kernels compute the torch path's functions: block ids exactly (ties to the lower id, NaN
last, -inf above NaN, -0.0 tied with +0.0, everything when few blocks exist), block scores to fp32 rounding.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py), so shapes stay small; the
``cuda`` variants run the compiled kernels, larger, and inside a CUDA graph."""

import numpy as np
import pytest
import torch

from runtime import select_kernels
from runtime.selection import (
    ScoreState,
    append_token,
    init_prompt,
    qaware_block_scores,
    select_blocks_gpu,
)

# CPU tensors: the interpreter (marked ``triton``); CUDA tensors: the compiled kernels (marked ``gpu``).
DEVICES = [pytest.param("cpu", marks=pytest.mark.triton), pytest.param("cuda", marks=pytest.mark.gpu)]


def _scores(g: torch.Generator, R: int, nb: int, kind: str) -> torch.Tensor:
    x = torch.rand(R, nb, generator=g)
    if kind == "ties":  # a few distinct values: the lower id must win every tie
        return torch.round(x * 4) / 4
    if kind == "special":  # NaN ranks below -inf, -inf below every finite score, -0.0 ties +0.0
        u = torch.rand(R, nb, generator=g)
        x = torch.round(x * 3) - 1.0
        x = torch.where(u < 0.15, float("nan"), x)
        x = torch.where((u >= 0.15) & (u < 0.3), float("-inf"), x)
        x = torch.where((u >= 0.3) & (u < 0.35), float("inf"), x)
        return torch.where((u >= 0.35) & (u < 0.5), -0.0, x)
    if kind == "sparse":  # mostly NaN and -inf: budgets end inside the -inf ties and inside the NaN ties
        u = torch.rand(R, nb, generator=g)
        return torch.where(u < 0.6, float("nan"), torch.where(u < 0.9, float("-inf"), x))
    if kind == "wide":  # magnitudes over many binades and both signs: the key's exponent bits matter
        return torch.randn(R, nb, generator=g) * torch.exp2(torch.randint(-60, 60, (R, nb), generator=g).float())
    return x


def _contexts(g: torch.Generator, R: int, nb: int, k: int, past_end: bool = True) -> torch.Tensor:
    """Mostly random, plus the edges: no token, no complete block, few blocks (<= k - 1), exactly the k - 1
    boundary, and (``past_end``) more tokens than the scores have blocks for."""
    ctx = torch.randint(1, nb * 64 + 1, (R,), generator=g)
    edges = torch.tensor([0, 1, 64, 65, 64 * (k - 1) + 1, 64 * k + 1, nb * 64 + (300 if past_end else 1)])
    n = min(R, len(edges))
    ctx[:n] = edges[:n]
    return ctx


CASES = [  # R, nb, k, k_q (None: InfLLM-V2), score kind
    (12, 120, 40, None, "ties"),
    (12, 120, 40, 25, "ties"),
    (12, 130, 64, 33, "special"),
    (10, 130, 64, None, "special"),
    (9, 77, 20, 18, "wide"),
    (9, 17, 64, 33, "random"),  # fewer blocks than k: everything complete
    (10, 300, 64, 33, "ties"),
    (10, 60, 40, 25, "sparse"),
]


def _check_select(device, R, nb, k, k_q, kind, seed, radix=None, agn_kind=None, past_end=True):
    g = torch.Generator().manual_seed(seed)
    q = _scores(g, R, nb, kind)
    full = _scores(g, R, nb + 1, agn_kind or kind)
    agn = full[:, :nb] if k_q is not None else None  # a strided view, as the backend passes NOSA's frozen scores
    ctx = _contexts(g, R, nb, k, past_end)
    to = lambda t: None if t is None else t.to(device)
    ref = select_blocks_gpu(q.to(device), ctx.to(device), k=k, k_q=k_q, agnostic=to(agn), use_triton=False)
    if radix is None:
        got = select_blocks_gpu(q.to(device), ctx.to(device), k=k, k_q=k_q, agnostic=to(agn), use_triton=True)
    else:
        kq = k if k_q is None else k_q
        got = select_kernels.select_blocks_triton(q.to(device), ctx.to(device), k=k, k_q_eff=kq, sink=1, window=16,
                                                  block_size=64, agnostic=to(agn), radix=radix)
    assert got.dtype == torch.int64 and got.shape == (R, k)
    torch.testing.assert_close(got.cpu(), ref.cpu(), rtol=0, atol=0)
    return q, ctx, agn, got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_select_matches_torch(device, case):
    R, nb, k, k_q, kind = CASES[case]
    if device == "cuda":
        R *= 16
    _check_select(device, R, nb, k, k_q, kind, seed=case)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("radix", [1, 2, 4, 8])
def test_select_every_radix(device, radix):
    _check_select(device, 6, 100, 40, 25, "special", seed=radix, radix=radix, agn_kind="ties")


@pytest.mark.triton
def test_select_matches_cpu_reference_and_budgets():
    """Straight against nosasim's rule, and NOSA's budgets: at most k_q - 1 query-aware blocks, k - 1 in all."""
    select = pytest.importorskip("nosasim.select")
    k, k_q = 40, 25
    q, ctx, agn, got = _check_select("cpu", 12, 120, k, k_q, "ties", seed=7, agn_kind="special",
                                 past_end=False)  # the CPU rule rejects contexts past the scores
    ref = select.select_blocks(q.numpy(), ctx.numpy(), k=k, k_q=k_q, agnostic=agn.numpy())
    np.testing.assert_array_equal(got.numpy(), ref)
    assert ((got >= 0).sum(1) <= k - 1).all()


@pytest.mark.triton
def test_select_broadcast_agnostic_and_bf16_scores():
    g = torch.Generator().manual_seed(3)
    R, nb = 5, 90
    q = _scores(g, R, nb, "ties").to(torch.bfloat16)
    agn = _scores(g, 1, nb, "special")[0]  # one score row for all rows
    ctx = _contexts(g, R, nb, 40)
    ref = select_blocks_gpu(q, ctx, k=40, k_q=20, agnostic=agn, use_triton=False)
    got = select_blocks_gpu(q, ctx, k=40, k_q=20, agnostic=agn, use_triton=True)
    assert torch.equal(got, ref)


def _state(g, R, D, max_tokens, nb, dtype, device, extra_rows=0):
    """A scoring state with random compressed keys, sliced to ``R`` of its rows (the backend passes row slices)."""
    st = ScoreState.allocate(1, R + extra_rows, D, max_tokens, nb, qaware=True, agnostic=False, dtype=dtype,
                             device=device)
    st.ckeys.copy_(torch.randn(st.ckeys.shape, generator=g).to(dtype))
    if extra_rows:
        lo = extra_rows // 2
        st = ScoreState(st.ckeys[:, lo: lo + R], None, None, None, None, None, st.stride, st.block_size)
    return st


def _as_f32(st: ScoreState) -> ScoreState:
    return ScoreState(st.ckeys.float(), None, None, None, None, None, st.stride, st.block_size)


SCORE_CASES = [  # R, G, D, max_tokens, n_blocks
    (8, 4, 16, 700, 11),
    (6, 2, 24, 333, 6),  # head dim not a power of two, group of 2
    (5, 4, 32, 1100, 30),  # more blocks than compressed keys reach: trailing blocks score -inf
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(SCORE_CASES)))
def test_scores_match_torch(device, dtype, case):
    R, G, D, max_tokens, nb = SCORE_CASES[case]
    if device == "cuda":
        R *= 32
    g = torch.Generator().manual_seed(case)
    st = _state(g, R, D, max_tokens, nb, dtype, device, extra_rows=4)
    q = torch.randn(R, G, D, generator=g).to(dtype)
    ctx = torch.randint(0, max_tokens + 1, (R,), generator=g)
    ctx[:5] = torch.tensor([0, 31, 32, 47, max_tokens + 100])[: min(R, 5)]  # none, none, one, one, past capacity
    ctx = ctx.to(device)
    q = q.to(device)
    got = qaware_block_scores(st, 0, q, ctx, nb, use_triton=True)
    assert got.dtype == torch.float32 and got.shape == (R, nb)
    # The kernel accumulates bf16 products in fp32, so its reference is the torch math on the same values in fp32.
    ref = qaware_block_scores(_as_f32(st), 0, q.float(), ctx, nb, use_triton=False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    if dtype == torch.float32:
        assert torch.equal(qaware_block_scores(st, 0, q, ctx, nb, use_triton=False).isinf(), got.isinf())


@pytest.mark.parametrize("device", DEVICES)
def test_scores_fp32_query_against_bf16_keys(device):
    """The query is cast to the keys' dtype first, as the torch path does."""
    g = torch.Generator().manual_seed(11)
    R, G, D, T, nb = 4, 4, 16, 400, 7
    st = _state(g, R, D, T, nb, torch.bfloat16, device)
    q = torch.randn(R, G, D, generator=g).to(device)
    ctx = torch.full((R,), T, device=device)
    got = qaware_block_scores(st, 0, q, ctx, nb, use_triton=True)
    ref = qaware_block_scores(_as_f32(st), 0, q.to(torch.bfloat16).float(), ctx, nb, use_triton=False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.triton
def test_incremental_scoring_with_kernels_matches_reference():
    """The scoring state built token by token, scored by the kernel, equals nosasim's scores from the full keys."""
    scoring = pytest.importorskip("nosasim.scoring")
    g = torch.Generator().manual_seed(0)
    R, G, D, P, steps, nb = 3, 4, 16, 150, 70, 4
    keys = torch.randn(R, P + steps, D, generator=g)
    st = ScoreState.allocate(1, R, D, P + steps, nb, qaware=True, agnostic=False, dtype=torch.float32, device="cpu")
    init_prompt(st, 0, keys[:, :P], None)
    for t in range(steps):
        pos = torch.full((R,), P + t)
        append_token(st, 0, pos, keys[:, P + t], None, pos % 64 == 0, pos // 64 - 1)
        if t % 31 == 0 or t == steps - 1:
            n = P + t + 1
            q = torch.randn(R, G, D, generator=g)
            got = qaware_block_scores(st, 0, q, pos + 1, nb, use_triton=True).numpy()
            ref = scoring.infllmv2_block_scores(q.numpy(), keys[:, None, :n].numpy())[:, 0]
            np.testing.assert_allclose(got[:, : ref.shape[-1]], ref, rtol=2e-5, atol=1e-6)


@pytest.mark.gpu
def test_scores_and_selection_replay_in_a_cuda_graph():
    """No host sync inside: both kernels capture, and replays follow new contents of the captured inputs."""
    g = torch.Generator().manual_seed(5)
    R, G, D, T, nb, k, k_q = 64, 4, 128, 2200, 35, 24, 20
    st = _state(g, R, D, T, nb, torch.bfloat16, "cuda")
    q = torch.randn(R, G, D, generator=g).to("cuda", torch.bfloat16)
    ctx = torch.randint(1, T + 1, (R,), generator=g).cuda()
    agn = torch.rand(R, nb, generator=g).cuda()

    def step():
        s = qaware_block_scores(st, 0, q, ctx, nb)
        return s, select_blocks_gpu(s, ctx, k=k, k_q=k_q, agnostic=agn)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s_out, ids_out = step()
    for _ in range(3):
        q.copy_(torch.randn(R, G, D, generator=g).to(torch.bfloat16))
        ctx.copy_(torch.randint(1, T + 1, (R,), generator=g))
        agn.copy_(torch.rand(R, nb, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        s_ref = qaware_block_scores(st, 0, q, ctx, nb)
        assert torch.equal(s_out, s_ref)
        ids_ref = select_blocks_gpu(s_ref, ctx, k=k, k_q=k_q, agnostic=agn, use_triton=False)
        assert torch.equal(ids_out, ids_ref)
