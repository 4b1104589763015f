"""GPU selection equals nosasim's CPU reference: the selection rule exactly, the scoring within float tolerance,
and the incremental (per-token) scoring state equals scoring the whole history at once."""

import numpy as np
import pytest
import torch

from runtime.selection import (ScoreState, append_token, init_prompt, qaware_block_scores, select_blocks_gpu)

select = pytest.importorskip("nosasim.select")
scoring = pytest.importorskip("nosasim.scoring")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,k_q", [(40, None), (40, 25), (64, 33)])
def test_selection_rule_matches_cpu_reference(device, k, k_q):
    rng = np.random.default_rng(k + (k_q or 0))
    R, nb = 64, 120
    for _ in range(4):
        ctx = rng.integers(1, nb * 64, size=R)
        q = (np.round(rng.random((R, nb)) * 8) / 8).astype(np.float32)  # coarse: many ties, lower id must win
        a = rng.random((R, nb)).astype(np.float32)
        a[rng.random((R, nb)) < 0.1] = np.nan
        agn = a if k_q else None
        ref = select.select_blocks(q, ctx, k=k, k_q=k_q, agnostic=agn)
        got = select_blocks_gpu(torch.from_numpy(q).to(device), torch.from_numpy(ctx).to(device), k=k, k_q=k_q,
                                agnostic=None if agn is None else torch.from_numpy(agn).to(device))
        np.testing.assert_array_equal(got.cpu().numpy(), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_incremental_scoring_matches_reference(device):
    """Prompt, then token by token: compressed keys, query-aware block scores and frozen static scores."""
    g = torch.Generator().manual_seed(0)
    R, G, D, P, steps, nb = 6, 4, 16, 203, 140, 6
    keys = torch.randn(R, P + steps, D, generator=g)
    cis = torch.rand(R, P + steps, generator=g)
    st = ScoreState.allocate(1, R, D, P + steps, nb, qaware=True, agnostic=True, dtype=torch.float32, device=device)
    init_prompt(st, 0, keys[:, :P].to(device), cis[:, :P].to(device))
    for t in range(steps):
        pos = torch.full((R,), P + t, device=device)
        tail = pos // 64
        done = (pos % 64 == 0)
        append_token(st, 0, pos, keys[:, P + t].to(device), cis[:, P + t].to(device), done, tail - 1)
        n = P + t + 1
        if t % 23 == 0 or t == steps - 1:
            q = torch.randn(R, G, D, generator=g)
            got = qaware_block_scores(st, 0, q.to(device), pos + 1, nb).cpu().numpy()
            ref = scoring.infllmv2_block_scores(q.numpy(), keys[:, None, :n].numpy())[:, 0]
            nbx = ref.shape[-1]
            np.testing.assert_allclose(got[:, :nbx], ref, rtol=2e-5, atol=1e-6)
    ref_static = scoring.static_block_scores(cis.numpy()[:, : P + steps])
    nc = ref_static.shape[-1]
    np.testing.assert_allclose(st.static[0, :, :nc].cpu().numpy(), ref_static, rtol=1e-5)
    ref_ck = scoring.compressed_keys(keys.numpy())
    np.testing.assert_allclose(st.ckeys[0, :, : ref_ck.shape[1]].cpu().numpy(), ref_ck, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_incremental_fp8_keys_are_the_rounded_compressed_keys(device):
    """With fp8 compressed keys, prompt then token by token, each stored key is the fp32 window mean rounded once to
    e4m3 (the running sums stay fp32, so rounding never accumulates), and the block scores are the reference's on
    those rounded keys."""
    g = torch.Generator().manual_seed(3)
    R, G, D, P, steps, nb = 4, 4, 16, 150, 70, 4
    keys = torch.randn(R, P + steps, D, generator=g)
    st = ScoreState.allocate(1, R, D, P + steps, nb, qaware=True, agnostic=False, dtype=torch.float8_e4m3fn,
                             device=device)
    assert st.ckeys.dtype == torch.float8_e4m3fn
    init_prompt(st, 0, keys[:, :P].to(device), None)
    for t in range(steps):
        pos = torch.full((R,), P + t, device=device)
        append_token(st, 0, pos, keys[:, P + t].to(device), None, pos % 64 == 0, pos // 64 - 1)
    ref_ck = torch.from_numpy(scoring.compressed_keys(keys.numpy()))
    n = ref_ck.shape[1]
    got = st.ckeys[0, :, :n].cpu()
    # fp32 means differ from numpy's in the last bits; a rounding boundary between them moves one e4m3 step.
    np.testing.assert_allclose(got.float().numpy(), ref_ck.to(torch.float8_e4m3fn).float().numpy(), rtol=0.13,
                               atol=2e-3)
    assert (got.float() == ref_ck.to(torch.float8_e4m3fn).float()).float().mean() > 0.99
    q = torch.randn(R, G, D, generator=g)
    ctx = torch.full((R,), P + steps, device=device)
    scores = qaware_block_scores(st, 0, q.to(device), ctx, nb, use_triton=False).cpu().numpy()
    ref = scoring.block_scores_from_compressed(q.numpy(), got.float().numpy()[:, None], P + steps)[:, 0]
    np.testing.assert_allclose(scores[:, : ref.shape[-1]], ref, rtol=2e-2, atol=1e-3)
