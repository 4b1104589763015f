"""The GPU block table on hand-made traces (exact misses and eviction order) and against nosasim's engine."""

import numpy as np
import pytest
import torch

from runtime.blockcache import BlockTable, replay_misses, update_table

cache = pytest.importorskip("nosasim.cache")
synth = pytest.importorskip("nosasim.trace.synth")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _run(policy, sels, ctx, capacity, device="cpu"):
    table = BlockTable.allocate(1, 1, capacity, 32, policy, device)
    misses, resident, tail_prev = [], [], None
    for t, (s, c) in enumerate(zip(sels, ctx)):
        tail = (c - 1) // 64
        sel = torch.tensor([s + [-1] * (6 - len(s))], device=device)
        sel = torch.where(sel == tail, -1, sel)
        done = torch.tensor([tail_prev is not None and tail > tail_prev], device=device)
        plan = update_table(table, 0, sel, torch.tensor(t, device=device), done,
                            torch.tensor([tail - 1], device=device), check=True)
        misses.append(int(plan.n_miss))
        resident.append(sorted(b for b in table.slot_block[0, 0].tolist() if b >= 0))
        tail_prev = tail
        # Every selected block sits in the slot the plan says.
        for j, b in enumerate(sel[0].tolist()):
            if b >= 0:
                assert table.slot_block[0, 0, int(plan.sel_slot[0, j])] == b
    return misses, resident


@pytest.mark.parametrize("device", DEVICES)
def test_lru_and_lfu_exact_eviction_order(device):
    sels = [[1, 2, 3], [2, 4], [1], [1, 3]]
    ctx = [650, 651, 652, 653]  # tail 10 throughout
    m, res = _run("lru", sels, ctx, 3, device)
    assert m == [3, 1, 1, 1]
    # t1: 1 and 3 tie on recency, the lower id goes; t3: 2 and 4 tie, 2 goes.
    assert res == [[1, 2, 3], [2, 3, 4], [1, 2, 4], [1, 3, 4]]
    m, res = _run("lfu", sels, ctx, 3, device)
    assert m == [3, 1, 1, 1]
    assert res == [[1, 2, 3], [2, 3, 4], [1, 2, 4], [1, 2, 3]]  # t3: 4 was selected once, 2 twice


@pytest.mark.parametrize("device", DEVICES)
def test_completed_tail_is_admitted_free(device):
    # Tail 9 completes at step 1 (ctx 641): a free candidate; selecting it at step 2 is not a miss.
    sels = [[1, 2], [1, 2], [2, 9]]
    m, res = _run("lru", sels, [640, 641, 642], 4, device)
    assert m == [2, 0, 0]
    assert res == [[1, 2], [1, 2, 9], [1, 2, 9]]
    m, res = _run("prev", sels, [640, 641, 642], 4, device)
    assert m == [2, 0, 1]  # prev keeps only what step 1 attended: block 9 was the tail then, so it is dropped
    assert res == [[1, 2], [1, 2], [2, 9]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["prev", "lru", "lfu", "static"])
@pytest.mark.parametrize("capacity", [15, 24])
def test_misses_equal_nosasim_engine(device, policy, capacity):
    tr = synth.synthesize("nosa", layers=2, heads=2, seqs=3, steps=120, k=16, context=3000, kq=9, overlap=0.8,
                          seed=1, context_spread=100, window=4)
    static = tr.agnostic_score.reshape(-1, tr.n_blocks) if policy == "static" else None
    ref = cache.simulate_arrays(tr.rows(), tr.context_len, policy, capacity, static_score=static).misses
    got = replay_misses(torch.from_numpy(tr.sel.astype(np.int64)).to(device), torch.from_numpy(tr.context_len),
                        policy, capacity, 64, torch.from_numpy(tr.agnostic_score).to(device), check=True)
    np.testing.assert_array_equal(got.reshape(tr.steps, -1).cpu().numpy(), ref)


def test_static_key_orders_floats_like_numpy():
    from runtime.blockcache import _float_key
    x = torch.tensor([float("nan"), -float("inf"), -3.5, -0.0, 0.0, 1e-30, 2.0, float("inf")])
    k = _float_key(x)
    assert k[0] == k[1]  # NaN reads as -inf
    assert bool((k[2:].diff() >= 0).all()) and k[2] > k[1]
    assert k[3] == k[4]  # -0.0 and 0.0 tie, as they compare equal
