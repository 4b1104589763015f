"""Batch assembly from step-shifted copies and cyclic retargeting to another model shape."""

import numpy as np
import pytest

from nosasim.batch import per_layer_seq, per_microbatch, plan_batch
from nosasim.contract import microbatch_groups


def test_batch_within_trace_takes_first_sequences():
    p = plan_batch(seqs=5, steps=30, batch=3)
    assert p.seq.tolist() == [0, 1, 2] and p.offset.tolist() == [0, 0, 0] and p.steps == 30


def test_larger_batch_uses_step_shifted_copies_never_lockstep():
    p = plan_batch(seqs=3, steps=100, batch=10)
    pairs = set(zip(p.seq.tolist(), p.offset.tolist()))
    assert len(pairs) == 10  # no slot replays the same sequence at the same step as another
    assert p.steps >= 50 and p.steps + p.offset.max() <= 100
    arr = np.arange(100)[:, None] * 10 + np.arange(3)[None, :]  # value = step * 10 + seq
    out = p.take(arr)
    assert out.shape == (p.steps, 10)
    np.testing.assert_array_equal(out[7], (7 + p.offset) * 10 + p.seq)


def test_take_keeps_middle_axes():
    p = plan_batch(seqs=2, steps=20, batch=3)
    arr = np.random.default_rng(0).integers(0, 9, (20, 4, 2))
    out = p.take(arr)
    assert out.shape == (p.steps, 4, 3)
    np.testing.assert_array_equal(out[:, :, 2], arr[p.offset[2]:p.offset[2] + p.steps, :, p.seq[2]])


def test_too_short_trace_for_batch():
    with pytest.raises(ValueError, match="step-shifted"):
        plan_batch(seqs=1, steps=10, batch=8)


def test_cyclic_retarget_matches_explicit_mapping():
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 50, (7, 2, 3, 4))  # [T, Ls=2, Hs=3, S]
    got = per_layer_seq(rows, layers=5, heads=8)
    expect = np.zeros((7, 5, 4), dtype=np.int64)
    for layer in range(5):
        for h in range(8):
            expect[:, layer] += rows[:, layer % 2, h % 3]
    np.testing.assert_array_equal(got, expect)


def test_microbatches_nearly_equal_and_sums():
    groups = microbatch_groups(10, 3)
    assert sorted(len(g) for g in groups) == [3, 3, 4]
    arr = np.arange(20).reshape(2, 10)
    np.testing.assert_array_equal(per_microbatch(arr, groups).sum(-1), arr.sum(-1))
    with pytest.raises(ValueError, match="microbatches"):
        microbatch_groups(2, 3)
