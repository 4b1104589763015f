"""Block selection (nosasim.select) against a brute-force reference, and the synthetic generators built on it."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nosasim.select import reselect, select_blocks
from nosasim.trace import tails_of
from nosasim.trace.synth import synthesize


def reference_select(q, ctx, k, k_q, sink, window, bs, agn):
    """One row, written as plainly as possible from the rules in nosasim.select's docstring."""
    tail = (ctx - 1) // bs
    complete = list(range(tail))
    if tail <= k - 1:
        return complete
    chosen = [b for b in complete if b < sink or b >= tail - (window - 1)]
    score = lambda arr, b: -np.inf if np.isnan(arr[b]) else float(arr[b])  # noqa: E731
    rest = sorted((b for b in complete if b not in chosen), key=lambda b: (-score(q, b), b))
    budget_q = (k if (k_q is None or agn is None) else k_q) - 1 - len(chosen)
    chosen += rest[: max(budget_q, 0)]
    if agn is not None and k_q is not None and k_q < k:
        rest = sorted((b for b in complete if b not in chosen), key=lambda b: (-score(agn, b), b))
        chosen += rest[: max(k - 1 - len(chosen), 0)]
    return sorted(chosen)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_select_matches_reference(data):
    sink = data.draw(st.integers(0, 2))
    window = data.draw(st.integers(1, 4))
    k = data.draw(st.integers(sink + window, 12))
    nosa = data.draw(st.booleans())
    k_q = data.draw(st.integers(sink + window, k)) if nosa else None
    bs = 4
    ctx = data.draw(st.integers(1, 80))
    nb = (ctx - 1) // bs + 1
    # Few distinct values so that ties happen often; some NaN.
    vals = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0]), st.just(float("nan")))
    q = np.array(data.draw(st.lists(vals, min_size=nb, max_size=nb)))
    agn = np.array(data.draw(st.lists(vals, min_size=nb, max_size=nb))) if nosa else None
    got = select_blocks(q, ctx, k=k, k_q=k_q, sink=sink, window=window, block_size=bs, agnostic=agn)
    want = reference_select(q, ctx, k, k_q, sink, window, bs, agn)
    assert got[got >= 0].tolist() == want
    assert (got[len(want):] == -1).all()


def test_ties_go_to_lower_block_id():
    q = np.zeros(10)
    sel = select_blocks(q, 10 * 64, k=4, sink=1, window=1)  # 9 complete blocks, 3 free picks after the sink
    assert sel.tolist() == [0, 1, 2, -1]


@pytest.mark.parametrize("kw, match", [
    (dict(k=5, sink=1, window=16), "k \\(5\\) must be >= sink \\+ window"),
    (dict(k=64, k_q=70, sink=1, window=16), "k_q \\(70\\)"),
    (dict(k=64, k_q=10, sink=1, window=16), "k_q \\(10\\)"),
])
def test_impossible_budgets(kw, match):
    with pytest.raises(ValueError, match=match):
        select_blocks(np.zeros(200), 200 * 64, **kw)


def test_synth_is_seeded_and_hits_its_overlap_target():
    from nosasim.trace.stats import overlap_per_layer

    a = synthesize("infllmv2", 2, 2, 2, 200, 64, 8192, overlap=0.8, seed=11)
    b = synthesize("infllmv2", 2, 2, 2, 200, 64, 8192, overlap=0.8, seed=11)
    assert np.array_equal(a.sel, b.sel)

    class Reader:  # overlap_per_layer streams from a reader; give it the in-memory trace
        header = a.header

        def iter_chunks(self):
            yield a

    assert abs(np.nanmean(overlap_per_layer(Reader())) - 0.8) < 0.02


@pytest.mark.parametrize("kind", ["infllmv2", "nosa"])
def test_reselect_at_recorded_budget_reproduces_synth(kind):
    tr = synthesize(kind, 2, 3, 2, 150, 32, 4000, kq=17, seed=2, window=8)
    p = tr.header.selection
    again = reselect(tr, p.budget)
    assert np.array_equal(again.sel, tr.sel)


def test_nosa_overlap_bound_holds_every_step():
    k, kq = 32, 12
    tr = synthesize("nosa", 2, 2, 2, 300, k, 6000, kq=kq, overlap=0.0, seed=4, window=4, context_spread=500)
    rows = tr.rows()
    tails = np.broadcast_to(tails_of(tr.context_len, 64)[:, None, None, :], tr.sel.shape[:4]).reshape(tr.steps, -1)
    for t in range(1, tr.steps):
        for r in range(rows.shape[1]):
            prev = set(rows[t - 1, r][rows[t - 1, r] >= 0]) | {tails[t - 1, r]}
            cur = set(rows[t, r][rows[t, r] >= 0])
            assert len(cur & prev) >= k - kq, (t, r)


def _take_top_by_sort(score, allowed, budget):
    """The rule as a stable sort (the implementation before the linear-time one): NaN below -inf, ties to the
    lower id."""
    key = np.where(allowed, np.nan_to_num(score.astype(np.float64), nan=-np.inf), np.nan)
    order = np.argsort(-key, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :], axis=1)
    return allowed & (rank < budget[:, None])


def test_take_top_equals_the_stable_sort_rule():
    """The partition-based top-k marks exactly the blocks the stable sort does, on scores full of ties, NaN and
    both infinities, in every float width, for budgets below zero, inside and past the allowed count."""
    from nosasim.select import _take_top

    rng = np.random.default_rng(0)
    for case in range(400):
        R, nb = int(rng.integers(1, 20)), int(rng.integers(1, 300))
        s = np.round(rng.normal(size=(R, nb)) * rng.choice([1, 3, 100]))
        u = rng.random((R, nb))
        s = np.where(u < 0.1, np.nan, np.where(u < 0.2, -np.inf, np.where(u < 0.25, np.inf, s)))
        s = s.astype(rng.choice([np.float16, np.float32, np.float64]))
        allowed = rng.random((R, nb)) < rng.random()
        budget = rng.integers(-2, nb + 3, size=R)
        np.testing.assert_array_equal(_take_top(s, allowed, budget), _take_top_by_sort(s, allowed, budget),
                                      err_msg=f"case {case}")
