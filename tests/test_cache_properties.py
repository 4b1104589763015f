"""Invariants of the block-cache engine on random small traces, and an exact match with a set-based reference.

The reference simulator below is written from docs/cache-semantics.md with Python sets and full sorts, sharing
no code with the numba engine (not even the keep-key helpers), so a bug would have to be made twice, the same
way, to pass.
"""

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nosasim.cache import POLICIES, CacheEngine, eviction_order, simulate_arrays

POLICY_NAMES = sorted(POLICIES)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_trace(seed: int, steps: int, rows: int, width: int, block_size: int, locality: float):
    """(sel int16 [T, R, width], ctx int [T, R], static [R, n_blocks]) with sorted, unique, -1 padded rows.

    Selections sometimes name the tail (must be ignored) and are drawn from a small pool of recent picks with
    probability ``locality``, so that hits, ties and evictions all happen. Scores are small integers: many ties.
    """
    rng = np.random.default_rng(seed)
    start = rng.integers(1, 4 * block_size + 2, size=rows)
    ctx = start[None, :] + np.arange(steps)[:, None]
    tails = (ctx - 1) // block_size
    n_blocks = int(tails.max()) + 1
    sel = np.full((steps, rows, width), -1, np.int16)
    prev = [set() for _ in range(rows)]
    for t in range(steps):
        for r in range(rows):
            tail = int(tails[t, r])
            pool = sorted(prev[r] | ({tail - 1} if tail > 0 else set()))
            n = int(rng.integers(0, min(width, tail + 1) + 1))
            chosen = set()
            for _ in range(n):
                if pool and rng.random() < locality:
                    chosen.add(int(rng.choice(pool)))
                else:
                    chosen.add(int(rng.integers(0, tail + 1)))  # tail + 1 ids: the tail itself may come up
            chosen = sorted(chosen)[:width]
            sel[t, r, :len(chosen)] = chosen
            prev[r] = {b for b in chosen if b < tail}
    static = rng.integers(0, 3, size=(rows, n_blocks)).astype(np.float32)
    return sel, ctx, static


def reference(sel, ctx, policy, capacity, block_size, static):
    """Set-based simulator: per row and step, (hits, misses, writebacks, evicted set, resident set)."""
    steps, rows, _ = sel.shape
    out = []
    for r in range(rows):
        tails = [int((ctx[t, r] - 1) // block_size) for t in range(steps)]
        chosen = [{int(b) for b in sel[t, r] if 0 <= b < tails[t]} for t in range(steps)]
        resident, last, count, prev_tail, row = set(), {}, {}, None, []
        for t in range(steps):
            cands, wb = set(resident), 0
            if prev_tail is not None and prev_tail < tails[t]:
                cands.add(prev_tail)
                last[prev_tail], wb = t - 1, 1
            prev_tail = tails[t]
            s = chosen[t]
            hits, misses = len(s & cands), len(s - cands)
            for b in s:
                last[b], count[b] = t, count.get(b, 0) + 1
            others = cands - s

            def key(b):
                if policy == "lru":
                    return (last[b], b)
                if policy == "lfu":
                    return (count.get(b, 0), last[b], b)
                if policy == "static":
                    return (float(static[r, b]), b)
                nxt = next((u for u in range(t + 1, steps) if b in chosen[u]), math.inf)
                return (-nxt, b)

            keep = set() if policy == "prev" else set(sorted(others, key=key, reverse=True)[:capacity - len(s)])
            resident = s | keep
            row.append((hits, misses, wb, others - keep, resident))
        out.append(row)
    return out


trace_params = st.tuples(
    st.integers(0, 2**32 - 1),  # seed
    st.integers(1, 14),  # steps
    st.integers(1, 3),  # rows
    st.integers(1, 6),  # width (k)
    st.sampled_from([1, 2, 3]),  # block size
    st.floats(0.0, 0.9),  # locality
)


def _accesses(sel, ctx, block_size):
    """Selected complete blocks per step and row (the tail is not an access)."""
    tails = (ctx - 1) // block_size
    return ((sel >= 0) & (sel < tails[:, :, None])).sum(axis=2)


def _max_sel(sel, ctx, block_size):
    return int(_accesses(sel, ctx, block_size).max())


def _case(params, extra):
    """A random trace and a capacity ``extra`` slots above its largest selection."""
    sel, ctx, static = random_trace(*params)
    bs = params[4]
    return sel, ctx, static, bs, _max_sel(sel, ctx, bs) + extra


@SETTINGS
@given(trace_params, st.integers(0, 4))
def test_engine_equals_reference_for_every_policy(params, extra):
    sel, ctx, static, bs, cap = _case(params, extra)
    for policy in POLICY_NAMES:
        res = simulate_arrays(sel, ctx, policy, cap, block_size=bs, static_score=static, record=True)
        ref = reference(sel, ctx, policy, cap, bs, static)
        for r, row in enumerate(ref):
            for t, (hits, misses, wb, evicted, resident) in enumerate(row):
                got = (res.hits[t, r], res.misses[t, r], res.writebacks[t, r], set(res.evicted_ids(t, r)),
                       set(res.resident_ids(t, r)))
                assert got == (hits, misses, wb, evicted, resident), (policy, t, r)


@SETTINGS
@given(trace_params, st.integers(0, 3))
def test_hits_plus_misses_are_the_accesses(params, extra):
    sel, ctx, static, bs, cap = _case(params, extra)
    accesses = _accesses(sel, ctx, bs)
    tails = (ctx - 1) // bs
    writebacks = np.vstack([np.zeros((1, ctx.shape[1]), int), np.diff(tails, axis=0)])
    for policy in POLICY_NAMES:
        res = simulate_arrays(sel, ctx, policy, cap, block_size=bs, static_score=static)
        np.testing.assert_array_equal(res.hits + res.misses, accesses)
        np.testing.assert_array_equal(res.writebacks, writebacks)
        assert (res.evictions >= 0).all()


@SETTINGS
@given(trace_params, st.integers(0, 3))
def test_belady_hits_at_least_every_other_policy(params, extra):
    sel, ctx, static, bs, cap = _case(params, extra)
    hits = {p: simulate_arrays(sel, ctx, p, cap, block_size=bs, static_score=static).hits.sum(axis=0)
            for p in POLICY_NAMES}
    for policy in POLICY_NAMES:
        assert (hits["belady"] >= hits[policy]).all(), policy  # per row: each row is its own cache


@SETTINGS
@given(trace_params)
def test_lru_and_belady_hits_never_decrease_with_capacity(params):
    sel, ctx, static = random_trace(*params)
    bs = params[4]
    base = _max_sel(sel, ctx, bs)
    for policy in ("lru", "belady"):
        per_cap = [simulate_arrays(sel, ctx, policy, c, block_size=bs).hits.sum(axis=0) for c in range(base, base + 5)]
        for small, large in zip(per_cap, per_cap[1:]):
            assert (large >= small).all(), policy


@SETTINGS
@given(trace_params, st.integers(0, 3))
def test_prev_hits_are_the_overlap_with_the_previous_step(params, extra):
    sel, ctx, _ = random_trace(*params)
    bs = params[4]
    res = simulate_arrays(sel, ctx, "prev", _max_sel(sel, ctx, bs) + extra, block_size=bs)
    tails = (ctx - 1) // bs
    for r in range(sel.shape[1]):
        previous = set()
        for t in range(sel.shape[0]):
            s = {int(b) for b in sel[t, r] if 0 <= b < tails[t, r]}
            assert res.hits[t, r] == len(s & previous)
            # S_t-1 plus the previous tail, restricted to blocks complete at step t.
            previous = {b for b in s | {int(tails[t, r])} if t + 1 < sel.shape[0] and b < tails[t + 1, r]}


@SETTINGS
@given(trace_params, st.integers(0, 3), st.data())
def test_streaming_in_chunks_equals_one_pass(params, extra, data):
    sel, ctx, static, bs, cap = _case(params, extra)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, sel.shape[0] - 1)), max_size=3)))
    for policy in ("prev", "lru", "lfu", "static"):
        whole = simulate_arrays(sel, ctx, policy, cap, block_size=bs, static_score=static)
        # n_blocks=1: the engine must grow its per-block state as later chunks reach further blocks.
        engine = CacheEngine(policy, cap, sel.shape[1], bs, static_score=static, n_blocks=1)
        parts = [engine.feed(sel[a:b], ctx[a:b]) for a, b in zip([0] + cuts, cuts + [sel.shape[0]]) if a < b]
        for name in ("hits", "misses", "writebacks", "evictions"):
            np.testing.assert_array_equal(np.concatenate([getattr(p, name) for p in parts]), getattr(whole, name))


@SETTINGS
@given(trace_params, st.integers(0, 3))
def test_numpy_keep_key_reproduces_the_engines_evictions(params, extra):
    """What the GPU runtime will do: rank the candidates with the numpy keep key, evict the surplus."""
    sel, ctx, static, bs, cap = _case(params, extra)
    tails = (ctx - 1) // bs
    steps = sel.shape[0]
    for policy in ("lru", "lfu", "static", "belady"):
        res = simulate_arrays(sel, ctx, policy, cap, block_size=bs, static_score=static, record=True)
        for r in range(sel.shape[1]):
            chosen = [{int(b) for b in sel[t, r] if 0 <= b < tails[t, r]} for t in range(steps)]
            last, count, resident = {}, {}, set()
            for t in range(steps):
                cands = set(resident)
                if t and tails[t - 1, r] < tails[t, r]:
                    cands.add(int(tails[t - 1, r]))
                    last[int(tails[t - 1, r])] = t - 1
                for b in chosen[t]:
                    last[b], count[b] = t, count.get(b, 0) + 1
                others = sorted(cands - chosen[t])
                surplus = max(0, len(cands | chosen[t]) - cap)
                order = eviction_order(
                    policy, others,
                    last_used=[last[b] for b in others], times_selected=[count.get(b, 0) for b in others],
                    next_use=[next((u for u in range(t + 1, steps) if b in chosen[u]), np.inf) for b in others],
                    static_score=[static[r, b] for b in others],
                )
                assert set(order[:surplus].tolist()) == set(res.evicted_ids(t, r)), (policy, t, r)
                resident = set(res.resident_ids(t, r))
