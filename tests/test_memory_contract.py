"""The runtime allocates what the simulator plans: every part of ``nosasim.memory.plan`` equals, to the byte, the
buffers the runtime builds for it, for every variant; and the largest batch is one function's answer on both
sides."""

import pytest

torch = pytest.importorskip("torch")

from nosasim import memory  # noqa: E402
from nosasim.contract import Budget  # noqa: E402
from nosasim.models import ModelSpec, ReplayConfig, load_model  # noqa: E402
from runtime.backends import DenseBackend, OffloadBackend  # noqa: E402
from runtime.config import RuntimeConfig  # noqa: E402
from runtime.kvstore import HostStore  # noqa: E402
from runtime.model import Weights  # noqa: E402

SHAPE = ModelSpec("t", layers=2, q_heads=4, kv_heads=2, head_dim=16, hidden=32, intermediate=48, vocab=11)


def _nbytes(*tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:  # a buffer shared by two owners counts once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _allocated(cfg: RuntimeConfig) -> dict[str, int]:
    """The runtime's buffers for ``cfg``, by the plan's part names."""
    w = Weights.random(cfg.shape, getattr(torch, cfg.dtype), "cpu", 0)
    evict = [t for lw in w.layers for t in (lw.evict_w, lw.evict_a)]
    weights = [w.embed, w.norm, w.lm_head] + [t for lw in w.layers for t in (lw.attn_norm, lw.wqkv, lw.wo,
                                                                             lw.mlp_norm, lw.w13, lw.w2)]
    out = {"weights": _nbytes(*weights), "eviction_head": _nbytes(*evict)}
    if not cfg.offloaded:
        out["kv_cache"] = _nbytes(DenseBackend(cfg, "cpu").pool)
        return out
    host = HostStore.allocate(cfg, pin=False)
    trace = torch.zeros((1, cfg.shape.layers, cfg.shape.kv_heads, cfg.batch, cfg.budget.k), dtype=torch.long)
    be = OffloadBackend(cfg, "cpu", host, trace if cfg.variant == "trace" else None)
    t, sc = be.table, be.scores
    out["kv_cache"] = _nbytes(be.pool)
    static = t.static if t.static is not None and (sc.static is None or t.static.data_ptr() != sc.static.data_ptr()) \
        else None
    out["block_table"] = _nbytes(t.slot_block, t.last, t.count, static)
    if sc.ckeys is not None:
        out["compressed_keys"] = _nbytes(sc.ckeys, sc.kacc)
    if sc.cis is not None:
        out["eviction_scores"] = _nbytes(sc.cis, sc.cscore, sc.sacc, sc.static)
    out["step_counters"] = _nbytes(be.loaded)
    return out


CASES = [("dense", None, "prev"), ("infllmv2", Budget(12, window=4), "lru"),
         ("nosa", Budget(12, 8, window=4, capacity=15), "static"), ("nosa", Budget(12, 8, window=4), "prev"),
         ("trace", Budget(12, window=4, capacity=20), "static"), ("trace", Budget(12, window=4), "lfu")]


@pytest.mark.parametrize("variant,budget,policy", CASES)
@pytest.mark.parametrize("batch,context", [(3, 500), (1, 127)])
@pytest.mark.parametrize("kv_dtype,ckey_dtype", [(None, None), ("fp8", None), ("fp8", "fp8")])
def test_runtime_allocates_the_plan(variant, budget, policy, batch, context, kv_dtype, ckey_dtype):
    if kv_dtype and variant == "dense":
        pytest.skip("dense keeps its KV in the run's dtype")
    if ckey_dtype and variant not in ("infllmv2", "nosa"):
        pytest.skip("only the scoring variants keep compressed keys")
    cfg = RuntimeConfig(SHAPE, variant, batch=batch, context=context, steps=9, budget=budget, policy=policy,
                        dtype="float32", kv_dtype=kv_dtype, ckey_dtype=ckey_dtype)
    planned = cfg.gpu_bytes()
    got = _allocated(cfg)
    exact = {k: v for k, v in planned.items() if k in memory.EXACT_PARTS + ("step_counters",) and v}
    assert got == exact
    # The simulator plans the same parts for the same configuration (the runtime adds only its step counters).
    if variant != "trace":
        sim = memory.plan(cfg.model_for_memory, variant, budget, policy, batch, cfg.max_tokens, cfg.block,
                          cfg.ckey_bytes)
        assert {k: v for k, v in sim.items() if v} == {k: v for k, v in planned.items() if v and k != "step_counters"}
    # And the simulator's own configuration of it plans the same.
    if variant not in ("trace", "dense"):
        rc = ReplayConfig(variant=variant, batch=batch, kv_dtype=kv_dtype or "bf16", ckey_dtype=ckey_dtype or "bf16",
                          k=budget.k, k_q=budget.k_q if variant == "nosa" else None, sink=budget.sink,
                          window=budget.window, capacity=budget.capacity, policy=policy)
        assert memory.footprint(cfg.model_for_memory, rc, batch, cfg.max_tokens) == sim


@pytest.mark.parametrize("variant,budget", [("dense", None), ("nosa", Budget(64, 33)), ("infllmv2", Budget(64))])
def test_largest_batch_is_one_answer(variant, budget):
    """The simulator's max batch on a profile equals the runtime's rule on the same usable bytes."""
    from nosasim.hardware import load_profile
    from runtime.config import PRESETS

    p = load_profile("h100-pcie5")
    model = load_model("llama3-8b")
    tokens = 16384
    cfg = ReplayConfig(variant=variant, **({} if budget is None else dict(k=budget.k, k_q=budget.k_q)))
    sim = memory.max_batch(p, model, cfg, tokens)
    rt = RuntimeConfig(PRESETS["llama3-8b"], variant, batch=1, context=tokens - 1, steps=1, budget=budget)
    assert rt.max_tokens == tokens
    same = memory.largest_batch(memory.usable_bytes(p), rt.model_for_memory, variant, rt.budget, rt.policy,
                                rt.max_tokens, rt.block)
    assert sim == same > 0
    # It is the largest that fits: one more does not.
    total = lambda b: sum(memory.footprint(model, cfg, b, tokens).values())  # noqa: E731
    assert total(sim) <= memory.usable_bytes(p) < total(sim + 1)
