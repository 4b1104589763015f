"""nosasim.quality: attention-mass recall against the same-size oracle."""

import numpy as np
import pytest

from nosasim.quality import recall, recall_summary, summarize
from nosasim.select import select_blocks
from nosasim.contract import Budget
from nosasim.trace import ModelShape, SelectionParams, Trace


def random_score_trace(seed=0, steps=12, layers=2, heads=2, prompt=600, k=6, k_q=4):
    rng = np.random.default_rng(seed)
    ctx = (prompt + 1 + np.arange(steps, dtype=np.int32))[:, None]
    nb = int(ctx.max() - 1) // 64 + 1
    exists = (np.arange(nb)[None, :] <= (ctx - 1) // 64)[:, None, None, None, :]  # [steps, 1, 1, 1, nb]
    shape = (steps, layers, heads, 1, nb)
    mass = rng.dirichlet(np.ones(nb) * 0.3, size=shape[:-1])
    mass = np.where(exists, mass, np.nan).astype(np.float16)
    qaware = np.where(exists, rng.random(shape), np.nan).astype(np.float16)
    agn = rng.random((layers, heads, 1, nb)).astype(np.float32)
    sel = select_blocks(qaware, ctx[:, None, None, :], k=k, k_q=k_q, sink=1, window=2, agnostic=agn[None])
    return Trace.from_arrays(sel, ctx, model=ModelShape(layers, heads, 64),
                             selection=SelectionParams("nosa", Budget(k, k_q, 1, 2)),
                             agnostic_score=agn, qaware_score=qaware, attn_mass=mass)


def loop_recall(sel, mass, ctx):
    n_c = (ctx - 1) // 64
    m = np.nan_to_num(mass[:n_c].astype(np.float64))
    ids = [b for b in sel if b >= 0]
    best = np.sort(m)[::-1][: len(ids)].sum()
    return 1.0 if best <= 0 else min(m[ids].sum() / best, 1.0)


def test_recall_matches_loop_reference():
    tr = random_score_trace()
    r = recall(tr)
    assert r.shape == tr.sel.shape[:-1]
    for t, l, h, b in np.ndindex(r.shape):
        assert r[t, l, h, b] == pytest.approx(loop_recall(tr.sel[t, l, h, b], tr.attn_mass[t, l, h, b],
                                                          tr.context_len[t, b]), rel=1e-12)
    assert (r < 1).any(), "random selections should miss some mass: otherwise the test checks nothing"


def test_hand_made_rows():
    # Blocks 0..2 complete, block 3 is the tail (its 0.6 is ignored by both sides).
    mass = np.array([[0.2, 0.05, 0.15, 0.6]])
    ctx = np.array([4 * 64])
    assert recall(np.array([[1, -1]]), mass, ctx)[0] == pytest.approx(0.05 / 0.2)
    assert recall(np.array([[0, 2]]), mass, ctx)[0] == pytest.approx(1.0)
    assert recall(np.array([[1, 2]]), mass, ctx)[0] == pytest.approx(0.2 / 0.35)
    assert recall(np.array([[-1, -1]]), mass, ctx)[0] == 1.0  # nothing chosen, nothing the oracle could add


def test_recall_is_one_when_every_complete_block_is_selected():
    tr = random_score_trace()
    nb = tr.n_blocks
    all_sel = select_blocks(tr.qaware_score, tr.context_len[:, None, None, :], k=nb + 1, sink=1, window=2)
    np.testing.assert_array_equal(recall(all_sel, tr.attn_mass, tr.context_len), 1.0)


def test_summary_mean_p10_per_layer():
    r = np.zeros((4, 2, 1, 1))
    r[:, 0, 0, 0] = [1.0, 0.5, 0.5, 1.0]
    r[:, 1] = 1.0
    s = summarize(r)
    assert s.mean == pytest.approx(0.875)
    assert s.per_layer == pytest.approx((0.75, 1.0))
    assert s.p10 == pytest.approx(np.percentile(r, 10))
    assert set(recall_summary(random_score_trace()).to_dict()) == {"mean", "p10", "per_layer"}


def test_bad_input():
    mass = np.ones((1, 4))
    with pytest.raises(ValueError, match="not a complete block"):
        recall(np.array([[3]]), mass, np.array([4 * 64]))
    with pytest.raises(ValueError, match="attn_mass"):
        recall(np.array([[0]]), np.ones((2, 4)), np.array([200]))
    tr = random_score_trace()
    tr.attn_mass = None
    with pytest.raises(ValueError, match="attn_mass"):
        recall(tr)
