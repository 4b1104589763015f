"""Block-sparse decode attention equals dense attention restricted to the same tokens (float64 reference, fresh
random inputs, several shapes, NOSA's logit bias, padding and partial tails).

Two reference paths: the original ``AttentionPlan`` tests below compare the CPU (torch) path and, on CUDA, the
kernel; the ``EntryPlan`` tests run the Triton kernel itself, interpreted on CPU tensors (marked ``triton``, shapes
small) and compiled on CUDA ones (marked ``gpu``, larger, the benchmark's knob settings, CUDA-graph replay). Their
tolerances, relative Frobenius errors against float64: fp32 < 1e-4 (fp32 ``ieee`` dots), 16-bit < 1e-2 (the kernel
rounds the softmax weights to 16 bits before the P.V dot; the interpreter also truncates its fp32 -> bf16 stores),
the log-sum-exp within 1e-3 absolute (fp32 statistics); the original tests keep theirs (fp32 1e-3, bf16 1e-2)."""

import math

import pytest
import torch

from runtime.attention import (
    AttentionPlan,
    EntryPlan,
    choose_splits,
    decode_attention,
    merge_attention,
    reference_attention,
    sparse_decode_attention,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# CPU tensors: the kernel in Triton's interpreter; CUDA tensors: the compiled kernel.
KDEVICES = [pytest.param("cpu", marks=pytest.mark.triton), pytest.param("cuda", marks=pytest.mark.gpu)]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _case(device, R, G, D, slots, NE, dtype, seed, bias):
    g = torch.Generator(device=device).manual_seed(seed)
    BS = 64
    pool = torch.randn(R, slots, 2, BS, D, generator=g, device=device).to(dtype)
    q = torch.randn(R, G, D, generator=g, device=device).to(dtype)
    # Distinct slots per row, some padding entries, lengths 64 except a partial last (the tail).
    sl = torch.argsort(torch.rand(R, slots, generator=g, device=device), 1)[:, :NE]
    lens = torch.full((R, NE), BS, device=device, dtype=torch.int32)
    lens[:, -1] = torch.randint(1, BS + 1, (R,), generator=g, device=device, dtype=torch.int32)
    pad = torch.rand(R, NE, generator=g, device=device) < 0.2
    pad[:, -1] = False
    sl = torch.where(pad, -1, sl)
    lens = torch.where(pad, 0, lens)
    blocks = torch.where(pad, -1, sl + 3)  # block ids differ from slots: the bias is looked up by block
    nb = slots + 3
    b = torch.randn(R, nb * BS, generator=g, device=device) if bias else None
    return q, pool, AttentionPlan(sl, lens, blocks), b


def _dense_masked_f64(q, pool, plan, bias):
    """Dense attention over each row's whole pool, with every token outside the plan masked out."""
    R, S, _, BS, D = pool.shape
    k = pool[:, :, 0].double().reshape(R, S * BS, D)
    v = pool[:, :, 1].double().reshape(R, S * BS, D)
    mask = torch.zeros(R, S * BS, dtype=torch.bool, device=q.device)
    add = torch.zeros(R, S * BS, dtype=torch.float64, device=q.device)
    tok = torch.arange(BS, device=q.device)
    for r in range(R):
        for e in range(plan.slots.shape[1]):
            s, n, blk = int(plan.slots[r, e]), int(plan.lens[r, e]), int(plan.blocks[r, e])
            if s >= 0 and n > 0:
                mask[r, s * BS: s * BS + n] = True
                if bias is not None:
                    add[r, s * BS: s * BS + BS] = bias[r, blk * BS: blk * BS + BS].double()
    s = torch.einsum("rgd,rtd->rgt", q.double(), k) / math.sqrt(D) + add[:, None]
    return torch.einsum("rgt,rtd->rgd", torch.softmax(s.masked_fill(~mask[:, None], float("-inf")), -1), v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("R,G,D,slots,NE", [(3, 4, 64, 12, 9), (5, 1, 128, 20, 17), (2, 8, 32, 70, 65)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_equals_dense_restricted(device, R, G, D, slots, NE, dtype, tol, bias):
    for seed in range(2):  # fresh inputs each time
        q, pool, plan, b = _case(device, R, G, D, slots, NE, dtype, seed * 7 + NE, bias)
        ref = _dense_masked_f64(q, pool, plan, b)
        outs = [sparse_decode_attention(q, pool, plan, b)]
        if device == "cuda":
            outs.append(sparse_decode_attention(q, pool, plan, b, splits=3))
            outs.append(sparse_decode_attention(q, pool, plan, b, splits=1))
        for out in outs:
            assert out.shape == (R, G, D) and out.dtype == dtype
            assert not torch.isnan(out).any()
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert err < tol, err


def test_reference_rejects_bad_pool():
    q = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="pool"):
        sparse_decode_attention(q, torch.randn(3, 4, 2, 64, 16), AttentionPlan(*(torch.zeros(2, 1, dtype=torch.long),) * 3))


def test_nan_is_caught():
    q, pool, plan, _ = _case("cpu", 2, 4, 16, 6, 4, torch.float32, 0, False)
    pool[0, plan.slots[0, -1], 0, 0, 0] = float("nan")
    out = reference_attention(q, pool, plan)
    assert torch.isnan(out).any()  # a NaN in an attended token must surface, never be masked away


@pytest.mark.parametrize("device", KDEVICES)
def test_attention_plan_runs_the_kernel(device):
    """The original plan form through the one kernel (per-entry lengths, padding anywhere, partial middle entries)."""
    shapes = [(3, 4, 32, 10, 7, 1)] if device == "cpu" else [(3, 4, 64, 12, 9, 5), (40, 4, 128, 70, 65, 11)]
    for R, G, D, S, NE, seed in shapes:
        for dtype, bias in ((torch.float32, True), (torch.bfloat16, False)):
            q, pool, plan, b = _case(device, R, G, D, S, NE, dtype, seed, bias)
            plan.lens[:, 1] = torch.where(plan.slots[:, 1] >= 0, 17, 0).to(plan.lens.dtype)
            ref = _dense_masked_f64(q, pool, plan, b)
            for splits in ((None,) if device == "cpu" else (None, 1, 4)):
                out = sparse_decode_attention(q, pool, plan, b, splits=splits, use_triton=True)
                assert out.dtype == dtype
                assert _err(out, ref) < TOL[dtype]


# ---- EntryPlan: the new plan form ----


def _err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def _entry_case(device, R, G, D, S, K, dtype, seed, bias, pad=0.25, pool_dtype=None):
    """A random sparse plan: distinct slots among ``0 .. S - 2`` per row (slot ``S - 1`` holds the tail), padding
    anywhere, block ids unrelated to slots (the bias must be looked up by block), tails of fill 1 and 64 at the
    edges and random ones elsewhere."""
    g = torch.Generator(device=device).manual_seed(seed)
    BS = 64
    pool = torch.randn(R, S, 2, BS, D, generator=g, device=device).to(pool_dtype or dtype)
    q = torch.randn(R, G, D, generator=g, device=device).to(dtype)
    slots = torch.argsort(torch.rand(R, S - 1, generator=g, device=device), 1)[:, :K]
    nb = S + 8
    ids = torch.argsort(torch.rand(R, nb, generator=g, device=device), 1)
    blocks, tail_block = ids[:, :K], ids[:, K]
    padded = torch.rand(R, K, generator=g, device=device) < pad
    slots, blocks = torch.where(padded, -1, slots), torch.where(padded, -1, blocks)
    fill = torch.randint(1, BS + 1, (R,), generator=g, device=device)
    fill[0], fill[-1] = 1, BS
    plan = EntryPlan(slots, blocks, torch.full((R,), S - 1, device=device), tail_block, fill)
    b = torch.randn(R, nb * BS, generator=g, device=device) if bias else None
    return q, pool, plan, b


def _attended(plan, S, miss=None, part="all", BS=64):
    """Per row, the (slot, block id, valid tokens) the plan stands for, written out from its definition."""
    ts, tb, tf = plan.tail_slot.tolist(), plan.tail_block.tolist(), plan.tail_fill.tolist()
    if plan.slots is not None:
        slots, blocks = plan.slots.tolist(), plan.blocks.tolist()
        misses = miss.tolist() if miss is not None else [[False] * len(row) for row in slots]
    rows = []
    for r in range(len(tf)):
        if plan.slots is None:
            ents = [(s, s, BS) for s in range(tb[r])]
        else:
            ents = [(s, blk, BS) for s, blk, m in zip(slots[r], blocks[r], misses[r])
                    if s >= 0 and not (part == "hits" and m) and not (part == "misses" and not m)]
        if part != "misses":
            ents.append((ts[r], tb[r], tf[r]))
        rows.append(ents)
    return rows


def _masked_f64(q, pool, rows, bias=None, k_scale=1.0, v_scale=1.0):
    """Dense float64 attention over each row's whole pool with every token outside ``rows`` masked (and zeroed, so
    poisoned pool bytes can't reach the sums): ``(out, lse)``; a row with no token gives 0 and -inf."""
    R, S, _, BS, D = pool.shape
    kv = pool.double()
    k = kv[:, :, 0].reshape(R, S * BS, D) * k_scale
    v = kv[:, :, 1].reshape(R, S * BS, D) * v_scale
    mask = torch.zeros(R, S * BS, dtype=torch.bool)
    add = torch.zeros(R, S * BS, dtype=torch.float64)
    bias_cpu = bias.double().cpu() if bias is not None else None  # built on the CPU: no launch per entry
    for r, ents in enumerate(rows):
        for s, blk, n in ents:
            mask[r, s * BS: s * BS + n] = True
            if bias is not None:
                add[r, s * BS: s * BS + n] = bias_cpu[r, blk * BS: blk * BS + n]
    mask, add = mask.to(q.device), add.to(q.device)
    k, v = torch.where(mask[..., None], k, 0.0), torch.where(mask[..., None], v, 0.0)
    s = torch.einsum("rgd,rtd->rgt", q.double(), k) / math.sqrt(D) + add[:, None]
    s = s.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    return torch.einsum("rgt,rtd->rgd", p, v), lse


def _check(out, lse, ref, ref_lse, dtype):
    assert not torch.isnan(out).any()
    assert _err(out, ref) < TOL[dtype], _err(out, ref)
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isneginf(lse), ~fin)
        assert (lse[fin].double() - ref_lse[fin]).abs().max().item() < 1e-3


# Every distinct (dtype, bias, tile) is a compile (~2 s on the GPU host, ~0.5 s an interpreted launch on the CPU):
# the interpreter gets a few combinations, CUDA the ones the runtime and the benchmark use, each over several
# split counts (split and unsplit launches share one compiled kernel).
ENTRY_CPU = [(torch.float32, True, (None,), 1), (torch.bfloat16, True, (1,), 1), (torch.float32, False, (3,), 2),
             (torch.bfloat16, False, (None,), 2)]
ENTRY_GPU = [(torch.float32, b, (None, 1, 3), 1) for b in (False, True)] + \
            [(torch.bfloat16, b, (None, 1, 3, 7), t) for b in (False, True) for t in (1, 2)] + \
            [(torch.float16, False, (None, 1), 1)]


@pytest.mark.parametrize("device", KDEVICES)
def test_entry_plan_equals_dense_restricted(device):
    if device == "cpu":
        shapes, combos = [(3, 4, 32, 11, 7)], ENTRY_CPU
    else:
        shapes, combos = [(3, 4, 64, 12, 9), (5, 1, 128, 20, 17), (2, 8, 32, 70, 65), (64, 4, 128, 66, 64)], ENTRY_GPU
    for i, (R, G, D, S, K) in enumerate(shapes):
        for j, (dtype, bias, split_counts, tile) in enumerate(combos):
            q, pool, plan, b = _entry_case(device, R, G, D, S, K, dtype, 100 * i + j, bias)
            ref, ref_lse = _masked_f64(q, pool, _attended(plan, S), b)
            for splits in split_counts:
                out, lse = decode_attention(q, pool, plan, b, splits=splits, tile_blocks=tile, return_lse=True,
                                            use_triton=True)
                assert out.shape == (R, G, D) and out.dtype == dtype
                _check(out, lse, ref, ref_lse, dtype)


@pytest.mark.parametrize("device", KDEVICES)
def test_dense_mode_rows_with_different_tails(device):
    """Dense plans: row r attends slots 0 .. tail_block[r] - 1 plus its tail, whatever the other rows' tails
    (one row only its tail, one the whole pool); equal to the same blocks listed explicitly."""
    R, G, D, S = (4, 4, 32, 9) if device == "cpu" else (24, 4, 128, 130)
    g = torch.Generator(device=device).manual_seed(7)
    for dtype, bias, splits, tile in (((torch.float32, True, None, 1), (torch.bfloat16, False, 1, 2))
                                      if device == "cpu" else
                                      [(torch.bfloat16, b, sp, t) for b, t in ((False, 1), (True, 1), (False, 2))
                                       for sp in (None, 1, 5)] + [(torch.float32, False, None, 1)]):
        pool = torch.randn(R, S, 2, 64, D, generator=g, device=device).to(dtype)
        q = torch.randn(R, G, D, generator=g, device=device).to(dtype)
        tail = torch.randint(0, S, (R,), generator=g, device=device)
        tail[0], tail[1] = 0, S - 1
        fill = torch.randint(1, 65, (R,), generator=g, device=device)
        fill[1], fill[2] = 64, 1
        b = torch.randn(R, S * 64, generator=g, device=device) if bias else None
        plan = EntryPlan.dense(tail, fill)
        ref, ref_lse = _masked_f64(q, pool, _attended(plan, S), b)
        out, lse = decode_attention(q, pool, plan, b, splits=splits, tile_blocks=tile, return_lse=True,
                                    use_triton=True)
        _check(out, lse, ref, ref_lse, dtype)
        # The same rows as explicit lists (padding past each row's tail).
        e = torch.arange(S - 1, device=device).expand(R, -1)
        listed = torch.where(e < tail[:, None], e, -1)
        out2 = decode_attention(q, pool, EntryPlan(listed, listed, tail, tail, fill), b, splits=splits,
                                use_triton=True)
        assert _err(out2, out.double()) < TOL[dtype]


@pytest.mark.parametrize("device", KDEVICES)
def test_parts_merge_to_all(device):
    """Hits (plus the tail) then misses, merged through their log-sum-exps, equal attending everything; a row
    with every entry missing and one with none cover the empty sides."""
    R, G, D, S, K = (4, 4, 32, 11, 7) if device == "cpu" else (48, 4, 128, 70, 64)
    for seed, dtype in enumerate((torch.float32, torch.bfloat16)):
        q, pool, plan, b = _entry_case(device, R, G, D, S, K, dtype, 40 + seed, bias=True)
        g = torch.Generator(device=device).manual_seed(seed)
        miss = torch.rand(R, K, generator=g, device=device) < 0.4
        miss[0], miss[1] = True, False
        res = {}
        for part in ("hits", "misses", "all"):
            ref, ref_lse = _masked_f64(q, pool, _attended(plan, S, miss, part), b)
            out, lse = decode_attention(q, pool, plan, b, miss=miss if part != "all" else None, part=part,
                                        return_lse=True, use_triton=True)
            if part == "misses":  # row 1 has no misses: nothing attended
                assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
            _check(out, lse, ref, ref_lse, dtype)
            res[part] = (out, lse)
        for a, c in (("hits", "misses"), ("misses", "hits")):
            out, lse = merge_attention(*res[a], *res[c], use_triton=True)
            assert out.dtype == dtype
            assert _err(out, res["all"][0].double()) < TOL[dtype]
            assert (lse - res["all"][1]).abs().max().item() < 1e-3


@pytest.mark.parametrize("device", [pytest.param("torch", marks=[]), *KDEVICES])
def test_merge_attention_empty_sides(device):
    """One side empty (lse -inf, its output poisoned with NaN): the other side exactly; both empty: 0 and -inf."""
    dev = "cpu" if device == "torch" else device
    g = torch.Generator(device=dev).manual_seed(3)
    R, G, D = 6, 4, 48  # D not a power of two: the merge masks its columns
    oa, ob = (torch.randn(R, G, D, generator=g, device=dev).to(torch.bfloat16) for _ in range(2))
    la, lb = (torch.randn(R, G, generator=g, device=dev) * 3 for _ in range(2))
    la[0], lb[1], la[2], lb[2] = float("-inf"), float("-inf"), float("-inf"), float("-inf")
    oa[0], ob[1], oa[2], ob[2] = float("nan"), float("nan"), float("nan"), float("nan")
    out, lse = merge_attention(oa, la, ob, lb, use_triton=device != "torch")
    assert torch.equal(out[0], ob[0]) and torch.equal(lse[0], lb[0])
    assert torch.equal(out[1], oa[1]) and torch.equal(lse[1], la[1])
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.isneginf(lse[2]).all()
    wa, wb = torch.exp(la[3:].double()), torch.exp(lb[3:].double())
    ref = (oa[3:].double() * wa[..., None] + ob[3:].double() * wb[..., None]) / (wa + wb)[..., None]
    assert _err(out[3:], ref) < 1e-2
    assert (lse[3:].double() - torch.log(wa + wb)).abs().max().item() < 1e-5


@pytest.mark.parametrize("device", KDEVICES)
def test_fp8_pool(device):
    """FP8 (e4m3) K/V converted after loading, with per-tensor K and V scales, against float64 on the same
    (dequantized) values."""
    R, G, D, S, K = (3, 4, 32, 10, 6) if device == "cpu" else (64, 4, 128, 66, 64)
    cases = ((torch.bfloat16, True, None, False), (torch.float32, False, 1, False), (torch.bfloat16, True, None, True),
             (torch.bfloat16, False, 1, True))
    for i, (dtype, bias, splits, f16) in enumerate(cases):
        q, pool, plan, b = _entry_case(device, R, G, D, S, K, dtype, 60 + i, bias, pool_dtype=torch.float32)
        pool = (pool * 0.8).to(torch.float8_e4m3fn)
        ref, ref_lse = _masked_f64(q, pool, _attended(plan, S), b, k_scale=0.7, v_scale=1.3)
        out, lse = decode_attention(q, pool, plan, b, k_scale=0.7, v_scale=1.3, splits=splits, return_lse=True,
                                    use_triton=True, f16=f16)  # f16: the dots in fp16 (GPU; the interpreter: fp32)
        assert out.dtype == dtype
        _check(out, lse, ref, ref_lse, dtype)


@pytest.mark.parametrize("device", KDEVICES)
def test_poisoned_pool_and_outputs(device):
    """NaN in every pool byte the plan doesn't attend (unselected and padding slots, the tail past its fill) and
    in the output buffer: the result is finite and correct, so every output element is written and no masked
    token is read into the sums."""
    R, G, D, S, K = (3, 4, 32, 10, 6) if device == "cpu" else (40, 4, 128, 40, 32)
    for i, splits in enumerate((None, 1)):
        q, pool, plan, b = _entry_case(device, R, G, D, S, K, torch.float32, 80 + i, bias=True)
        rows = _attended(plan, S)
        keep = torch.zeros(R, S, 64, dtype=torch.bool)
        b_keep = torch.zeros(b.shape, dtype=torch.bool)
        for r, ents in enumerate(rows):
            for s, blk, n in ents:
                keep[r, s, :n] = True
                b_keep[r, blk * 64: blk * 64 + n] = True
        pool = torch.where(keep.to(device)[:, :, None, :, None], pool, float("nan"))
        b = torch.where(b_keep.to(device), b, float("nan"))
        ref, ref_lse = _masked_f64(q, pool, rows, b)
        if device == "cuda":  # freed NaN blocks of the small pool: partials and lse come back NaN unless written
            [torch.full((1 << 17,), float("nan"), device=device) for _ in range(64)]
        out = torch.full((R, G, D), float("nan"), device=device)
        got, lse = decode_attention(q, pool, plan, b, splits=splits, out=out, return_lse=True, use_triton=True)
        assert got.data_ptr() == out.data_ptr()
        _check(got, lse, ref, ref_lse, torch.float32)


@pytest.mark.parametrize("device", KDEVICES)
def test_nan_in_attended_token_surfaces(device):
    q, pool, plan, _ = _entry_case(device, 2, 4, 32, 8, 4, torch.float32, 5, bias=False, pad=0.0)
    pool[1, int(plan.slots[1, 2]), 0, 5, 3] = float("nan")
    out = decode_attention(q, pool, plan, use_triton=True)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()


def test_choose_splits():
    assert choose_splits(1024, 64) == 1  # batch 128 x 8 heads: one piece, no merge launch
    assert choose_splits(512, 128) == 1
    assert choose_splits(8, 64) == 32  # batch 1: two entries a piece, 256 programs
    assert choose_splits(8, 3) == 1 and choose_splits(8, 0) == 1 and choose_splits(8, 1) == 1
    assert choose_splits(64, 64, sms=66) == choose_splits(32, 64, sms=33)
    for R in (1, 3, 8, 56, 64, 100, 256, 1000):
        for K in (0, 1, 2, 5, 31, 32, 64, 128, 2048):
            for waves, me in ((2.0, 2), (4.0, 4), (1.0, 1)):
                sp = choose_splits(R, K, 132, waves=waves, min_entries=me)
                eps = math.ceil(K / sp) if K else 0
                assert 1 <= sp <= max(1, K // me)
                assert K == 0 or (sp - 1) * eps < K  # no empty piece
                if sp == 1 and K >= 2 * me:
                    assert R >= waves * 132  # one piece only when the rows already fill the GPU
    with pytest.raises(ValueError, match="rows"):
        choose_splits(0, 4)


def test_decode_attention_rejects_bad_input():
    q, pool, plan, b = _entry_case("cpu", 2, 4, 32, 6, 3, torch.float32, 1, bias=True)
    miss = torch.zeros(2, 3, dtype=torch.bool)
    cases = [
        (dict(part="some"), "part"),
        (dict(part="hits"), "miss"),
        (dict(part="misses", miss=miss[:, :2]), "miss"),
        (dict(plan=EntryPlan.dense(plan.tail_block, plan.tail_fill), part="hits", miss=miss), "dense"),
        (dict(plan=EntryPlan(plan.slots, plan.blocks, plan.tail_slot[:1], plan.tail_block, plan.tail_fill)),
         "tail_slot"),
        (dict(plan=EntryPlan(plan.slots, None, plan.tail_slot, plan.tail_block, plan.tail_fill)), "blocks"),
        (dict(pool=pool.to(torch.float16)), "dtype"),
        (dict(pool=pool.transpose(3, 4).contiguous().transpose(3, 4)), "contiguous"),
        (dict(out=torch.empty(2, 4, 31)), "out"),
        (dict(bias=b[:1]), "bias"),
        (dict(splits=0), "splits"),
        (dict(tile_blocks=3), "tile_blocks"),
    ]
    for kw, field in cases:
        args = dict(q=q, pool=pool, plan=plan, bias=b, use_triton=True) | kw
        with pytest.raises(ValueError, match=field):
            decode_attention(args.pop("q"), args.pop("pool"), args.pop("plan"), args.pop("bias"), **args)


@pytest.mark.gpu
def test_knobs_compile_and_agree():
    """The benchmark's knob settings compile and compute the same function (llama3-8b row shape, bf16; fp8 at the
    defaults), split and unsplit."""
    q, pool, plan, _ = _entry_case("cuda", 64, 4, 128, 66, 64, torch.bfloat16, 11, bias=False)
    ref, _ = _masked_f64(q, pool, _attended(plan, 66))
    p8 = pool.to(torch.float8_e4m3fn)
    ref8, _ = _masked_f64(q, p8, _attended(plan, 66))
    knobs = [{}, dict(num_stages=2), dict(num_stages=4), dict(tile_blocks=2, num_stages=2), dict(num_warps=8),
             dict(num_stages=4, num_warps=8)]
    knobs8 = [{}, dict(f16=True), dict(f16=False), dict(f16=True, num_stages=4), dict(f16=True, num_warps=8)]
    for pl, rf, kws in ((pool, ref, knobs), (p8, ref8, knobs8)):
        for kw in kws:
            for splits in (None, 1):
                out = decode_attention(q, pl, plan, splits=splits, **kw)
                assert _err(out, rf) < 1e-2, (kw, splits, pl.dtype)


@pytest.mark.gpu
def test_graph_replay_reads_new_plans():
    """Captured once, replayed after the plan tensors changed in place (slots, tails, fills, misses): the result
    follows the new plan, so nothing per step is baked into the launch."""
    R, G, D, S, K = 32, 4, 128, 40, 32
    q, pool, plan, b = _entry_case("cuda", R, G, D, S, K, torch.bfloat16, 21, bias=True)
    miss = torch.rand(R, K, device="cuda") < 0.5
    for splits in (None, 1):
        outs = {}

        def run():
            outs["all"] = decode_attention(q, pool, plan, b, splits=splits)
            outs["hits"] = decode_attention(q, pool, plan, b, miss=miss, part="hits", splits=splits,
                                            return_lse=True)
            outs["dense"] = decode_attention(q, pool, EntryPlan.dense(plan.tail_block % S, plan.tail_fill), b,
                                             splits=splits)

        run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        _, _, fresh, _ = _entry_case("cuda", R, G, D, S, K, torch.bfloat16, 22 + (splits or 0), bias=False)
        for name in ("slots", "blocks", "tail_slot", "tail_block", "tail_fill"):
            getattr(plan, name).copy_(getattr(fresh, name))
        miss.copy_(torch.rand(R, K, device="cuda") < 0.5)
        graph.replay()
        torch.cuda.synchronize()
        ref, _ = _masked_f64(q, pool, _attended(plan, S), b)
        assert _err(outs["all"], ref) < 1e-2
        ref, _ = _masked_f64(q, pool, _attended(plan, S, miss, "hits"), b)
        assert _err(outs["hits"][0], ref) < 1e-2
        ref, _ = _masked_f64(q, pool, _attended(EntryPlan.dense(plan.tail_block % S, plan.tail_fill), S), b)
        assert _err(outs["dense"], ref) < 1e-2


def test_launch_config_rounds():
    """The launch rule at the llama3-8b rows an H200 runs (132 SMs, 8 KV heads): a grid a third past one round of
    default programs gets fewer pieces (batch 32) or four stages (batch 64, bf16 only); others keep the defaults,
    and FP8 pools take fp16 dots."""
    from runtime.attention import NUM_STAGES, launch_config

    b16, b32, b64, b128 = (launch_config(8 * b, 65, 132) for b in (16, 32, 64, 128))
    assert (b32.splits, b32.num_stages) == (1, NUM_STAGES)
    assert (b64.splits, b64.num_stages) == (1, 4)
    assert (b128.splits, b128.num_stages) == (1, NUM_STAGES)
    assert b16.splits == choose_splits(128, 65, 132) and b16.num_stages == NUM_STAGES
    f = launch_config(512, 65, 132, fp8=True)
    assert f.num_stages == NUM_STAGES and f.f16
    # An explicit waves target is a benchmark's choice: no adjustment.
    assert launch_config(256, 65, 132, waves=2.0).splits == choose_splits(256, 65, 132)
