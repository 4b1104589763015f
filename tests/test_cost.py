"""Per-op costs: the roofline without tables, calibrated tables reproduced at their own shapes, shape scaling."""

import copy
import json

import numpy as np
import pytest

from nosasim.cost import CostModel
from nosasim.hardware import PROFILE_DIR, Profile, load_profile
from nosasim.models import ReplayConfig, load_model


def _profile(**ops):
    d = json.loads((PROFILE_DIR / "a100-pcie4.json").read_text())
    if ops:
        d["ops"] = ops
    return Profile.from_dict(d)


def test_gemm_roofline_without_table_is_exact():
    p = _profile()
    c = CostModel(p, load_model("llama3-8b"), ReplayConfig(variant="nosa", k=64))
    m, n, k = 16, 4096, 14336
    expect = max(2 * m * n * k / p.matmul_flops, 2 * (m * k + k * n + m * n) / p.hbm_Bps) + p.launch_s
    assert float(c.gemm(m, n, k)) == pytest.approx(expect, rel=1e-12)


def test_calibrated_gemm_table_reproduces_its_entries():
    p = load_profile("h100-pcie5-reference")
    c = CostModel(p, load_model("llama3-8b"), ReplayConfig(variant="nosa", k=64))
    assert float(c.gemm(64, 2048, 8192)) == pytest.approx(24.832e-6, rel=1e-9)  # the reference's decode GEMM
    assert float(c.gemm(8192, 8192, 8192)) == pytest.approx(1.41335e-3, rel=1e-9)
    # Between the two measured points the efficiency is interpolated: bigger GEMMs never get cheaper.
    sizes = [c.gemm(64, n, 4096) for n in (1024, 4096, 14336, 57344)]
    assert all(a < b for a, b in zip(sizes, sizes[1:]))


def test_attention_scales_with_context_only_when_dense():
    p = load_profile("h100-pcie5-reference")  # roofline attention (the calibrated table has fixed costs too)
    model = load_model("llama3-8b")
    ctx = np.array([4096.0, 8192.0, 16384.0, 32768.0]) * 8
    dense = CostModel(p, model, ReplayConfig(variant="dense")).layer_ops(8, ctx)[1][0]
    sparse = CostModel(p, model, ReplayConfig(variant="nosa", k=64)).layer_ops(8, ctx)[1][0]
    assert dense.name == "dense_attention" and sparse.name == "sparse_attention"
    # Dense attention is HBM-bound: doubling the KV read nearly doubles the time.
    assert np.all(np.diff(dense.seconds) > 0)
    assert dense.seconds[3] / dense.seconds[2] == pytest.approx(2.0, rel=0.02)
    assert np.ptp(sparse.seconds) == 0.0


def test_selection_cost_grows_with_context_and_nosa_adds_static_topk():
    p = load_profile("h100-pcie5")
    model = load_model("llama3-8b")
    ctx = np.array([8192.0, 65536.0]) * 4
    pre_inf = CostModel(p, model, ReplayConfig(variant="infllmv2", k=64)).layer_ops(4, ctx)[0]
    pre_nosa = CostModel(p, model, ReplayConfig(variant="nosa", k=64)).layer_ops(4, ctx)[0]
    sel_inf = {o.name: o for o in pre_inf}["selection"].seconds
    sel_nosa = {o.name: o for o in pre_nosa}["selection"].seconds
    assert sel_inf[1] > sel_inf[0]
    assert np.all(sel_nosa > sel_inf)


@pytest.mark.parametrize("layout, chunk, per_block", [("joint", 16384, 1), ("split", 8192, 2)])
def test_transfer_chunks_follow_the_host_layout(layout, chunk, per_block):
    p = load_profile("h100-pcie5")
    c = CostModel(p, load_model("smollm2-135m"), ReplayConfig(variant="nosa", k=64, kv_layout=layout))
    # head_dim 64: a block of K plus V is 16 KiB; joint moves it as one chunk, split as K and V chunks of 8 KiB.
    assert c.block.chunk_bytes == chunk and c.block.chunks_per_block == per_block
    assert float(c.gather_time(256)) == pytest.approx(float(p.h2d.time(chunk, 256 * per_block)), rel=1e-12)
    assert float(c.gather_time(0)) == 0.0
    assert float(c.writeback_time(3)) == pytest.approx(float(p.d2h.time(chunk, 3 * per_block)), rel=1e-12)


def test_elementwise_table_overrides_launch_cost():
    table = {"elementwise": [{"bytes": 1e6, "seconds": 4e-6}, {"bytes": 1e9, "seconds": 6e-4}]}
    p = _profile(**copy.deepcopy(table))
    c = CostModel(p, load_model("llama3-8b"), ReplayConfig(variant="dense"))
    assert float(c.elementwise(1e6)) == pytest.approx(4e-6, rel=1e-9)
    assert float(c.elementwise(1e9)) == pytest.approx(6e-4, rel=1e-9)


def test_selection_grid_reproduces_its_points_and_interpolates_each_axis():
    """Selection is read as a (batch, context) grid: exact at measured points, linear in context within a batch and
    then in batch, whatever two shapes of equal bytes cost (the case a single roofline curve got wrong)."""
    shape = {"q_heads": 32, "kv_heads": 8, "head_dim": 128}
    pts = {(8, 8192): 20e-6, (8, 32768): 60e-6, (64, 8192): 50e-6, (64, 32768): 250e-6, (32, 65536): 330e-6}
    table = [{"batch": b, **shape, "context": c, "seconds": t} for (b, c), t in pts.items()]
    c = CostModel(_profile(selection_nosa=table, selection=table), load_model("llama3-8b"),
                  ReplayConfig(variant="nosa", k=64))
    for (b, ctx), t in pts.items():
        assert float(c.grid_time("selection_nosa", b, ctx)) == pytest.approx(t, rel=1e-12)
    assert float(c.grid_time("selection_nosa", 8, 16384)) == pytest.approx(20e-6 + 40e-6 / 3, rel=1e-12)
    # At 64K only batch 32 was measured near the context: batches 8 and 64 (measured to 32K) are not extrapolated
    # along their short rows; the one row that reaches 64K is taken in proportion to the batch.
    assert float(c.grid_time("selection_nosa", 64, 65536)) == pytest.approx(330e-6 * 2, rel=1e-12)
    assert float(c.grid_time("selection_nosa", 16, 65536)) == pytest.approx(330e-6 / 2, rel=1e-12)
    # Within REACH (10%) of a row's last context the row still counts: at 36K batches 8 and 64 interpolate.
    assert float(c.grid_time("selection_nosa", 64, 36000)) == pytest.approx(250e-6 + 200e-6 * (36000 - 32768) / 24576,
                                                                          rel=1e-12)
    # Between batches 8 and 32 at 8K; batch 32 has one point (64K), so its row is proportional to context.
    mid = float(c.grid_time("selection_nosa", 16, 8192))
    assert mid == pytest.approx(20e-6 + (330e-6 * 8192 / 65536 - 20e-6) * 8 / 24, rel=1e-9)
    pre, _ = c.layer_ops(64, np.array([64 * 8192.0]))
    assert float(next(op for op in pre if op.name == "selection").seconds[0]) == pytest.approx(50e-6, rel=1e-12)
    # Past the largest measured batch (64) the cost per row stays batch 64's, not the 8 -> 64 trend's.
    assert float(c.grid_time("selection_nosa", 128, 8192)) == pytest.approx(2 * 50e-6, rel=1e-12)
    assert float(c.grid_time("selection_nosa", 96, 32768)) == pytest.approx(1.5 * 250e-6, rel=1e-12)


def test_sparse_attention_is_read_off_its_batch_blocks_grid():
    """Sparse attention (bf16 and fp8 tables) is a (batch, k_blocks) grid: measured points come back exactly (with
    NOSA's bias bytes in proportion), batches between them interpolate linearly, whatever rate each batch ran at
    (a batch-64 point slower per byte than batch 96, as the H200's launch rule makes an FP8 pool)."""
    shape = {"q_heads": 32, "kv_heads": 8, "head_dim": 128}
    pts = {(32, 64): 108e-6, (64, 64): 226e-6, (96, 64): 262e-6, (64, 32): 120e-6}
    table = [{"batch": b, **shape, "k_blocks": k, "seconds": t} for (b, k), t in pts.items()]
    m = load_model("llama3-8b")
    for kind, dt in (("sparse_attention", "bf16"), ("sparse_attention_fp8", "fp8")):
        c = CostModel(_profile(**{kind: table}), m, ReplayConfig(variant="nosa", k=64, kv_dtype=dt))
        assert c.attention_kind == kind
        kv = 2.0 * c.block.dtype_bytes * m.kv_heads * m.head_dim * 64 * 64  # per sequence, k = 64 blocks
        qo = 2.0 * m.dtype_bytes * m.q_heads * m.head_dim
        bias = 4.0 * m.kv_heads * 64
        scale = lambda b: (b * (kv + qo) + b * bias) / (b * (kv + qo))  # noqa: E731
        for b in (32, 64, 96):
            assert c.sparse_attention_time(b) == pytest.approx(pts[(b, 64)] * scale(b), rel=1e-9)
        assert c.sparse_attention_time(48) == pytest.approx((108e-6 + 226e-6) / 2 * scale(48), rel=1e-9)
        assert c.sparse_attention_time(192) == pytest.approx(2 * 262e-6 * scale(192), rel=1e-9)  # past: per row


@pytest.mark.parametrize("profile", sorted(p.stem for p in PROFILE_DIR.glob("*.json")))
def test_every_bundled_profile_costs_every_preset_model(profile):
    """Tables measured on one model's shape must not break another model's costs: the H200 profile's walk table
    (llama3-8b only, no roofline of its own) once made every other model's replay a RuntimeError."""
    from nosasim.models import presets

    for name in presets():
        model = load_model(name)
        for variant, extra in (("dense", {}), ("infllmv2", {"k": 32}), ("nosa", {"k": 32, "split_attention": True})):
            cfg = ReplayConfig(profile=profile, model=name, variant=variant, batch=4, **extra)
            cost = CostModel(load_profile(profile), model, cfg)
            t = cost.sparse_attention_time(4) if variant != "dense" else cost.gemm(4, model.hidden, model.hidden)
            assert np.all(np.isfinite(t)) and np.all(np.asarray(t) > 0), (profile, name, variant)
            if variant == "nosa":
                before, after = cost.attention_split(4, np.full(3, 40.0), np.full(3, 8.0))
                assert np.all(before > 0) and np.all(after > 0)


def test_reach_notes_name_the_tables_read_outside_their_measured_range():
    shape = {"q_heads": 32, "kv_heads": 8, "head_dim": 128}
    sel = [{"batch": b, **shape, "context": c, "seconds": 1e-5 * b * c / 8192} for b in (8, 64) for c in (8192, 32768)]
    att = [{"batch": b, **shape, "k_blocks": k, "seconds": 1e-6 * b * k} for b in (8, 64) for k in (32, 64)]
    c = CostModel(_profile(selection_nosa=sel, sparse_attention=att), load_model("llama3-8b"),
                  ReplayConfig(variant="nosa", k=64))
    assert c.reach_notes(64, 32768.0) == [] and c.reach_notes(8, 35000.0) == []  # within REACH of 32K
    notes = c.reach_notes(128, 131072.0)
    assert len(notes) == 3 and all("past the" in n for n in notes)
    assert any(n.startswith("selection_nosa: context 131,072") for n in notes)
    assert any(n.startswith("sparse_attention: batch 128") for n in notes)
    assert CostModel(_profile(selection_nosa=sel, sparse_attention=att), load_model("llama3-8b"),
                     ReplayConfig(variant="nosa", k=128)).reach_notes(8, 8192.0) == [
        "sparse_attention: k 128 past the largest measured, 64"]
    # Another model's shape: the grids do not apply, and the notes say so.
    other = CostModel(_profile(selection_nosa=sel, sparse_attention=att), load_model("smollm2-135m"),
                      ReplayConfig(variant="nosa", k=64))
    assert all("other model shapes" in n for n in other.reach_notes(8, 8192.0))
