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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", range(len(SCORE_CASES)))
def test_scores_with_fp8_keys_match_torch(device, qdtype, case):
    """fp8 (e4m3) compressed keys: converted exactly to the query's type in the kernel, so the scores are those of
    the keys' e4m3 values, the same in the torch path; and they differ from the bf16 keys' they were rounded from."""
    R, G, D, max_tokens, nb = SCORE_CASES[case]
    if device == "cuda":
        R *= 32
    g = torch.Generator().manual_seed(100 + case)
    st16 = _state(g, R, D, max_tokens, nb, torch.bfloat16, device, extra_rows=2)
    st8 = ScoreState(st16.ckeys.to(torch.float8_e4m3fn), None, None, None, None, None, st16.stride, st16.block_size)
    q = torch.randn(R, G, D, generator=g).to(qdtype).to(device)
    ctx = torch.randint(0, max_tokens + 1, (R,), generator=g).to(device)
    got = qaware_block_scores(st8, 0, q, ctx, nb, use_triton=True)
    # A bf16 query meets fp8 keys in fp16 (select_kernels.fp8_query); fp32 stays fp32.
    qk = q.to(torch.float16) if qdtype == torch.bfloat16 else q
    ref = qaware_block_scores(_as_f32(st8), 0, qk.float(), ctx, nb, use_triton=False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(qaware_block_scores(st8, 0, q, ctx, nb, use_triton=False), got, rtol=2e-2, atol=1e-3)
    bf16 = qaware_block_scores(st16, 0, q, ctx, nb, use_triton=True)
    finite = got.isfinite()
    assert torch.equal(finite, bf16.isfinite()) and finite.any()
    assert not torch.equal(got[finite], bf16[finite])  # the rounding to e4m3 is real


def test_fp8_keys_refused_by_the_fused_launch():
    g = torch.Generator().manual_seed(2)
    ck, nc, q, ctx, agn = _fused_inputs(g, 3, 4, 16, 400, 7, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="select_fused: ckeys"):
        select_kernels.select_fused(ck.to(torch.float8_e4m3fn), nc, q, ctx, 7, k=8, k_q_eff=6, sink=1, window=4,
                                    block_size=BS, agnostic=agn, stride=STRIDE)


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


@pytest.mark.parametrize("device", DEVICES)
def test_pool_tiles_split_rows_bit_for_bit(device):
    """The pool pass split over programs per row (tiles of blocks, each merging the row's statistics itself)
    gives the same block scores, bit for bit, as one program looping over a row's tiles."""
    g = torch.Generator().manual_seed(11)
    R, G, D, T = 5, 4, 32, 64 * 300
    nb = T // 64 + 2
    ck, nc, q, _, _ = _fused_inputs(g, R, G, D, T, nb, torch.bfloat16, device)
    ctx = torch.tensor([0, 40, 64 * 131 + 7, T, T + 90])[:R].to(device)
    one = select_kernels.qaware_scores_triton(ck, nc, q, ctx, nb, stride=STRIDE, block_size=BS, bb=32,
                                              pool_tiles=triton_cdiv(nb, 32))
    for tiles in (1, 3):
        got = select_kernels.qaware_scores_triton(ck, nc, q, ctx, nb, stride=STRIDE, block_size=BS, bb=32,
                                                  pool_tiles=tiles)
        assert torch.equal(got.isnan(), one.isnan()) and torch.equal(got.nan_to_num(), one.nan_to_num())
    assert torch.isfinite(one[3, : nb - 2]).all()  # the full row: every block with a key has a score


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


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


# ---------------------------------------------------------------------------------------------------------------
# select_fused: scoring and selection in one launch (or two), against the three launches and the CPU rule.

BS, STRIDE = 64, 16


def _fused_inputs(g, R, G, D, max_tokens, nb, dtype, device, *, ctx=None, agn_kind="random", key_kind="randn"):
    """Row slices of larger tensors, as the backend passes a micro-batch's rows: keys, queries, contexts and NOSA's
    frozen scores are all views with a row stride (and, for the scores, a padded block axis)."""
    nc = max_tokens // STRIDE
    lo, extra = 1, 3
    keys = torch.randn(R + extra, nc + 1, D, generator=g)
    if key_kind == "coarse":  # few distinct key values: many equal logits, so equal block scores
        keys = torch.round(keys)
    ck = keys.to(dtype).to(device)[lo: lo + R]
    q = torch.randn(R + extra, G, D, generator=g).to(dtype).to(device)[lo: lo + R]
    if ctx is None:
        ctx = torch.randint(0, max_tokens + 1, (R,), generator=g)
    ctx_full = torch.zeros(R + extra, dtype=torch.long)
    ctx_full[lo: lo + R] = ctx
    agn = _scores(g, R + extra, nb + 2, agn_kind).to(device)[lo: lo + R, :nb]
    return ck, nc, q, ctx_full.to(device)[lo: lo + R], agn


def _edge_contexts(R, max_tokens, nb):
    """Per-row contexts: none, no compressed key, one, block boundaries (64m: the tail is the last full block; 64m+1:
    a one-token tail), mid-block ends, more tokens than the keys (and blocks) hold; the rest spread out."""
    edges = [0, 31, 32, 64, 65, 64 * 5, 64 * 5 + 1, 64 * 5 + 37, max_tokens, max_tokens + 100, nb * 64 + 1, 64 * 3 + 63]
    ctx = torch.tensor([edges[i % len(edges)] if i < len(edges) else (max_tokens * i) // R for i in range(R)])
    return ctx.clamp(min=0)


def _fused(ck, nc, q, ctx, nb, k, k_q, agn, **kw):
    kq = k if k_q is None else k_q
    return select_kernels.select_fused(ck, nc, q, ctx, nb, k=k, k_q_eff=kq, sink=1, window=4, block_size=BS,
                                       agnostic=agn if k_q is not None else None, stride=STRIDE,
                                       return_scores=True, **kw)


def _check_fused(ck, nc, q, ctx, nb, k, k_q, agn, *, exact_scores, cpu_rule=False, **kw):
    """The fused ids and scores against: the three launches' scores (bit for bit when ``exact_scores``, else to fp32
    rounding), ``select_blocks_triton`` and the torch rule on the fused scores (ids exactly), and optionally
    ``nosasim.select`` (the CPU definition)."""
    ids, sc = _fused(ck, nc, q, ctx, nb, k, k_q, agn, **kw)
    R = q.shape[0]
    assert ids.shape == (R, k) and ids.dtype == torch.int64 and sc.shape == (R, nb) and sc.dtype == torch.float32
    ref = select_kernels.qaware_scores_triton(ck, nc, q, ctx, nb, stride=STRIDE, block_size=BS)
    if exact_scores:
        assert torch.equal(sc.isnan(), ref.isnan()) and torch.equal(sc.nan_to_num(), ref.nan_to_num())
    else:
        torch.testing.assert_close(sc, ref, rtol=1e-5, atol=1e-7, equal_nan=True)
        assert torch.equal(sc.isinf(), ref.isinf())
    kq = k if k_q is None else k_q
    a = agn if k_q is not None else None
    tri = select_kernels.select_blocks_triton(sc, ctx, k=k, k_q_eff=kq, sink=1, window=4, block_size=BS, agnostic=a)
    assert torch.equal(ids, tri)
    rule = select_blocks_gpu(sc, ctx, k=k, k_q=k_q, sink=1, window=4, block_size=BS, agnostic=a, use_triton=False)
    assert torch.equal(ids, rule)
    if cpu_rule:
        select = pytest.importorskip("nosasim.select")
        cref = select.select_blocks(sc.cpu().numpy(), ctx.cpu().numpy(), k=k, k_q=k_q, sink=1, window=4,
                                    block_size=BS, agnostic=None if a is None else a.cpu().numpy())
        np.testing.assert_array_equal(ids.cpu().numpy(), cref)
    return ids, sc


FUSED_CASES = [  # R, G, D, max_tokens, n_blocks, k, k_q (None: InfLLM-V2), key dtype, knobs
    (6, 4, 32, 1100, 18, 10, 8, torch.bfloat16, {"tiles": 1}),  # NOSA; a program per chunk (many splits per row)
    (6, 4, 32, 1100, 18, 10, None, torch.float32, {"tiles": 2, "launches": 2}),  # InfLLM-V2; two launches
    (5, 2, 24, 700, 11, 40, 30, torch.bfloat16, {}),  # head dim not a power of two, group of 2; k > blocks: all fit
    (5, 4, 16, 2200, 35, 12, 9, torch.float32, {"tiles": 8}),  # one split per row (tiles cover every chunk)
    (4, 4, 32, 1100, 30, 10, 6, torch.bfloat16, {"tiles": 2}),  # more blocks than the keys reach: -inf tails
    (4, 1, 16, 1500, 24, 9, None, torch.bfloat16, {"tiles": 4, "launches": 2}),  # no GQA group; uneven last split
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(FUSED_CASES)))
def test_fused_matches_three_launches(device, case):
    R, G, D, T, nb, k, k_q, dtype, kw = FUSED_CASES[case]
    if device == "cuda":
        R *= 24
    g = torch.Generator().manual_seed(100 + case)
    ctx = _edge_contexts(R, T, nb)
    ck, nc, q, ctx, agn = _fused_inputs(g, R, G, D, T, nb, dtype, device, ctx=ctx)
    # Same 64-key chunks and the same arithmetic as the three launches: in the interpreter the scores are the same
    # bits; compiled, the reductions may group differently, so there fp32 rounding.
    _check_fused(ck, nc, q, ctx, nb, k, k_q, agn, exact_scores=device == "cpu", **kw)


@pytest.mark.triton
def test_fused_matches_cpu_rule_fresh_inputs():
    """Straight against nosasim's rule, on fresh random inputs (contexts within the scores, which it requires)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed {seed}")  # shown by pytest if the test fails
    g = torch.Generator().manual_seed(seed)
    R, G, D, T, nb = 4, 4, 16, 1300, 21
    ctx = torch.randint(0, nb * BS + 1, (R,), generator=g)
    for k_q in (None, 9):
        ck, nc, q, ctx_, agn = _fused_inputs(g, R, G, D, T, nb, torch.bfloat16, "cpu", ctx=ctx, agn_kind="ties")
        _check_fused(ck, nc, q, ctx_, nb, 14, k_q, agn, exact_scores=True, cpu_rule=True, tiles=2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the NaN rows in the interpreter
@pytest.mark.parametrize("device", DEVICES)
def test_fused_ties_nan_and_special_scores(device):
    """Equal block scores everywhere (coarse keys, zero queries), a row of NaN keys (NaN block scores) and one with
    a single NaN key, and NOSA's agnostic scores with NaN, -inf, +inf and -0.0: lower ids win ties, NaN ranks
    last."""
    R, G, D, T, nb, k, k_q = 6, 4, 16, 1500, 24, 12, 8
    ctx = torch.tensor([T, T - 10, 64 * 12, 64 * 12 + 1, 64 * 20 + 33, 64 * 9])
    if device == "cuda":
        R, ctx = R * 16, ctx.repeat(16)
    g = torch.Generator().manual_seed(21)
    ck, nc, q, ctx, agn = _fused_inputs(g, R, G, D, T, nb, torch.float32, device, ctx=ctx, agn_kind="special",
                                        key_kind="coarse")
    q[1::3] = 0.0  # every logit 0: blocks with the same number of live keys tie
    ck[2] = float("nan")  # NaN scores for every block with a live key
    ck[5, 5, 3] = float("nan")  # one NaN key: the statistics' NaN handling must match the three launches'
    for kq in (k_q, None):
        _, sc = _check_fused(ck, nc, q, ctx, nb, k, kq, agn, exact_scores=device == "cpu", tiles=2)
    assert sc[2].isnan().any()
    counts = torch.stack([(sc[r, 1:] == sc[r, 1:].max()).sum() for r in range(1, R, 3)])
    assert (counts > 1).any()  # the case does exercise ties among the top scores


@pytest.mark.parametrize("device", DEVICES)
def test_fused_writes_every_output_and_never_reads_stale_scratch(device, monkeypatch):
    """Poisoned output buffers are fully overwritten; scratch poisoned with NaN gives the same results, so nothing
    is read that this call did not write; the one-launch counters end re-armed (all zero)."""
    R, G, D, T, nb, k, k_q = 5, 4, 16, 1100, 18, 10, 7
    if device == "cuda":
        R *= 16
    g = torch.Generator().manual_seed(4)
    ck, nc, q, ctx, agn = _fused_inputs(g, R, G, D, T, nb, torch.bfloat16, device, ctx=_edge_contexts(R, T, nb))
    clean_ids, clean_sc = _fused(ck, nc, q, ctx, nb, k, k_q, agn, tiles=1)
    poison = lambda *shape, **kw: torch.full(*shape, float("nan"), **kw)  # noqa: E731
    monkeypatch.setattr(select_kernels, "_scratch_empty", poison)
    for launches in (1, 2):
        ids = torch.full((R, k), 12345, dtype=torch.int64, device=device)
        sc = torch.full((R, nb), -7.0, device=device)
        out = select_kernels.select_fused(ck, nc, q, ctx, nb, k=k, k_q_eff=k_q, sink=1, window=4, block_size=BS,
                                          agnostic=agn, stride=STRIDE, launches=launches, tiles=1, out_ids=ids,
                                          out_scores=sc)
        assert out is ids and torch.equal(ids, clean_ids)
        assert torch.equal(sc.isnan(), clean_sc.isnan()) and torch.equal(sc.nan_to_num(), clean_sc.nan_to_num())
    assert not select_kernels._counters(torch.device(device), R)[:R].any()


@pytest.mark.triton
def test_fused_knobs_broadcast_agnostic_and_fp32_query():
    """Other chunk sizes give the same scores to fp32 rounding (their softmax statistics are merged in another
    grouping) and ids from them exactly; one agnostic row for all rows; an fp32 query is cast to the keys' bf16."""
    g = torch.Generator().manual_seed(8)
    R, G, D, T, nb, k, k_q = 5, 4, 16, 1300, 21, 12, 8
    ck, nc, q, ctx, _ = _fused_inputs(g, R, G, D, T, nb, torch.bfloat16, "cpu", ctx=_edge_contexts(R, T, nb))
    agn1 = _scores(g, 1, nb, "special")[0]
    for kw in ({"bn": 32, "tiles": 3, "num_stages": 1}, {"bn": 128, "launches": 2}):
        _check_fused(ck, nc, q, ctx, nb, k, k_q, agn1, exact_scores=False, **kw)
    ids, sc = _fused(ck, nc, q.float(), ctx, nb, k, k_q, agn1, tiles=2)
    ids_b, sc_b = _fused(ck, nc, q, ctx, nb, k, k_q, agn1, tiles=2)
    assert torch.equal(ids, ids_b) and torch.equal(sc.nan_to_num(), sc_b.nan_to_num())


@pytest.mark.triton
def test_fused_degenerate_shapes():
    g = torch.Generator().manual_seed(2)
    ck, nc, q, ctx, agn = _fused_inputs(g, 3, 4, 16, 400, 7, torch.float32, "cpu")
    ids, sc = _fused(ck[:0], nc, q[:0], ctx[:0], 7, 8, 6, agn[:0])
    assert ids.shape == (0, 8) and sc.shape == (0, 7)
    ids, sc = _fused(ck, nc, q, ctx, 0, 8, None, agn[:, :0])  # no blocks: nothing to select
    assert sc.shape == (3, 0) and (ids == -1).all()
    ids, sc = _fused(ck, 0, q, ctx, 7, 8, None, agn)  # no compressed keys: every block scores -inf
    assert sc.isneginf().all()
    assert torch.equal(ids, select_blocks_gpu(sc, ctx, k=8, sink=1, window=4, use_triton=False))


def test_fused_rejects_bad_input():
    g = torch.Generator().manual_seed(1)
    ck, nc, q, ctx, agn = _fused_inputs(g, 3, 4, 16, 400, 7, torch.float32, "cpu")
    base = dict(k=8, k_q_eff=6, sink=1, window=4, block_size=BS, agnostic=agn, stride=STRIDE)
    bad = [
        ({"q": q[0]}, "q"), ({"ckeys": ck[:, :, :8]}, "ckeys"), ({"ctx": ctx.float()}, "ctx"),
        ({"nc": nc + 5}, "nc"), ({"n_blocks": -1}, "n_blocks"), ({"k": 0}, "k"), ({"k_q_eff": 9}, "k_q_eff"),
        ({"block_size": 40}, "block_size"), ({"agnostic": agn[:, :3]}, "agnostic"), ({"launches": 3}, "launches"),
        ({"bn": 48}, "bn"), ({"tiles": 0}, "tiles"), ({"num_warps": 3}, "num_warps"), ({"radix": 3}, "radix"),
        ({"out_ids": torch.empty(3, 8, dtype=torch.int32)}, "out_ids"),
        ({"out_scores": torch.empty(3, 6)}, "out_scores"),
    ]
    for change, field in bad:
        args = {"ckeys": ck, "nc": nc, "q": q, "ctx": ctx, "n_blocks": 7, **base, **change}
        with pytest.raises(ValueError, match=f"select_fused: {field}"):
            select_kernels.select_fused(**args)


@pytest.mark.gpu
def test_fused_large_default_knobs():
    """llama3-8b's shape (group 4, head dim 128, bf16) at 16K context with rows at different contexts: default
    knobs, both launch counts; and the scores' bits against the three launches, reported in the assertion text."""
    g = torch.Generator().manual_seed(9)
    R, G, D, T = 512, 4, 128, 16384 + 128
    nb = (T - 1) // BS + 1
    ctx = torch.randint(T // 2, T + 1, (R,), generator=g)
    ctx[:4] = torch.tensor([0, 64 * 100, 64 * 100 + 1, T])
    ck, nc, q, ctx, agn = _fused_inputs(g, R, G, D, T, nb, torch.bfloat16, "cuda", ctx=ctx)
    for launches in (1, 2):
        _check_fused(ck, nc, q, ctx, nb, 64, 33, agn, exact_scores=False, launches=launches)
        _check_fused(ck, nc, q, ctx, nb, 64, None, agn, exact_scores=False, launches=launches)


@pytest.mark.gpu
def test_fused_replays_in_a_cuda_graph():
    """No host sync: both launch counts capture, replays follow new contents of the captured inputs, and the
    one-launch path's counters re-arm between replays (a stale counter would skip a row's selection)."""
    g = torch.Generator().manual_seed(6)
    R, G, D, T, nb, k, k_q = 256, 4, 128, 4200, 66, 24, 17
    ck, nc, q, ctx, agn = _fused_inputs(g, R, G, D, T, nb, torch.bfloat16, "cuda")

    def step():
        return [_fused(ck, nc, q, ctx, nb, k, k_q, agn, launches=n) for n in (1, 2)]

    step()  # compile and allocate the counters outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(4):
        q.copy_(torch.randn(R, G, D, generator=g).to(torch.bfloat16))
        ctx.copy_(torch.randint(1, T + 1, (R,), generator=g))
        agn.copy_(torch.rand(R, nb, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        ref = select_kernels.qaware_scores_triton(ck, nc, q, ctx, nb, stride=STRIDE, block_size=BS)
        ids_ref = select_blocks_gpu(ref, ctx, k=k, k_q=k_q, sink=1, window=4, agnostic=agn, use_triton=False)
        for ids, sc in outs:
            torch.testing.assert_close(sc, ref, rtol=1e-5, atol=1e-7)
            ids_sc = select_blocks_gpu(sc, ctx, k=k, k_q=k_q, sink=1, window=4, agnostic=agn, use_triton=False)
            assert torch.equal(ids, ids_sc)
            assert (ids == ids_ref).all(1).float().mean() > 0.95  # near-ties may flip under fp32 rounding only
    assert not select_kernels._counters(torch.device("cuda"), R)[:R].any()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["ties", "special", "random"])
def test_long_context_defaults_match_torch(kind):
    """128K-token contexts: the selection's default there (one bit per radix pass, from 4,096 padded blocks) and the
    scoring's (128-key chunks past 4,096 compressed keys) against the torch code."""
    _check_select("cuda", 64, 2050, 64, 33, kind, seed=7)
    _check_select("cuda", 64, 2050, 64, None, kind, seed=8)
    g = torch.Generator().manual_seed(9)
    R, G, D, max_tokens, nb = 48, 4, 128, 70000, 1100
    for dtype in (torch.float32, torch.bfloat16):
        st = _state(g, R, D, max_tokens, nb, dtype, "cuda", extra_rows=4)
        assert st.nc > 4096
        q = torch.randn(R, G, D, generator=g).to(dtype).cuda()
        ctx = torch.randint(0, max_tokens + 1, (R,), generator=g).cuda()
        got = qaware_block_scores(st, 0, q, ctx, nb, use_triton=True)
        ref = qaware_block_scores(_as_f32(st), 0, q.float(), ctx, nb, use_triton=False)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
