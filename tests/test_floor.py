"""The floor of a decode step: bytes and FLOPs at the profile's peaks, counted by hand on small cases; never above
the prediction; device and link terms combined by the schedule; carried by replay, compare and sweep outputs."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nosasim.cli import main
from nosasim.floor import step_floor
from nosasim.hardware import load_profile
from nosasim.models import ModelSpec, ReplayConfig
from nosasim.sim import predict
from nosasim.trace import write_trace
from nosasim.trace.synth import synthesize

PROFILE = load_profile("h100-pcie5")
M = ModelSpec("m", layers=2, q_heads=4, kv_heads=2, head_dim=8, hidden=16, intermediate=32, vocab=10)


def test_dense_floor_by_hand():
    ctx = np.array([[129, 64]])  # two sequences: 3 blocks (tail of 1 token) and 1 block (full tail)
    attended = np.array([[[2 * 2, 0]] * 2])  # complete blocks per layer and sequence, summed over 2 KV heads
    zeros = np.zeros((1, 2, 2))
    f = step_floor(PROFILE, M, ReplayConfig(variant="dense"), ctx, attended, zeros, zeros)
    weights = (M.params - M.vocab * M.hidden) * 2 + 2 * M.hidden * 2
    tokens = 2 * 2 * (128 + 1 + 64)  # layers x heads x tokens attended, tails included
    kv = tokens * 2 * 8 * 2
    new_kv = 2 * 2 * 2 * 2 * 8 * 2
    assert f.hbm_bytes[0] == weights + kv + new_kv
    assert f.hbm_parts["kv"][0] == kv and f.h2d_bytes[0] == 0
    matmul = M.params - M.vocab * M.hidden - M.hidden * 5  # no norms, no embedding lookup; the LM head counts
    assert f.flops[0] == 2 * 2 * matmul + 4 * 2 * 8 * tokens
    assert f.floor_s[0] == pytest.approx(max(f.hbm_bytes[0] / PROFILE.hbm_Bps, f.flops[0] / PROFILE.matmul_flops))


def test_link_term_and_overlap_rule():
    ctx = np.full((3, 1), 1000)
    attended = np.full((3, 2, 1), 30)
    misses = np.array([[[0], [0]], [[10], [20]], [[500], [500]]])
    wbs = np.zeros_like(misses)
    serial = step_floor(PROFILE, M, ReplayConfig(variant="nosa", k=16, k_q=10, window=4), ctx, attended, misses, wbs)
    over = step_floor(PROFILE, M, ReplayConfig(variant="nosa", k=16, k_q=10, window=4, microbatches=1, batch=2),
                      ctx, attended, misses, wbs)
    block = 2 * 64 * 8 * 2
    np.testing.assert_array_equal(serial.h2d_bytes, [0, 30 * block, 1000 * block])
    np.testing.assert_allclose(serial.link_s, serial.h2d_bytes / PROFILE.h2d.peak_Bps)
    np.testing.assert_allclose(serial.floor_s, serial.device_s + serial.link_s)  # one micro-batch: no overlap
    assert not serial.overlapped and not over.overlapped
    mb = step_floor(PROFILE, M, ReplayConfig(variant="nosa", k=16, k_q=10, window=4, batch=2, microbatches=2),
                    np.full((3, 2), 1000), np.full((3, 2, 2), 15), misses.repeat(2, 2) // 2, wbs.repeat(2, 2))
    assert mb.overlapped
    np.testing.assert_allclose(mb.floor_s, np.maximum(mb.device_s, mb.link_s))


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    tr = synthesize("nosa", 4, 2, 4, 160, 64, 8192, head_dim=128, seed=4)
    path = tmp_path_factory.mktemp("floor") / "t.nosatrace"
    write_trace(path, tr)
    return path, tr


@settings(max_examples=25, deadline=None)
@given(variant=st.sampled_from(["dense", "infllmv2", "nosa"]), batch=st.sampled_from([2, 4, 16, 64]),
       policy=st.sampled_from(["prev", "lru"]), capacity=st.sampled_from([None, 80, 128]),
       microbatches=st.sampled_from([1, 2]))
def test_floor_is_below_the_prediction(trace_path, variant, batch, policy, capacity, microbatches):
    _, tr = trace_path
    budget = {} if variant == "dense" else dict(k=64, capacity=capacity, policy=policy)
    pred = predict(tr, ReplayConfig(model="llama3-8b", variant=variant, batch=batch, microbatches=microbatches,
                                    **budget), check_memory=False)
    assert 0 < pred.floor_s <= pred.step_time_s
    assert pred.x_floor == pytest.approx(pred.step_time_s / pred.floor_s)
    assert pred.floor["bound"] in ("hbm", "flops", "link")


def test_outputs_carry_the_floor(trace_path, tmp_path, capsys):
    path, _ = trace_path
    assert main(["replay", str(path), "--model", "llama3-8b", "--batch", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["floor_s"] > 0 and out["x_floor"] >= 1 and out["floor"]["hbm_parts"]["weights"] > 0
    assert main(["replay", str(path), "--model", "llama3-8b", "--batch", "8"]) == 0
    assert "x floor" in capsys.readouterr().out
    sweep = tmp_path / "sw"
    assert main(["sweep", str(path), "--model", "llama3-8b", "--batch", "2,8", "--workers", "1", "--quiet", "--out",
                 str(sweep)]) == 0
    header = (sweep / "points.csv").read_text().splitlines()[0].split(",")
    assert "floor_s" in header and "x_floor" in header


def test_fp8_store_halves_every_block_moved(trace_path):
    _, tr = trace_path
    kw = dict(model="llama3-8b", batch=8, k=64, k_q=33)
    bf16 = predict(tr, ReplayConfig(**kw), check_memory=False)
    fp8 = predict(tr, ReplayConfig(**kw, kv_dtype="fp8"), check_memory=False)
    assert fp8.hit_rate == bf16.hit_rate  # the same selections and cache decisions
    assert fp8.h2d_bytes_per_step == bf16.h2d_bytes_per_step / 2
    assert fp8.memory["kv_cache"] == bf16.memory["kv_cache"] / 2
    assert fp8.floor["hbm_parts"]["kv"] == bf16.floor["hbm_parts"]["kv"] / 2
    assert fp8.step_time_s < bf16.step_time_s
    with pytest.raises(ValueError, match="kv_dtype"):
        ReplayConfig(variant="dense", kv_dtype="fp8")
