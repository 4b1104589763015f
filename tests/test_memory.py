"""GPU memory model: dense grows with context and batch, offloaded KV does not grow with context."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nosasim.contract import TAIL_SLOTS
from nosasim.hardware import load_profile
from nosasim.memory import check_fits, footprint, max_batch, usable_bytes
from nosasim.models import ReplayConfig, load_model

MODEL = load_model("llama3-8b")
DENSE = ReplayConfig(variant="dense")
NOSA = ReplayConfig(variant="nosa", k=64, capacity=96)
INFLLMV2 = ReplayConfig(variant="infllmv2", k=64, capacity=96)


def total(cfg, batch, ctx):
    return sum(footprint(MODEL, cfg, batch, ctx).values())


@settings(max_examples=30, deadline=None)
@given(blocks=st.integers(1, 2000), batch=st.integers(1, 256))
def test_dense_linear_in_context_and_batch(blocks, batch):
    c = blocks * 64
    per_block = total(DENSE, batch, c + 64) - total(DENSE, batch, c)
    assert per_block == total(DENSE, batch, c + 128) - total(DENSE, batch, c + 64)
    assert per_block == batch * MODEL.layers * MODEL.kv_heads * MODEL.block_bytes()
    assert total(DENSE, 2 * batch, c) - total(DENSE, batch, c) == \
        pytest.approx(total(DENSE, batch, c) - total(DENSE, 0, c), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(blocks=st.integers(80, 4000), extra=st.integers(1, 4000), batch=st.integers(1, 64))
def test_offloaded_kv_does_not_grow_with_context(blocks, extra, batch):
    short, long = footprint(MODEL, NOSA, batch, blocks * 64), footprint(MODEL, NOSA, batch, (blocks + extra) * 64)
    slots = 96 + TAIL_SLOTS  # C complete blocks plus the tail's own slot(s)
    assert short["kv_cache"] == long["kv_cache"] == batch * MODEL.layers * MODEL.kv_heads * slots * MODEL.block_bytes()
    dense_grow = total(DENSE, batch, (blocks + extra) * 64) - total(DENSE, batch, blocks * 64)
    # Only the selection state grows. InfLLM-V2: compressed keys (one per 16 tokens, K only) and the block table's
    # per-block statistics, ~1/30 of dense KV; NOSA adds its per-token eviction score (fp32, attention's logit
    # bias), ~1/25.
    for cfg, share in ((INFLLMV2, 30), (NOSA, 24)):
        grow = total(cfg, batch, (blocks + extra) * 64) - total(cfg, batch, blocks * 64)
        assert 0 < grow < dense_grow / share


def test_max_batch_is_the_largest_that_fits():
    p = load_profile("h100-pcie5")
    for cfg in (DENSE, NOSA):
        b = max_batch(p, MODEL, cfg, 16384)
        assert b > 0
        assert total(cfg, b, 16384) <= usable_bytes(p) < total(cfg, b + 1, 16384)
    assert max_batch(p, MODEL, NOSA, 16384) > max_batch(p, MODEL, DENSE, 16384)


def test_batch_that_does_not_fit_reports_footprint():
    p = load_profile("h100-pcie5")
    b = max_batch(p, MODEL, DENSE, 16384)
    check_fits(p, MODEL, DENSE, b, 16384)
    with pytest.raises(ValueError, match=rf"kv_cache .* largest batch that fits is {b}"):
        check_fits(p, MODEL, DENSE, b + 1, 16384)


def test_host_memory_is_reported_and_a_batch_past_it_flagged():
    """A profile that gives its host memory: replay reports the batch's pinned KV beside it and flags a batch whose
    sequences' histories do not fit (at 8K a llama3-8b sequence holds 1 GiB of KV); dense keeps nothing there."""
    import dataclasses
    import json

    from nosasim.hardware import PROFILE_DIR, Profile
    from nosasim.models import ReplayConfig
    from nosasim.sim import host_fits

    d = json.loads((PROFILE_DIR / "h200-pcie5.json").read_text())
    d["host_memory_bytes"] = 8 * 2**30
    prof = Profile.from_dict(d)
    nosa = ReplayConfig(model="llama3-8b", variant="nosa", k=64, batch=4)
    assert host_fits(prof, nosa, 4 * 2**30) is True and host_fits(prof, nosa, 9 * 2**30) is False
    assert host_fits(prof, dataclasses.replace(nosa, variant="dense", k=None, k_q=None, capacity=None),
                     9 * 2**30) is None
    assert host_fits(dataclasses.replace(prof, host_memory_bytes=0.0), nosa, 9 * 2**30) is None  # not known
    for bad in (-1, "128 GiB", True):
        d["host_memory_bytes"] = bad
        with pytest.raises(ValueError, match="host_memory_bytes"):
            Profile.from_dict(d)


def test_replay_prints_host_memory(tmp_path, capsys):
    import json

    from nosasim.cli import main
    from nosasim.hardware import PROFILE_DIR

    d = json.loads((PROFILE_DIR / "h200-pcie5.json").read_text())
    d["host_memory_bytes"] = 2 * 2**30
    path = tmp_path / "small-host.json"
    path.write_text(json.dumps(d))
    trace = str(PROFILE_DIR.parents[1] / "traces" / "samples" / "smollm2-argparse-8k.nosatrace")
    assert main(["replay", trace, "--profile", str(path), "--model", "llama3-8b", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "host memory (pinned KV)" in out and "of 2.00 GiB" in out and "DOES NOT FIT" in out
    assert main(["replay", trace, "--profile", str(path), "--model", "llama3-8b", "--batch", "1", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert pred["host_memory_bytes"] == 2 * 2**30 and pred["host_fits"] is True
