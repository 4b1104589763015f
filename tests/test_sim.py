"""The schedule, the SimPy event model and the analytic path: exact toy timelines, agreement, monotonicity."""


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nosasim.cost import CLASS_INDEX, CLASSES, CostModel
from nosasim.hardware import Profile, load_profile
from nosasim.models import ReplayConfig, load_model
from nosasim.sim import analytic, build_inputs, des, program
from nosasim.sim.schedule import compute_end
from nosasim.sim.schedule import StepInputs

C = len(CLASSES)


def inputs(pre, post, gather, writeback, step_pre=0.0, step_post=0.0):
    """StepInputs with every op's time in class 'gemm' (the stalls are what is being tested)."""
    pre, post = np.atleast_2d(pre).astype(float), np.atleast_2d(post).astype(float)
    steps, m = pre.shape
    pre_cls, post_cls = np.zeros((steps, m, C)), np.zeros((steps, m, C))
    pre_cls[..., 0], post_cls[..., 0] = pre, post
    step_cls = np.zeros((steps, C))
    step_cls[:, 0] = step_pre + step_post
    return StepInputs(pre, post, pre_cls, post_cls, np.full(steps, step_pre), np.full(steps, step_post), step_cls,
                      np.asarray(gather, float), np.asarray(writeback, float))


@pytest.mark.parametrize("sim", [analytic.simulate, des.simulate])
def test_one_layer_toy_timeline_exact(sim):
    # pre 1, gather 2 (waited for), post 3, embed/head 0.5 each; a 10 s writeback issued at 1.5 drains to 11.5.
    r = sim(inputs([[1.0]], [[3.0]], [[[2.0]]], [[[10.0]]], 0.5, 0.5))
    assert r.step_s[0] == pytest.approx(11.5, abs=1e-12)
    assert r.breakdown[0, CLASS_INDEX["h2d_wait"]] == pytest.approx(2.0)
    assert r.breakdown[0, CLASS_INDEX["d2h_wait"]] == pytest.approx(4.5)
    assert r.breakdown[0].sum() == pytest.approx(r.step_s[0], rel=1e-12)


@pytest.mark.parametrize("sim", [analytic.simulate, des.simulate])
def test_two_microbatches_overlap_exact(sim):
    # Program: pre0 [0,1], pre1 [1,2]; gather0 [1,5], gather1 [5,9]; post0 waits to 5, runs [5,8]; post1 waits
    # to 9, runs [9,12]. Stalls 3 + 1 = 4. Serial (m=1 with the same work) would take 1+1+8+3+3 = 16.
    r = sim(inputs([[1.0, 1.0]], [[3.0, 3.0]], [[[4.0, 4.0]]], [[[0.0, 0.0]]]))
    assert r.step_s[0] == pytest.approx(12.0)
    assert r.breakdown[0, CLASS_INDEX["h2d_wait"]] == pytest.approx(4.0)


def test_program_order():
    assert program(2, 1) == [("pre", 0, 0), ("post", 0, 0), ("pre", 1, 0), ("post", 1, 0)]
    assert program(2, 2) == [("pre", 0, 0), ("pre", 0, 1), ("post", 0, 0), ("pre", 1, 0), ("post", 0, 1),
                             ("pre", 1, 1), ("post", 1, 0), ("post", 1, 1)]


def _toy_profile():
    """Bytes-bound toy GPU: 1 GB/s HBM, effectively infinite FLOPs, no launch or transfer latency, eff 1."""
    link = {"peak_Bps": 1e9, "latency_s": 0.0,
            "efficiency": {"chunk_bytes": [1], "counts": [1], "values": [[1.0]]}}
    return Profile.from_dict({"name": "toy", "provenance": "test", "gpu_memory_bytes": 1e12, "hbm_Bps": 1e9,
                              "matmul_flops": 1e30, "vector_flops": 1e30, "launch_s": 0.0, "h2d": link, "d2h": link})


def test_dense_toy_step_time_by_hand():
    # One layer, hidden 4, 1 q/kv head of dim 4, MLP 8, vocab 16, bf16, batch 1. Bytes per step, by hand:
    # embed 16, attn_norm 24, qkv 2*(4+48+12)=128, rope 48, attention 16*ctx+16, o_proj 48, mlp_norm 24,
    # gate_up 2*(4+64+16)=168, silu 48, down 2*(8+32+4)=88, final_norm 24, lm_head 168: 800 + 16*ctx bytes.
    model = load_model("layers=1,q_heads=1,kv_heads=1,head_dim=4,hidden=4,intermediate=8,vocab=16")
    cost = CostModel(_toy_profile(), model, ReplayConfig(variant="dense"))
    ctx = np.array([[100], [101], [4000]])
    zeros = np.zeros((3, 1, 1))
    r = analytic.simulate(build_inputs(cost, ctx, zeros, zeros, 1))
    np.testing.assert_allclose(r.step_s, (800 + 16 * ctx[:, 0]) / 1e9, rtol=1e-12)


def test_offloaded_toy_gather_adds_transfer_time_by_hand():
    model = load_model("layers=1,q_heads=1,kv_heads=1,head_dim=4,hidden=4,intermediate=8,vocab=16")
    cost = CostModel(_toy_profile(), model, ReplayConfig(variant="nosa", k=20))
    ctx = np.array([[2000], [2001]])
    none, five = np.zeros((2, 1, 1)), np.full((2, 1, 1), 5)
    base = analytic.simulate(build_inputs(cost, ctx, none, none, 1)).step_s
    more = analytic.simulate(build_inputs(cost, ctx, five, none, 1)).step_s
    # 5 missed blocks = 10 chunks of 64 tokens x 4 dims x 2 bytes at 1 GB/s, fully exposed (nothing overlaps).
    np.testing.assert_allclose(more - base, 10 * 512 / 1e9, rtol=1e-9)


def _random_inputs(seed, steps, layers, m, slowdown=0.0, split=False):
    rng = np.random.default_rng(seed)
    pre_cls, post_cls = rng.random((steps, m, C)) * 1e-5, rng.random((steps, m, C)) * 1e-5
    pre_cls[..., CLASS_INDEX["h2d_wait"]] = post_cls[..., CLASS_INDEX["h2d_wait"]] = 0
    step_cls = rng.random((steps, C)) * 1e-5
    g = rng.random((steps, layers, m)) * 4e-5
    g[g < 1.5e-5] = 0
    w = rng.random((steps, layers, m)) * 2e-5
    w[w < 1.6e-5] = 0
    early = rng.random((steps, layers, m)) * 2e-5 if split else None
    late = rng.random((steps, layers, m)) * 1e-5 if split else None
    return StepInputs(pre_cls.sum(2), post_cls.sum(2), pre_cls, post_cls, step_cls.sum(1) / 3,
                      step_cls.sum(1) * 2 / 3, step_cls, g, w, overlap_slowdown=slowdown, early=early, late=late)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), layers=st.integers(1, 6), m=st.integers(1, 4),
       slowdown=st.sampled_from([0.0, 0.22, 0.9]), split=st.booleans())
def test_analytic_equals_des(seed, layers, m, slowdown, split):
    inp = _random_inputs(seed, 12, layers, m, slowdown, split)
    a, d = analytic.simulate(inp), des.simulate(inp)
    np.testing.assert_allclose(a.step_s, d.step_s, rtol=1e-9)  # far inside the required 1%
    np.testing.assert_allclose(a.breakdown, d.breakdown, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(a.breakdown.sum(axis=1), a.step_s, rtol=1e-9)


def test_median_breakdown_sums_to_median():
    r = analytic.simulate(_random_inputs(3, 10, 4, 2))
    step, parts = r.median_step()
    assert step == pytest.approx(float(np.median(r.step_s)), rel=1e-12)
    assert sum(parts.values()) == pytest.approx(step, rel=1e-9)


MODEL = load_model("llama3-8b")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 3), faster=st.floats(1.0, 10.0), keep=st.floats(0.0, 1.0))
def test_more_bandwidth_or_fewer_misses_never_slower(seed, m, faster, keep):
    rng = np.random.default_rng(seed)
    steps, layers, batch = 6, 4, 6
    ctx = 8192 + np.arange(steps)[:, None] + rng.integers(0, 4096, batch)[None, :]
    misses = rng.integers(0, 40, (steps, layers, batch))
    wbs = (rng.random((steps, layers, batch)) < 0.1).astype(int)
    cfg = ReplayConfig(variant="nosa", k=64, batch=batch, microbatches=m)
    p = load_profile("h100-pcie5")
    base = analytic.simulate(build_inputs(CostModel(p, MODEL, cfg), ctx, misses, wbs, m)).step_s
    fast = analytic.simulate(build_inputs(CostModel(p.scaled(pcie=faster), MODEL, cfg), ctx, misses, wbs, m)).step_s
    # A higher hit rate: each miss count cut to a fraction (some become hits).
    fewer = np.floor(misses * keep).astype(int)
    hit = analytic.simulate(build_inputs(CostModel(p, MODEL, cfg), ctx, fewer, wbs, m)).step_s
    assert np.all(fast <= base * (1 + 1e-12))
    assert np.all(hit <= base * (1 + 1e-12))


def test_des_matches_analytic_on_a_profile_driven_replay(tmp_path):
    from nosasim.sim import predict
    from nosasim.trace.synth import synthesize

    trace = synthesize("nosa", 3, 2, 2, 40, 64, 8192, head_dim=128, seed=5)
    for mb in (1, 2):
        cfg = ReplayConfig(model="llama3-8b", variant="nosa", batch=4, microbatches=mb)
        a, d = predict(trace, cfg), predict(trace, cfg, method="des")
        assert a.step_time_s == pytest.approx(d.step_time_s, rel=0.01)
        np.testing.assert_allclose(a.step_times, d.step_times, rtol=1e-9)
        assert sum(a.breakdown.values()) == pytest.approx(a.step_time_s, rel=0.01)
        assert a.h2d_bytes_per_step > 0 and 0 < a.hit_rate < 1


def test_trace_model_resolves_to_preset_by_shape():
    from nosasim.sim import _preset_for
    from nosasim.trace import ModelShape

    assert _preset_for(ModelShape(30, 3, 64, 2, 9, "HuggingFaceTB/SmolLM2-135M")) == "smollm2-135m"
    with pytest.raises(ValueError, match="not a preset"):
        _preset_for(ModelShape(3, 3, 64, 2, None, "synthetic"))


def test_simulator_imports_no_torch_or_cupy():
    import subprocess
    import sys

    code = ("import sys, nosasim.sim, nosasim.sim.des, nosasim.sim.analytic, nosasim.sweep, nosasim.plot, "
            "nosasim.memory, nosasim.cli.cmd_replay, nosasim.cli.cmd_sweep, nosasim.cli.cmd_compare; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'cupy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_compute_end_stretches_only_while_a_gather_runs():
    # Engine busy for 3 s more: at slowdown 0.5 a 1 s op takes 1.5 s; a 4 s op gets 2 s done in the 3 busy seconds,
    # then 2 s at full speed; an idle engine (busy_until in the past) changes nothing.
    assert compute_end(10.0, 1.0, 13.0, 0.5) == pytest.approx(11.5)
    assert compute_end(10.0, 4.0, 13.0, 0.5) == pytest.approx(15.0)
    assert compute_end(10.0, 4.0, 9.0, 0.5) == pytest.approx(14.0)
    assert compute_end(10.0, 4.0, 13.0, 0.0) == 14.0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_overlap_slowdown_costs_only_overlapped_steps(seed):
    """One micro-batch never computes beside its gathers (each layer waits for its own), so the slowdown changes
    nothing; with two it can only add time, and more slowdown adds more."""
    one = [analytic.simulate(_random_inputs(seed, 10, 4, 1, s)).step_s for s in (0.0, 0.5)]
    np.testing.assert_array_equal(one[0], one[1])
    two = [analytic.simulate(_random_inputs(seed, 10, 4, 2, s)).step_s for s in (0.0, 0.2, 0.5)]
    assert (two[1] >= two[0] - 1e-15).all() and (two[2] >= two[1] - 1e-15).all()
    assert (two[2] > two[0]).any()


def test_split_attention_hides_the_gather_behind_resident_blocks():
    """Attention split around the gather: with one micro-batch the resident blocks' attention runs while the misses
    copy, so the step is shorter than waiting first, by at most the gather; with nothing to wait for it only adds
    the second launch and the merge."""
    from nosasim.sim import predict
    from nosasim.trace.synth import synthesize

    tr = synthesize("nosa", 4, 8, 4, 120, 64, 8192, head_dim=128, seed=9)
    plain = predict(tr, ReplayConfig(model="llama3-8b", batch=16, k=64, k_q=33), check_memory=False)
    split = predict(tr, ReplayConfig(model="llama3-8b", batch=16, k=64, k_q=33, split_attention=True),
                    check_memory=False)
    assert split.step_time_s < plain.step_time_s
    assert plain.step_time_s - split.step_time_s <= plain.breakdown["h2d_wait"] + 1e-12
    assert split.breakdown["h2d_wait"] < plain.breakdown["h2d_wait"]
    assert split.floor["overlapped"] and not plain.floor["overlapped"]
    with pytest.raises(ValueError, match="split_attention"):
        ReplayConfig(variant="dense", split_attention=True)
