"""Decode attention against the HBM copy peak: the original kernel, and the new one through both plan forms and
several tuning knobs, bf16 and fp8 pools.

Run: ``PYTHONPATH=. python -m runtime.device_suite --stages bench:attention --out $OUT`` (or ``run(path)``). The
llama3-8b row shape (8 KV heads, G = 4, head dim 128, 64-token blocks): sparse at batch 1, 8, 32, 64, 128 with
K = 32, 64, 128 selected blocks plus a partial tail, dense at (batch, context) = (1, 8K), (8, 8K), (8, 32K),
(14, 64K), (7, 128K).

Every variant is timed in a CUDA graph (``runtime.timing.time_graph``) whose calls rotate over enough pools (each
with its own q and bias) that the calls of one replay read at least 4x the 60 MB L2 between two reads of the same
pool, so nothing is served from L2. Bytes per call: the valid K/V tokens, q, the output and (NOSA) the bias; the
rate is shown against the HBM copy peak measured in the same run (1 GiB device copy, read + written). Each new
result is checked against the original kernel's on the same inputs (fp8: the original kernel on the dequantized
pool) and the max relative difference (max |new - old| / max |old|) recorded.

Variants: ``old`` the original kernel and its torch merge (a frozen copy, below: what the callers ran before this
kernel; its entry lists are built outside the timing, as a caller's ``torch.cat`` would), ``plan`` the new kernel
through ``AttentionPlan``, ``new`` ``decode_attention`` with its defaults (1 block per iteration, 3 stages, 4 warps,
``choose_splits``), then one knob changed each: ``s2``/``s4`` stages, ``t2s2`` 2 blocks per iteration at 2
stages, ``w8`` 8 warps, ``sp/2``/``sp*2`` half or twice the default pieces per row, ``fp8`` an e4m3 pool, ``bias``
NOSA's logit bias (``old+b`` the original kernel with it).
"""

from __future__ import annotations

import math
import sys
import time

import torch

from runtime.attention import (
    MIN_ENTRIES,
    NUM_STAGES,
    NUM_WARPS,
    TILE_BLOCKS,
    WAVES,
    AttentionPlan,
    EntryPlan,
    choose_splits,
    decode_attention,
    device_sms,
    pick_splits,
    sparse_decode_attention,
)
from runtime.timing import environment, hbm_copy_peak, time_graph, write_json

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

H, G, D, BS = 8, 4, 128, 64
DEVICE = "cuda"
SPARSE = tuple((b, k) for b in (1, 8, 32, 64, 128) for k in (32, 64, 128))
DENSE = ((1, 8192), (8, 8192), (8, 32768), (14, 65536), (7, 131072))
L2_BYTES = 60e6
ROTATE = 4  # the calls of one replay read >= ROTATE x L2 before a pool is read again
BUDGET_S = 105.0  # knob variants are skipped past this (the suite's stage must end within 120 s)
KNOBS = {"s2": dict(num_stages=2), "s4": dict(num_stages=4), "t2s2": dict(tile_blocks=2, num_stages=2),
         "w8": dict(num_warps=8)}

if triton is not None:

    # The original kernel, frozen as it was before the new one (runtime/attention.py at commit cd490e1): the
    # baseline. Its torch merge follows in ``legacy_attention``.
    @triton.jit
    def _legacy_kernel(q_ptr, pool_ptr, slots_ptr, lens_ptr, blocks_ptr, bias_ptr, o_ptr, m_ptr, l_ptr,
                       NE, EPS, slots_per_row, bias_stride, sm_scale,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                       HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        sp = tl.program_id(1)
        nsp = tl.num_programs(1)
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        offs_t = tl.arange(0, BS)
        gmask = offs_g < G
        q = tl.load(q_ptr + (r * G + offs_g[:, None]) * D + offs_d[None, :], mask=gmask[:, None], other=0.0)
        m_i = tl.full([GP], -1.0e30, tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        e0 = sp * EPS
        e1 = tl.minimum(e0 + EPS, NE)
        for e in range(e0, e1):
            slot = tl.maximum(tl.load(slots_ptr + r * NE + e), 0).to(tl.int64)
            n = tl.load(lens_ptr + r * NE + e)
            tmask = offs_t < n
            base = pool_ptr + (r * slots_per_row + slot) * (2 * BS * D)
            kk = tl.load(base + offs_t[:, None] * D + offs_d[None, :], mask=tmask[:, None], other=0.0)
            vv = tl.load(base + BS * D + offs_t[:, None] * D + offs_d[None, :], mask=tmask[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(kk), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kk))
            s = s * sm_scale
            if HAS_BIAS:
                blk = tl.maximum(tl.load(blocks_ptr + r * NE + e), 0).to(tl.int64)
                b = tl.load(bias_ptr + r * bias_stride + blk * BS + offs_t, mask=tmask, other=0.0)
                s = s + b[None, :]
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
            m_i = m_new
        part = r * nsp + sp
        tl.store(o_ptr + (part * GP + offs_g[:, None]) * D + offs_d[None, :], acc)
        tl.store(m_ptr + part * GP + offs_g, m_i)
        tl.store(l_ptr + part * GP + offs_g, l_i)


def legacy_attention(q, pool, plan: AttentionPlan, bias=None):
    """The original ``sparse_decode_attention``: its kernel, its split rule, its torch merge."""
    R, G_, D_ = q.shape
    NE = plan.slots.shape[1]
    splits = pick_splits(R, NE)
    eps = math.ceil(NE / splits)
    GP = max(16, triton.next_power_of_2(G_))
    o = torch.empty((R, splits, GP, D_), dtype=torch.float32, device=q.device)
    m = torch.empty((R, splits, GP), dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    has_bias = bias is not None
    _legacy_kernel[(R, splits)](q, pool, plan.slots, plan.lens, plan.blocks, bias if has_bias else m, o, m, lsum,
                                NE, eps, pool.shape[1], bias.stride(0) if has_bias else 0, 1.0 / math.sqrt(D_),
                                G=G_, GP=GP, D=D_, BS=pool.shape[3], HAS_BIAS=has_bias, IEEE=False,
                                num_warps=4, num_stages=2)
    m, lsum, o = m[:, :, :G_], lsum[:, :, :G_], o[:, :, :G_]
    w = torch.exp(m - m.amax(1, keepdim=True))
    return ((o * w[..., None]).sum(1) / (lsum * w).sum(1)[..., None]).to(q.dtype)


def _rotation(bytes_per_call: float) -> int:
    return max(1, math.ceil(ROTATE * L2_BYTES / bytes_per_call))


def _timed(call, n_inputs: int) -> float:
    """Seconds per call, calls rotating over ``n_inputs`` input sets inside one graph (at least 8 calls)."""
    state = [0]

    def fn():
        call(state[0] % n_inputs)
        state[0] += 1

    inner = n_inputs * max(1, math.ceil(8 / n_inputs))
    return time_graph(fn, inner=inner, reps=8)


def _maxdiff(new, old) -> float:
    return ((new.float() - old.float()).abs().max() / old.float().abs().max().clamp(min=1e-30)).item()


class _Point:
    """Inputs of one benchmark point: ``n`` pools (bf16 and fp8), q and bias per pool, both plan forms."""

    def __init__(self, R, S, entry: EntryPlan, lists: AttentionPlan, valid_tokens: int, nb: int, g):
        self.R, self.S, self.entry, self.lists, self.valid = R, S, entry, lists, valid_tokens
        kv = lambda e: valid_tokens * 2 * D * e  # noqa: E731
        qo = 2 * R * G * D * 2  # q read + output written, bf16
        self.bytes = {"bf16": kv(2) + qo, "fp8": kv(1) + qo}
        self.bias_bytes = valid_tokens * 4
        shape = (R, S, 2, BS, D)
        self.n = {k: _rotation(v) for k, v in self.bytes.items()}
        n = max(self.n.values())
        self.q = [torch.randn(R, G, D, device=DEVICE, generator=g).to(torch.bfloat16) for _ in range(n)]
        self.bias = [torch.randn(R, nb * BS, device=DEVICE, generator=g) for _ in range(n)] if nb else []
        self.pool = [torch.randn(shape, device=DEVICE, dtype=torch.bfloat16, generator=g)
                     for _ in range(self.n["bf16"])]
        self.pool8 = []
        for i in range(self.n["fp8"]):
            src = self.pool[i] if i < len(self.pool) else torch.randn(shape, device=DEVICE, dtype=torch.bfloat16,
                                                                      generator=g)
            self.pool8.append(src.to(torch.float8_e4m3fn))
            del src


def _sparse_point(B: int, K: int, g) -> tuple[_Point, dict]:
    R = B * H
    S, nb = K + 1, 2 * K + 1
    slots = torch.argsort(torch.rand(R, K, device=DEVICE, generator=g), 1)  # every slot but the tail's, shuffled
    ids = torch.argsort(torch.rand(R, nb, device=DEVICE, generator=g), 1)
    blocks, tail_block = ids[:, :K].contiguous(), ids[:, K].contiguous()
    fill = torch.randint(1, BS + 1, (R,), device=DEVICE, generator=g)
    tail_slot = torch.full((R,), K, device=DEVICE)
    entry = EntryPlan(slots, blocks, tail_slot, tail_block, fill)
    lists = AttentionPlan(torch.cat([slots, tail_slot[:, None]], 1),
                          torch.cat([torch.full_like(slots, BS), fill[:, None]], 1).int(),
                          torch.cat([blocks, tail_block[:, None]], 1))
    valid = R * K * BS + int(fill.sum())
    return _Point(R, S, entry, lists, valid, nb, g), {"kind": "sparse", "batch": B, "k": K, "rows": R}


def _dense_point(B: int, ctx: int, g) -> tuple[_Point, dict]:
    R = B * H
    S = math.ceil(ctx / BS)
    pos = torch.full((R,), ctx - 1, device=DEVICE)
    tail, fill = pos // BS, pos % BS + 1
    entry = EntryPlan.dense(tail, fill)
    slots = torch.arange(S, device=DEVICE).expand(R, -1).contiguous()
    lens = torch.where(slots < tail[:, None], BS, torch.where(slots == tail[:, None], fill[:, None], 0)).int()
    return (_Point(R, S, entry, AttentionPlan(slots, lens, slots), R * ctx, 0, g),
            {"kind": "dense", "batch": B, "context": ctx, "rows": R})


def _variants(pt: _Point, auto: int) -> dict:
    """name -> (call(i), pool kind, bias?, reference name)."""
    e, ls = pt.entry, pt.lists
    v = {"old": (lambda i: legacy_attention(pt.q[i], pt.pool[i], ls), "bf16", False, None),
         "plan": (lambda i: sparse_decode_attention(pt.q[i], pt.pool[i], ls), "bf16", False, "old"),
         "new": (lambda i: decode_attention(pt.q[i], pt.pool[i], e), "bf16", False, "old")}
    for name, kw in KNOBS.items():
        v[name] = ((lambda kw: lambda i: decode_attention(pt.q[i], pt.pool[i], e, **kw))(kw), "bf16", False, "old")
    for name, sp in (("sp/2", max(1, auto // 2)), ("sp*2", auto * 2)):
        if sp != auto:
            v[name] = ((lambda sp: lambda i: decode_attention(pt.q[i], pt.pool[i], e, splits=sp))(sp), "bf16",
                       False, "old")
    v["fp8"] = (lambda i: decode_attention(pt.q[i], pt.pool8[i], e), "fp8", False, "old8")
    if not e.is_dense:  # NOSA's bias: offloaded variants only
        v["old+b"] = (lambda i: legacy_attention(pt.q[i], pt.pool[i], ls, pt.bias[i]), "bf16", True, None)
        v["bias"] = (lambda i: decode_attention(pt.q[i], pt.pool[i], e, pt.bias[i]), "bf16", True, "old+b")
    return v


MAIN = ("old", "plan", "new", "fp8", "old+b", "bias")  # never skipped for time


def _measure(pt: _Point, meta: dict, peak: float, t0: float) -> dict:
    NE = pt.S if pt.entry.is_dense else pt.entry.slots.shape[1]
    auto = choose_splits(pt.R, NE, device_sms(DEVICE))
    refs = {}
    with torch.no_grad():
        refs["old"] = legacy_attention(pt.q[0], pt.pool[0], pt.lists)
        if not pt.entry.is_dense:
            refs["old+b"] = legacy_attention(pt.q[0], pt.pool[0], pt.lists, pt.bias[0])
        refs["old8"] = legacy_attention(pt.q[0], pt.pool8[0].to(torch.bfloat16), pt.lists)
    res = dict(meta, entries=NE, splits_auto=auto, valid_tokens=pt.valid, n_pools=pt.n, variants={})
    for name, (call, kind, bias, ref) in _variants(pt, auto).items():
        if name not in MAIN and time.time() - t0 > BUDGET_S:
            res["variants"][name] = {"skipped": "budget"}
            continue
        nbytes = pt.bytes[kind] + (pt.bias_bytes if bias else 0)
        secs = _timed(call, pt.n[kind])
        row = {"seconds": secs, "bytes": nbytes, "Bps": nbytes / secs, "pct_of_copy_peak": 100 * nbytes / secs / peak}
        if ref is not None:
            row["max_rel_diff"] = _maxdiff(call(0), refs[ref])
        res["variants"][name] = row
    return res


def run(out_path: str | None = None, sparse=SPARSE, dense=DENSE) -> dict:
    t0 = time.time()
    peak = hbm_copy_peak()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    res = {"env": environment(), "hbm_copy_peak_Bps": peak, "sms": device_sms(DEVICE), "l2_bytes": L2_BYTES,
           "rotate": ROTATE, "shape": {"kv_heads": H, "group": G, "head_dim": D, "block": BS},
           "defaults": {"tile_blocks": TILE_BLOCKS, "num_stages": NUM_STAGES, "num_warps": NUM_WARPS,
                        "waves": WAVES, "min_entries": MIN_ENTRIES}, "rows": []}
    for maker, pts in ((_sparse_point, sparse), (_dense_point, dense)):
        for a, b in pts:
            pt, meta = maker(a, b, g)
            res["rows"].append(_measure(pt, meta, peak, t0))
            del pt
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            res["seconds_total"] = time.time() - t0
            if out_path:  # after every point: a failure later loses only the rest
                write_json(out_path, res)
    return res


COLS = ("old", "plan", "new", "s2", "s4", "t2s2", "w8", "sp/2", "sp*2", "fp8", "old+b", "bias")


def table(res: dict) -> str:
    peak = res["hbm_copy_peak_Bps"]
    lines = [f"decode attention, llama3-8b rows (8 KV heads, G 4, D 128); % of the HBM copy peak "
             f"{peak / 1e12:.2f} TB/s (1 GiB copy, read + write) measured in the same run; "
             f"{res.get('seconds_total', 0):.0f} s",
             f"{'kind':6} {'B':>3} {'K/ctx':>6} {'MB':>7} {'old us':>7} {'new us':>7} "
             + " ".join(f"{c:>6}" for c in COLS) + f" {'splits':>6} {'maxdiff':>8}"]
    speed = []
    for r in res["rows"]:
        v = r["variants"]

        def pct(n):
            return f"{v[n]['pct_of_copy_peak']:5.1f}%" if "seconds" in v.get(n, {}) else f"{'-':>6}"

        diff = max((x.get("max_rel_diff", 0.0) for x in v.values()), default=0.0)
        size = r.get("k", r.get("context"))
        lines.append(f"{r['kind']:6} {r['batch']:3d} {size:6d} {v['new']['bytes'] / 1e6:7.1f} "
                     f"{v['old']['seconds'] * 1e6:7.1f} {v['new']['seconds'] * 1e6:7.1f} "
                     + " ".join(pct(c) for c in COLS) + f" {r['splits_auto']:6d} {diff:8.1e}")
        speed.append(v["old"]["seconds"] / v["new"]["seconds"])
    gm = math.exp(sum(math.log(s) for s in speed) / len(speed)) if speed else float("nan")
    lines.append(f"new vs old: geometric-mean speedup {gm:.2f}x over {len(speed)} points; maxdiff = max over "
                 f"variants of max|new - old| / max|old| (fp8: against the old kernel on the dequantized pool)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run(sys.argv[1] if len(sys.argv) > 1 else None)))
