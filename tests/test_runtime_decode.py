"""The offloaded backend end to end, driven by a trace: attention equals dense attention over the same tokens of
the full history, the host store ends equal to the full K/V history bit for bit, and the per-step loaded-block
count equals nosasim's miss count for every policy."""

import numpy as np
import pytest
import torch

from runtime.backends import OffloadBackend
from nosasim.contract import Budget
from nosasim.models import ModelSpec
from runtime.config import RuntimeConfig
from runtime.decode import Runner, check_fits
from runtime.kvstore import HostStore
from runtime.model import Weights

nosasim_cache = pytest.importorskip("nosasim.cache")
synth = pytest.importorskip("nosasim.trace.synth")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
SHAPE = ModelSpec("t", layers=2, q_heads=4, kv_heads=2, head_dim=16, hidden=32, intermediate=32, vocab=11)


def _drive(device, policy, capacity, kind="random", steps=40, dtype="float32"):
    # Blocks of 32 tokens: every sequence crosses a block boundary within the few steps a CPU test can afford.
    tr = synth.synthesize(kind, layers=2, heads=2, seqs=3, steps=steps, k=12, context=500, kq=8 if kind == "nosa" else None,
                          window=4, overlap=0.7, seed=3, context_spread=40, block_size=32)
    cfg = RuntimeConfig(SHAPE, variant="trace", batch=3, context=500, steps=steps,
                        budget=Budget(12, window=4, capacity=capacity), policy=policy, dtype=dtype, block_size=32)
    host = HostStore.allocate(cfg.with_(context=int(tr.context_len[0].max()) - 1), pin=device == "cuda")
    cfg = cfg.with_(context=int(tr.context_len[0].max()) - 1)
    host.fill_random(0, device)
    prompt = host.kv.clone()
    sel = torch.from_numpy(tr.sel.astype(np.int64)).to(device)
    be = OffloadBackend(cfg, device, host, sel, torch.from_numpy(tr.context_len[0]))
    if policy == "static":
        be.table.static[:, :, : tr.n_blocks] = torch.from_numpy(tr.agnostic_score).permute(0, 2, 1, 3).reshape(
            2, 6, -1).to(device)
    be.prefill(None, exact=False)
    return tr, cfg, be, prompt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy,capacity", [("prev", 11), ("lru", 11), ("lru", 16), ("lfu", 16), ("static", 14)])
def test_loaded_equals_nosasim_misses(device, policy, capacity):
    tr, cfg, be, _ = _drive(device, policy, capacity, kind="nosa", steps=40)
    g = torch.Generator(device=device).manual_seed(1)
    R, G, D = be.R, SHAPE.group, SHAPE.head_dim
    for _ in range(tr.steps):
        be.begin_step()
        for layer in range(2):
            q, k, v = (torch.randn(R, *s, generator=g, device=device) for s in ((G, D), (D,), (D,)))
            be.attend(layer, q, k, v, None)
    static = tr.agnostic_score.reshape(-1, tr.n_blocks) if policy == "static" else None
    ref = nosasim_cache.simulate_arrays(tr.rows(), tr.context_len, policy, capacity, static_score=static, block_size=32).misses
    mine = be.loaded[: tr.steps].view(tr.steps, 2, 3, 2).permute(0, 1, 3, 2).reshape(tr.steps, -1).cpu().numpy()
    assert ref.sum() > 0
    np.testing.assert_array_equal(mine, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-3), ("bfloat16", 1e-2)])
def test_attention_and_host_store_follow_full_history(device, dtype, tol):
    tr, cfg, be, prompt = _drive(device, "lru", 13, steps=40, dtype=dtype)
    be.record = []
    g = torch.Generator(device=device).manual_seed(2)
    R, G, D, BS = be.R, SHAPE.group, SHAPE.head_dim, cfg.block_size
    dt = getattr(torch, dtype)
    # Full history per layer and row: the prompt from the host store, then every appended token.
    hist = prompt.to(device).flatten(1, 2)[:, be.row_base // cfg.n_blocks]  # [L, R, NB, 2, BS, D]
    hist = hist.permute(0, 1, 3, 2, 4, 5).reshape(2, R, 2, -1, D).clone()
    worst = 0.0
    for t in range(tr.steps):
        pos = be.begin_step()[be.row_seq]
        for layer in range(2):
            q, k, v = (torch.randn(R, *s, generator=g, device=device).to(dt) for s in ((G, D), (D,), (D,)))
            out = be.attend(layer, q, k, v, None)
            hist[layer, be.rows, 0, pos] = k
            hist[layer, be.rows, 1, pos] = v
            sel = be.select(layer, q)  # the trace's selection, tail dropped
            tok = torch.arange(hist.shape[3], device=device)
            blk = tok // BS
            mask = (blk[None, :, None] == sel[:, None, :]).any(-1) | ((blk[None] == be.tail[:, None]) & (tok[None] <= pos[:, None]))
            kf, vf = hist[layer, :, 0].double(), hist[layer, :, 1].double()
            s = torch.einsum("rgd,rtd->rgt", q.double(), kf) / D ** 0.5
            ref = torch.einsum("rgt,rtd->rgd", torch.softmax(s.masked_fill(~mask[:, None], float("-inf")), -1), vf)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert err == err, "NaN in attention output"
            worst = max(worst, err)
    assert worst < tol, worst
    be.flush()
    ctx_end = int(be.state.ctx.max())
    got = be.host.kv.to(device).flatten(1, 2)[:, be.row_base // cfg.n_blocks].permute(0, 1, 3, 2, 4, 5)
    got = got.reshape(2, R, 2, -1, D)
    for r in range(R):
        n = int(be.state.ctx[r // 2])
        assert torch.equal(got[:, r, :, :n].view(torch.int16 if dtype != "float32" else torch.int32),
                           hist[:, r, :, :n].view(torch.int16 if dtype != "float32" else torch.int32)), r
    assert ctx_end > int(tr.context_len[0].max())


@pytest.mark.parametrize("variant,k_q,policy", [("dense", None, "prev"), ("infllmv2", None, "lru"),
                                                ("nosa", 8, "static"), ("nosa", 8, "prev")])
def test_runner_variants_run_on_cpu(variant, k_q, policy):
    cfg = RuntimeConfig(SHAPE, variant=variant, batch=2, context=900, steps=12, policy=policy, dtype="float32",
                        budget=None if variant == "dense" else Budget(12, k_q, window=4, capacity=14))
    r = Runner(cfg, device="cpu", exact_prefill=True)
    t = r.measure(steps=10, warmup=2, graph=False)
    assert len(t.ms) == 10 and all(x > 0 for x in t.ms)
    if variant != "dense":
        assert int(r.backend.loaded[0].sum()) > 0  # cold start loads every selected block
    with pytest.raises(ValueError, match="planned steps"):
        for _ in range(10):
            r.step()


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_compressed_keys_decode_and_load_what_they_select(device):
    """fp8 compressed keys through the whole decoder (eager; on the GPU its Triton kernels): a run decodes, loads
    blocks, keeps its keys in e4m3, and selects from them nearly what a bf16-key run selects."""
    base = RuntimeConfig(SHAPE, variant="nosa", batch=2, context=900, steps=12, policy="prev", dtype="bfloat16",
                         budget=Budget(12, 8, window=4, capacity=14))
    picks = []
    for ck in (None, "fp8"):
        r = Runner(base.with_(ckey_dtype=ck), device=device, seed=3, exact_prefill=True,
                   weights=Weights.random(SHAPE, torch.bfloat16, device, 3))
        assert r.backend.scores.ckeys.dtype == (torch.float8_e4m3fn if ck else torch.bfloat16)
        sels = []
        for _ in range(6):
            r.step()
            sels.append(r.backend.select(0, torch.randn(r.backend.R, SHAPE.group, SHAPE.head_dim,
                                                        generator=torch.Generator().manual_seed(len(sels)))
                                         .to(torch.bfloat16).to(device)).cpu())
        picks.append(torch.stack(sels))
        assert int(r.backend.loaded[0].sum()) > 0
    same = (picks[0].sort(-1).values == picks[1].sort(-1).values).float().mean()
    assert 0.5 < same


def test_fp8_compressed_keys_config_errors():
    with pytest.raises(ValueError, match="ckey_dtype"):
        RuntimeConfig(SHAPE, variant="dense", ckey_dtype="fp8")
    with pytest.raises(ValueError, match="ckey_dtype"):
        RuntimeConfig(SHAPE, variant="nosa", ckey_dtype="fp8", selection="fused")
    with pytest.raises(ValueError, match="ckey_dtype"):
        RuntimeConfig(SHAPE, variant="nosa", ckey_dtype="int4")


@pytest.mark.gpu
def test_check_fits_refuses_before_allocating():
    from runtime.config import PRESETS
    cfg = RuntimeConfig(PRESETS["llama3-8b"], variant="dense", batch=512, context=32768)
    before = torch.cuda.memory_allocated()
    with pytest.raises(ValueError, match="GPU memory"):
        check_fits(cfg, "cuda", False)
    assert torch.cuda.memory_allocated() == before


@pytest.mark.gpu
@pytest.mark.parametrize("variant,k_q", [("dense", None), ("nosa", 8)])
def test_graph_replay_equals_eager(variant, k_q):
    cfg = RuntimeConfig(SHAPE, variant=variant, batch=4, context=900, steps=30, dtype="float32",
                        budget=None if variant == "dense" else Budget(12, k_q, window=4, capacity=14))
    outs = []
    for graph in (False, True):
        r = Runner(cfg, device="cuda", seed=5, weights=Weights.random(SHAPE, torch.float32, "cuda", 5))
        toks = []
        for i in range(20):
            r.step()
            if graph and i == 1:
                r.capture()
            toks.append(r.decoder.tokens.clone())
        outs.append(torch.stack(toks))
        if variant != "dense":
            outs.append(r.backend.loaded.clone())
    assert torch.equal(outs[0], outs[2 if variant != "dense" else 1])


def _microbatch_run(device, variant, k_q, policy, m, graph=False, steps=16, split=False):
    cfg = RuntimeConfig(SHAPE, variant=variant, batch=5, context=900, steps=steps + 2, policy=policy,
                        budget=None if variant == "dense" else Budget(12, k_q, window=4, capacity=14),
                        dtype="float32", microbatches=m, split_attention=split)
    r = Runner(cfg, device=device, seed=7, exact_prefill=True,
               weights=Weights.random(SHAPE, torch.float32, device, 7))
    toks = []
    for i in range(steps):
        r.step()
        if graph and i == 1:
            r.capture()
        toks.append(r.decoder.tokens.clone())
    state = [torch.stack(toks)]
    if variant != "dense":
        be = r.backend
        state += [be.loaded.clone(), be.table.slot_block.clone(), be.table.last.clone(), be.host.kv.clone()]
    return state


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant,k_q,policy", [("dense", None, "prev"), ("infllmv2", None, "lru"),
                                                ("nosa", 8, "static"), ("nosa", 8, "lfu")])
def test_microbatches_compute_the_same_step(device, variant, k_q, policy):
    """Splitting the batch into micro-batches (2, and 3 of unequal size) changes the order of work, not its result:
    the same tokens, the same loads per row, the same block table and host store as one micro-batch."""
    ref = _microbatch_run(device, variant, k_q, policy, 1)
    for m in (2, 3):
        got = _microbatch_run(device, variant, k_q, policy, m, graph=device == "cuda")
        for a, b in zip(ref, got):
            assert torch.equal(a, b), (m, a.shape)
    if variant != "dense":
        assert int(ref[1].sum()) > 0
        # Attention split around the copies (resident blocks first, copied ones after, merged by log-sum-exp)
        # attends the same tokens: the same decode, with one micro-batch and with two.
        for m in (1, 2):
            got = _microbatch_run(device, variant, k_q, policy, m, graph=device == "cuda", split=True)
            for a, b in zip(ref, got):
                assert torch.equal(a, b), ("split", m, a.shape)


def test_microbatches_must_fit_the_batch():
    with pytest.raises(ValueError, match="microbatches"):
        RuntimeConfig(SHAPE, variant="nosa", batch=2, budget=Budget(12, 8, window=4), microbatches=3)
