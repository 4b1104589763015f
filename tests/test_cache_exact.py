"""Exact hit, miss, write-back and eviction sequences of the block cache on hand-made traces.

Most traces use a block size of 2 tokens so that a block completes every other step; every expected value
below was worked out by hand from the rules in docs/cache-semantics.md (the comments show the reasoning).
"""

import json

import numpy as np
import pytest

from nosasim.cache import POLICIES, CapacityError, simulate_arrays
from nosasim.cache.policies import eviction_order, keep_key

BS = 2
POLICY_NAMES = sorted(POLICIES)


def make_sel(steps: list[list[int]], width: int | None = None) -> np.ndarray:
    """One row: a list of selections -> int16 [steps, 1, width], -1 padded."""
    width = width or max(1, max(len(s) for s in steps))
    out = np.full((len(steps), 1, width), -1, np.int16)
    for t, s in enumerate(steps):
        out[t, 0, :len(s)] = sorted(s)
    return out


# The main scenario: context 9..14 tokens, block size 2 -> tails 4,4,5,5,6,6. Block 4 completes at step 2 and
# block 5 at step 4 (one write-back each); both are selected right away, so they are hits.
MAIN_CTX = np.arange(9, 15)
MAIN_SEL = make_sel([[0, 1, 2], [0, 3], [2, 4], [1, 2], [0, 5], [4, 5]])
MAIN_WB = [0, 0, 1, 0, 1, 0]
STATIC_SCORE = np.array([[0.5, 0.9, 0.1, 0.3, 0.2, 0.7, 0.0]], np.float32)  # blocks 0..6 of the one row

# policy -> (hits, misses, evicted ids per step) at C = 3.
MAIN_EXPECTED = {
    # t1: 1,2 unselected with lru key 0 each: tie, lower id 1 goes. t2: 0,3 both key 1: 0 goes. t3: 3 (key 1)
    # vs 4 (key 2, attended at t2). t4: surplus 2 of 1 (key 3), 2 (key 3), 4 (key 2): 4 then 1. t5: 0 (4) vs 2 (3).
    "lru": ([0, 1, 2, 1, 1, 1], [3, 1, 0, 1, 1, 1], [[], [1], [0], [3], [1, 4], [2]]),
    # t2: 0 (2 selections) beats 3 (1). t3: 4 has 1 selection vs 0's 2. t4: 1 (2 sel.) vs 2 (3 sel.).
    # t5: 0 and 2 both 3 selections; 2 was last attended earlier (t3 vs t4).
    "lfu": ([0, 1, 2, 1, 2, 1], [3, 1, 0, 1, 0, 1], [[], [1], [3], [4], [1], [2]]),
    # scores 0:.5 1:.9 2:.1 3:.3 4:.2 5:.7. t1: 2 (.1) goes. t2: 2 is a miss, surplus 2 of {0,1,3}: 3, 0.
    # t3: nothing beyond C. t4: surplus 2 of {1,2,4}: 2, 4. t5: 0 (.5) vs 1 (.9).
    "static": ([0, 1, 1, 2, 1, 1], [3, 1, 1, 0, 1, 1], [[], [2], [0, 3], [], [2, 4], [0]]),
    # next uses: 0 -> t1,t4; 1 -> t3; 2 -> t2,t3; 3 -> never after t1; 4 -> t5; 5 -> t5.
    # t1: 1 (t3) farther than 2 (t2). t2: 3 never again. t3: 4 (t5) farther than 0 (t4).
    # t4: 1 and 2 never again: tie, lower id 1. t5: 0 and 2 never again: 0.
    "belady": ([0, 1, 2, 1, 2, 1], [3, 1, 0, 1, 0, 1], [[], [1], [3], [4], [1], [0]]),
    # prev keeps exactly S_t: every unselected candidate goes, the just-completed tail included.
    "prev": ([0, 1, 1, 1, 1, 1], [3, 1, 1, 1, 1, 1], [[], [1, 2], [0, 3], [4], [1, 2], [0]]),
}


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_main_scenario_exact(policy):
    res = simulate_arrays(MAIN_SEL, MAIN_CTX, policy, 3, block_size=BS, static_score=STATIC_SCORE, record=True)
    hits, misses, evicted = MAIN_EXPECTED[policy]
    assert res.hits[:, 0].tolist() == hits
    assert res.misses[:, 0].tolist() == misses
    assert res.writebacks[:, 0].tolist() == MAIN_WB
    assert [res.evicted_ids(t, 0) for t in range(6)] == evicted
    assert res.evictions[:, 0].tolist() == [len(e) for e in evicted]
    # The resident set after every step holds all of S_t, never more than C blocks, and nothing evicted.
    for t in range(6):
        resident = set(res.resident_ids(t, 0))
        selected = {b for b in MAIN_SEL[t, 0] if b >= 0}
        assert selected <= resident
        assert len(resident) <= 3
        assert not resident & set(evicted[t])


def test_belady_is_best_on_main_scenario():
    totals = {p: sum(MAIN_EXPECTED[p][0]) for p in POLICY_NAMES}
    assert totals["belady"] == max(totals.values()) == 7


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_cold_start(policy):
    # Step 0 starts with nothing resident even though the blocks "exist": every selected block is a miss,
    # and no write-back happens although the context already has complete blocks.
    res = simulate_arrays(make_sel([[0, 1, 2, 3]]), [10], policy, 4, block_size=BS, static_score=STATIC_SCORE)
    assert (res.hits.item(), res.misses.item(), res.writebacks.item(), res.evictions.item()) == (0, 4, 0, 0)


@pytest.mark.parametrize("policy", ["lru", "lfu", "static", "belady"])
def test_completed_tail_is_free_and_written_back_once(policy):
    # ctx 3,4,5,6,7 -> tails 1,1,2,2,3: block 1 completes at step 2, block 2 at step 4. Block 1 is selected
    # only at step 3 (one step after completing) and is still a hit: C = 2 left room for it at step 2.
    # At step 4 block 2 completes and is selected: block 1 is the surplus.
    sel = make_sel([[0], [0], [0], [0, 1], [0, 2]])
    res = simulate_arrays(sel, np.arange(3, 8), policy, 2, block_size=BS, static_score=STATIC_SCORE, record=True)
    assert res.writebacks[:, 0].tolist() == [0, 0, 1, 0, 1]
    assert res.misses[:, 0].tolist() == [1, 0, 0, 0, 0]
    assert res.hits[:, 0].tolist() == [0, 1, 1, 2, 2]
    assert [res.evicted_ids(t, 0) for t in range(5)] == [[], [], [], [], [1]]


def test_prev_drops_an_unselected_completed_tail():
    sel = make_sel([[0], [0], [0], [0, 1]])
    res = simulate_arrays(sel, np.arange(3, 7), "prev", 2, block_size=BS, record=True)
    assert res.evicted_ids(2, 0) == [1]  # completed at step 2, not selected: evicted at once
    assert res.hits[:, 0].tolist() == [0, 1, 1, 1]
    assert res.misses[:, 0].tolist() == [1, 0, 0, 1]


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_tail_id_in_selection_is_not_an_access(policy):
    # ctx 9 -> tail 4: an id 4 in the selection is the partial tail block, always on the GPU.
    res = simulate_arrays(make_sel([[0, 4]]), [9], policy, 2, block_size=BS, static_score=STATIC_SCORE)
    assert (res.hits.item(), res.misses.item()) == (0, 1)


@pytest.mark.parametrize("policy", ["lru", "lfu", "static", "belady", "prev"])
def test_ties_evict_the_lower_id_first(policy):
    # Blocks 3 and 4 look identical to every policy at step 1 (same step, same count, same score, never
    # selected again); C = 2 leaves room for one of them next to block 0, so block 3 must go.
    sel = make_sel([[3, 4], [0]])
    equal = np.ones((1, 6), np.float32)
    res = simulate_arrays(sel, [11, 12], policy, 2, block_size=BS, static_score=equal, record=True)
    if policy == "prev":
        assert res.evicted_ids(1, 0) == [3, 4]
    else:
        assert res.evicted_ids(1, 0) == [3]
        assert res.resident_ids(1, 0) == [0, 4]


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_capacity_larger_than_needed_never_evicts(policy):
    # C = 7 covers every block the row ever has: only first touches miss, completed tails are hits.
    res = simulate_arrays(MAIN_SEL, MAIN_CTX, policy, 7, block_size=BS, static_score=STATIC_SCORE, record=True)
    if policy == "prev":  # prev ignores C: same as at C = 3
        assert res.hits[:, 0].tolist() == MAIN_EXPECTED["prev"][0]
        return
    assert res.evictions.sum() == 0
    assert res.misses[:, 0].tolist() == [3, 1, 0, 0, 0, 0]
    assert res.hits[:, 0].tolist() == [0, 1, 2, 2, 2, 2]
    assert res.resident_ids(5, 0) == [0, 1, 2, 3, 4, 5]


def test_capacity_below_largest_selection_is_an_error():
    with pytest.raises(ValueError, match=r"C=2 .*largest selection \(3 complete blocks.*max \|S_t\| = 3"):
        simulate_arrays(MAIN_SEL, MAIN_CTX, "lru", 2, block_size=BS)
    # The tail id does not count towards the selection size: 2 complete blocks fit C = 2.
    res = simulate_arrays(make_sel([[0, 1, 4]]), [9], "lru", 2, block_size=BS)
    assert res.misses.item() == 2


def test_capacity_error_is_a_value_error_with_numbers():
    with pytest.raises(CapacityError) as info:
        simulate_arrays(MAIN_SEL, MAIN_CTX, "prev", 1, block_size=BS)
    assert (info.value.max_selection, info.value.capacity) == (3, 1)


def test_static_without_scores_is_an_error():
    with pytest.raises(ValueError, match="policy 'static' needs .*agnostic_score"):
        simulate_arrays(MAIN_SEL, MAIN_CTX, "static", 3, block_size=BS)


def test_future_block_is_an_error_naming_step_and_row():
    sel = np.full((2, 2, 2), -1, np.int16)
    sel[:, :, 0] = 0
    sel[1, 1, 1] = 5  # ctx 9 at step 1 -> tail 4: block 5 does not exist yet
    with pytest.raises(ValueError, match=r"block id 5 at step 1, row 1 .*future block"):
        simulate_arrays(sel, [8, 9], "lru", 2, block_size=BS)


def test_engine_refuses_more_chunks_after_an_error():
    from nosasim.cache import CacheEngine

    engine = CacheEngine("lru", 2, rows=1, block_size=BS, first_step=100)
    with pytest.raises(ValueError, match="block id 7 at step 100, row 0"):
        engine.feed(make_sel([[7]]), [9])
    with pytest.raises(ValueError, match="stopped at an error"):
        engine.feed(make_sel([[0]]), [10])


def test_duplicate_id_is_an_error():
    with pytest.raises(ValueError, match="block id 1 appears twice in the selection of step 0, row 0"):
        simulate_arrays(make_sel([[1, 1]]), [9], "lru", 2, block_size=BS)


def test_negative_id_other_than_padding_is_an_error():
    with pytest.raises(ValueError, match="id -3 at step 0, row 0; ids must be >= 0, or -1 for padding"):
        simulate_arrays(np.array([[[0, -3]]], np.int16), [9], "lru", 2, block_size=BS)


@pytest.mark.parametrize("bad, match", [
    ({"policy": "fifo"}, "policy must be one of"),
    ({"capacity": -1}, "capacity must be an integer >= 0"),
    ({"context_len": [9, 11, 12, 13, 14, 15]}, "increase by exactly one"),
    ({"context_len": [0, 1, 2, 3, 4, 5]}, "must be >= 1"),
])
def test_bad_arguments(bad, match):
    args = {"policy": "lru", "capacity": 3, "context_len": MAIN_CTX} | bad
    with pytest.raises(ValueError, match=match):
        simulate_arrays(MAIN_SEL, args["context_len"], args["policy"], args["capacity"], block_size=BS)


def test_rows_are_independent_and_context_may_be_per_row():
    # Row 0 is the main scenario; row 1 runs 10 tokens ahead with a different selection pattern.
    sel = np.concatenate([MAIN_SEL, make_sel([[0], [0, 1], [1], [1], [0, 1, 2], [7]], 3)], axis=1)
    ctx = np.stack([MAIN_CTX, MAIN_CTX + 10], axis=1)
    both = simulate_arrays(sel, ctx, "lru", 3, block_size=BS)
    alone = simulate_arrays(sel[:, 1:], ctx[:, 1], "lru", 3, block_size=BS)
    assert both.hits[:, 0].tolist() == MAIN_EXPECTED["lru"][0]
    assert both.hits[:, 1].tolist() == alone.hits[:, 0].tolist()
    assert both.misses[:, 1].tolist() == alone.misses[:, 0].tolist() == [1, 1, 0, 0, 1, 1]


def test_keep_key_reference_orders_like_the_engine():
    # Stats of blocks 0, 1, 3, 4 at step 4 of the main scenario under lfu: counts 3,2,1,1 / last 4,3,1,2.
    order = eviction_order("lfu", [0, 1, 3, 4], times_selected=[3, 2, 1, 1], last_used=[4, 3, 1, 2])
    assert order.tolist() == [3, 4, 1, 0]
    assert eviction_order("belady", [5, 2, 7], next_use=[np.inf, 9, np.inf]).tolist() == [5, 7, 2]
    assert eviction_order("static", [1, 2], static_score=[np.nan, -5.0]).tolist() == [1, 2]
    primary, _ = keep_key("lru", last_used=[3, 1])
    assert primary.tolist() == [3.0, 1.0]
    with pytest.raises(ValueError, match="needs 'next_use'"):
        keep_key("belady", last_used=[1])


# ---- trace level: simulate_cache on Trace objects and files, CacheResult, CLI ----

trace_mod = pytest.importorskip("nosasim.trace")


def _main_trace(with_scores=True, layers=2):
    sel = np.broadcast_to(MAIN_SEL[:, None, None, :, :], (6, layers, 1, 1, 3)).copy()
    score = np.broadcast_to(STATIC_SCORE, (layers, 1, 1, 7)).copy() if with_scores else None
    model = trace_mod.ModelShape(layers=layers, kv_heads=1, head_dim=64)
    return trace_mod.Trace.from_arrays(sel, MAIN_CTX[:, None], block_size=BS, model=model, agnostic_score=score,
                                       k=3, chunk_steps=4)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_simulate_cache_on_trace_and_file(policy, tmp_path):
    from nosasim.cache import simulate_cache

    trace = _main_trace()
    path = tmp_path / "main.nosatrace"
    trace_mod.write_trace(path, trace)
    hits, misses, _ = MAIN_EXPECTED[policy]
    # In memory, streamed from a file (chunks of 4 steps: state carried across), and from a reader.
    with trace_mod.TraceReader(path) as reader:
        results = [simulate_cache(trace, policy, 3), simulate_cache(path, policy, 3),
                   simulate_cache(reader, policy, 3, progress=True)]
    for res in results:
        assert res.hits.shape == (6, 2, 1, 1)
        assert res.hits[:, 1, 0, 0].tolist() == hits
        assert res.total_misses == 2 * sum(misses)
        assert res.total_writebacks == 4
        assert res.per_layer()["hits"] == [sum(hits), sum(hits)]
        assert res.hit_rate == pytest.approx(sum(hits) / (sum(hits) + sum(misses)))
    block_bytes = 2 * BS * 64 * 2
    assert results[1].h2d_bytes().tolist() == [2 * m * block_bytes for m in misses]
    assert results[1].d2h_bytes(100).tolist() == [2 * w * 100 for w in MAIN_WB]


def test_simulate_cache_errors_name_layer_head_seq(tmp_path):
    from nosasim.cache import simulate_cache

    with pytest.raises(ValueError, match="policy 'static' needs"):
        simulate_cache(_main_trace(with_scores=False), "static", 3)
    with pytest.raises(ValueError, match=r"max \|S_t\| = 3"):
        simulate_cache(_main_trace(), "lru", 2)
    trace = _main_trace()
    trace.sel[1, 1, 0, 0, 1] = 9  # bypasses from_arrays' checks on purpose: the engine must not crash
    with pytest.raises(ValueError, match="block id 9 at step 1, layer 1, KV head 0, seq 0"):
        simulate_cache(trace, "lru", 3)


def test_streamed_capacity_error_reports_the_whole_traces_largest_selection(tmp_path):
    from nosasim.cache import simulate_cache

    # C = 1 already fails at step 0 (2 blocks), in the first stored chunk; the largest selection (3 blocks)
    # is in the second chunk, and the message must still give it.
    sel = make_sel([[0, 1], [0, 1], [0, 1], [0, 1], [0, 1, 2], [0]])[:, None, None]
    trace = trace_mod.Trace.from_arrays(sel, MAIN_CTX[:, None], block_size=BS, k=3, chunk_steps=4,
                                        model=trace_mod.ModelShape(layers=1, kv_heads=1, head_dim=64))
    path = tmp_path / "t.nosatrace"
    trace_mod.write_trace(path, trace)
    with pytest.raises(CapacityError, match=r"C=1 .*max \|S_t\| = 3") as info:
        simulate_cache(path, "lru", 1)
    assert info.value.max_selection == 3


def test_record_gives_resident_sets_per_layer_head_seq():
    from nosasim.cache import simulate_cache

    res = simulate_cache(_main_trace(), "static", 3, record=True)
    assert res.resident.shape == (6, 2, 1, 1, 7)
    # static at step 2 keeps {1, 2, 4} and evicts {0, 3} (see MAIN_EXPECTED).
    assert np.flatnonzero(res.resident[2, 1, 0, 0]).tolist() == [1, 2, 4]
    assert np.flatnonzero(res.evicted[2, 0, 0, 0]).tolist() == [0, 3]


def test_capacity_defaults_to_k_and_json_summary():
    from nosasim.cache import simulate_cache

    res = simulate_cache(_main_trace(), "belady")
    assert res.capacity == 3
    summary = json.loads(json.dumps(res.to_json()))
    assert (summary["hits"], summary["misses"], summary["writebacks"]) == (14, 12, 4)
    assert summary["per_layer"]["misses"] == [6, 6]
    assert summary["h2d_bytes"] == 12 * 2 * BS * 64 * 2


def test_trace_without_accesses_has_no_hit_rate():
    from nosasim.cache import simulate_cache

    sel = np.full((3, 1, 1, 1, 2), -1, np.int16)
    trace = trace_mod.Trace.from_arrays(sel, np.arange(9, 12)[:, None], block_size=BS, k=2,
                                        model=trace_mod.ModelShape(layers=1, kv_heads=1, head_dim=64))
    res = simulate_cache(trace, "lru", 2)
    assert res.accesses == 0 and np.isnan(res.hit_rate)
    summary = res.to_json()
    assert summary["hit_rate"] is None and summary["per_layer"]["hit_rate"] == [None]
    assert summary["writebacks"] == 1  # block 4 completes at step 2 (ctx 11) even though nothing is selected


def test_cli_cache_json_and_table(tmp_path, capsys):
    from nosasim.cli import main

    path = tmp_path / "main.nosatrace"
    trace_mod.write_trace(path, _main_trace())
    assert main(["cache", str(path), "--policy", "lfu", "--capacity", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["hits"], out["misses"], out["writebacks"]) == (14, 12, 4)
    assert out["per_layer"]["hits"] == [7, 7]
    assert main(["cache", str(path), "--policy", "lru"]) == 0
    table = capsys.readouterr().out
    assert "total" in table and "12" in table  # lru: 6 hits per layer, 12 in all
    assert main(["cache", str(path), "--policy", "lru", "--capacity", "1"]) == 2
    assert "max |S_t| = 3" in capsys.readouterr().err
