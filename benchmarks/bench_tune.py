"""Launch settings of the per-layer kernels that dominate a compute-bound step, timed side by side on one GPU.

The kernels' defaults (``runtime.attention.launch_config``, ``select_kernels.select_blocks_triton``'s radix and
warps, ``qaware_scores_triton``'s chunk and warps) are chosen from this benchmark's figures, so it times every
alternative at the shapes the decoder runs (llama3-8b rows: 8 KV heads, G = 4, head dim 128, 64-token blocks):

- ``attention``: decode attention over K selected blocks plus a tail, NOSA's bias included, bf16 and FP8 pools (FP8
  with its dots in q's dtype and in fp16), InfLLM-V2 (no bias), and dense rows; each variant a combination of
  pieces per row (``auto`` = ``choose_splits``' count at 2 waves, ``1``, ``half``), pipeline stages and warps.
  Every result is compared with the default variant's output on the same inputs (``max_rel_diff``).
- ``select``: the sink/window/top-k rule (``_select_kernel``) by radix and warps at the block counts of 8K, 64K and
  128K contexts; every variant's ids must equal the default's (``ids_equal``).
- ``scoring``: the two scoring launches by key chunk and warps at 8K, 64K and 128K.

Attention is timed in CUDA graphs whose calls rotate over enough pools to stream past L2 (as
``bench_attention.py``); selection and scoring inputs are what the step leaves hot or streams, as there.

Run: ``PYTHONPATH=. python -m runtime.device_suite --stages bench:tune --out $OUT`` (``TUNE_PARTS=select,scoring``
picks parts).
"""

from __future__ import annotations

import os
import time

import torch

from benchmarks.bench_attention import BS, DEVICE, G, H, _dense_point, _maxdiff, _sparse_point, _timed
from runtime import select_kernels
from runtime.attention import choose_splits, decode_attention, device_sms
from runtime.selection import ScoreState
from runtime.timing import environment, hbm_copy_peak, time_graph, write_json

D = 128
BUDGET_S = 170.0
SPARSE_BF16 = tuple((b, k) for b in (16, 32, 64, 96, 128) for k in (32, 64, 128))
SPARSE_FP8 = ((32, 64), (64, 64), (128, 64), (176, 64))
SPARSE_NOBIAS = ((32, 64), (64, 64))
DENSE = ((8, 8192), (16, 8192), (32, 8192), (14, 65536), (7, 131072))
# (name, splits rule, stages, warps)
ATTN = (("def", "auto", 3, 4), ("s4", "auto", 4, 4), ("w8", "auto", 3, 8), ("s4w8", "auto", 4, 8),
        ("1p", "1", 3, 4), ("1p-s4", "1", 4, 4), ("1p-w8", "1", 3, 8), ("1p-s4w8", "1", 4, 8),
        ("h", "half", 3, 4), ("h-s4", "half", 4, 4))
SELECT = ((256, 130), (1024, 130), (1024, 1026), (768, 2050), (1024, 2050))
SCORING = ((32, 8192), (128, 65536), (96, 131072))


def _splits(rule: str, auto: int) -> int:
    return {"auto": auto, "1": 1, "half": max(1, auto // 2)}[rule]


def _attention_point(pt, meta: dict, bias: bool, kind: str, t0: float) -> dict:
    e = pt.entry
    NE = pt.S if e.is_dense else e.slots.shape[1]
    auto = choose_splits(pt.R, NE, device_sms(DEVICE))
    pools = pt.pool8 if kind == "fp8" else pt.pool
    n = pt.n[kind]
    nbytes = pt.bytes[kind] + (pt.bias_bytes if bias else 0)
    row = dict(meta, pool=kind, bias=bias, entries=NE, splits_auto=auto, bytes=nbytes, variants={})
    f16s = (False, True) if kind == "fp8" else (False,)
    ref = None
    seen = set()
    for f16 in f16s:
        for name, rule, stages, warps in ATTN:
            sp = _splits(rule, auto)
            key = (sp, stages, warps, f16)
            label = name + ("-f16" if f16 else "")
            if key in seen:
                continue
            seen.add(key)
            if time.time() - t0 > BUDGET_S and name != "def":
                row["variants"][label] = {"skipped": "budget"}
                continue

            def call(i, sp=sp, stages=stages, warps=warps, f16=f16):
                return decode_attention(pt.q[i], pools[i], e, pt.bias[i] if bias else None, splits=sp,
                                        num_stages=stages, num_warps=warps, f16=f16)

            secs = _timed(call, n)
            out = call(0)
            if ref is None:
                ref = out
            row["variants"][label] = {"splits": sp, "num_stages": stages, "num_warps": warps, "f16": f16,
                                      "seconds": secs, "Bps": nbytes / secs, "max_rel_diff": _maxdiff(out, ref)}
    return row


def attention(t0: float) -> list[dict]:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rows = []
    plan = ([(_sparse_point, p, True, "bf16") for p in SPARSE_BF16]
            + [(_sparse_point, p, True, "fp8") for p in SPARSE_FP8]
            + [(_sparse_point, p, False, "bf16") for p in SPARSE_NOBIAS]
            + [(_dense_point, p, False, "bf16") for p in DENSE])
    for maker, (a, b), bias, kind in plan:
        pt, meta = maker(a, b, g)
        rows.append(_attention_point(pt, meta, bias, kind, t0))
        del pt
        torch.cuda.empty_cache()
    return rows


def select(t0: float) -> list[dict]:
    g = torch.Generator(device=DEVICE).manual_seed(1)
    out = []
    for R, nb in SELECT:
        nbp = 1 << (nb - 1).bit_length()
        qs = torch.rand(R, nb, device=DEVICE, generator=g)
        agn = torch.randn(R, nb, device=DEVICE, generator=g)
        ctx = torch.full((R,), nb * BS - BS // 2, device=DEVICE, dtype=torch.int64)
        ctx -= torch.randint(0, BS, (R,), device=DEVICE, generator=g)
        warps = [w for w in (1, 2, 4, 8, 16, 32) if 32 * w <= nbp and w * 512 >= nbp]
        base = None
        row = {"rows": R, "n_blocks": nb, "variants": {}}
        for radix in (1, 2, 4, 8):
            for w in warps:
                if time.time() - t0 > BUDGET_S + 60:
                    break

                def call(radix=radix, w=w):
                    return select_kernels.select_blocks_triton(qs, ctx, k=64, k_q_eff=33, sink=1, window=16,
                                                               block_size=BS, agnostic=agn, radix=radix,
                                                               num_warps=w)

                ids = call()
                if base is None:
                    base = select_kernels.select_blocks_triton(qs, ctx, k=64, k_q_eff=33, sink=1, window=16,
                                                               block_size=BS, agnostic=agn)
                row["variants"][f"r{radix}w{w}"] = {"radix": radix, "num_warps": w,
                                                    "seconds": time_graph(call, inner=10),
                                                    "ids_equal": bool(torch.equal(ids, base))}
        row["default_seconds"] = time_graph(lambda: select_kernels.select_blocks_triton(
            qs, ctx, k=64, k_q_eff=33, sink=1, window=16, block_size=BS, agnostic=agn), inner=10)
        out.append(row)
    return out


def scoring(t0: float) -> list[dict]:
    g = torch.Generator(device=DEVICE).manual_seed(2)
    out = []
    for batch, context in SCORING:
        R = batch * H
        nb = (context + 127) // BS + 1
        st = ScoreState.allocate(1, R, D, context + 128, nb, qaware=True, agnostic=False, dtype=torch.bfloat16,
                                 device=DEVICE)
        st.ckeys.normal_(generator=g)
        q = torch.randn((R, G, D), generator=g, device=DEVICE).to(torch.bfloat16)
        ctx = torch.full((R,), context + 1, device=DEVICE, dtype=torch.int64)
        key_bytes = R * ((context + 1 - 32) // 16 + 1) * D * 2
        row = {"batch": batch, "context": context, "key_bytes": key_bytes, "variants": {}}
        base = None
        loop = -(-nb // 128)  # one pool program per row, looping over its tiles (the pass before tiles)
        for bn, nw, pw, bb, pt in ((128, 4, 4, 128, 1), (128, 4, 4, 128, loop), (64, 4, 4, 128, 1),
                                   (128, 4, 4, 128, 2), (128, 4, 4, 128, 4), (128, 4, 2, 64, 1),
                                   (128, 4, 8, 256, 1), (128, 8, 4, 128, 1)):
            if time.time() - t0 > BUDGET_S + 120:
                break

            def call(bn=bn, nw=nw, pw=pw, bb=bb, pt=pt):
                return select_kernels.qaware_scores_triton(st.ckeys[0], st.nc, q, ctx, nb, stride=16, block_size=BS,
                                                           bn=bn, num_warps=nw, bb=bb, pool_warps=pw, pool_tiles=pt)

            s = call()
            base = s if base is None else base
            secs = time_graph(call, inner=10)
            row["variants"][f"bn{bn}w{nw}p{pw}b{bb}" + ("loop" if pt == loop else f"t{pt}")] = {
                "seconds": secs, "key_Bps": key_bytes / secs,
                "max_rel_diff": float(((s - base).abs().nan_to_num(0).max() / base.abs().nan_to_num(0).max()).item())}
        out.append(row)
        del st
        torch.cuda.empty_cache()
    return out


def run(out_path: str | None = None) -> dict:
    t0 = time.time()
    res = {"env": environment(), "hbm_copy_peak_Bps": hbm_copy_peak(), "sms": device_sms(DEVICE)}
    parts = os.environ.get("TUNE_PARTS", "select,scoring,attention").split(",")
    for name, fn in (("select", select), ("scoring", scoring), ("attention", attention)):
        if name not in parts:
            continue
        try:
            res[name] = fn(t0)
        except Exception as exc:  # noqa: BLE001 - one part's failure keeps the others
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
        res["seconds_total"] = time.time() - t0
        if out_path:
            write_json(out_path, res)
    return res


def _best(variants: dict) -> tuple[str, float]:
    timed = {k: v["seconds"] for k, v in variants.items() if "seconds" in v}
    k = min(timed, key=timed.get)
    return k, timed[k]


def table(res: dict) -> str:
    lines = [f"tuning ({res.get('seconds_total', 0):.0f} s); us; best variant and its speedup over the default"]
    for r in res.get("select", []) if isinstance(res.get("select"), list) else []:
        k, s = _best(r["variants"])
        eq = all(v.get("ids_equal", True) for v in r["variants"].values())
        lines.append(f"select R={r['rows']} nb={r['n_blocks']}: default {r['default_seconds'] * 1e6:.1f}, best {k} "
                     f"{s * 1e6:.1f} ({r['default_seconds'] / s:.2f}x) ids_equal={eq}")
    for r in res.get("scoring", []) if isinstance(res.get("scoring"), list) else []:
        v = r["variants"]
        d = next(iter(v.values()))["seconds"]
        k, s = _best(v)
        lines.append(f"scoring B={r['batch']} ctx={r['context']}: default {d * 1e6:.1f} "
                     f"({r['key_bytes'] / d / 1e12:.2f} TB/s), best {k} {s * 1e6:.1f} ({d / s:.2f}x)")
    for r in res.get("attention", []) if isinstance(res.get("attention"), list) else []:
        v = r["variants"]
        d = v["def"]["seconds"]
        k, s = _best(v)
        size = r.get("k", r.get("context"))
        diff = max(x.get("max_rel_diff", 0.0) for x in v.values())
        lines.append(f"attn {r['kind']:6} {r['pool']:4} bias={int(r['bias'])} B={r['batch']:3d} {size:6d} "
                     f"auto={r['splits_auto']}: def {d * 1e6:7.1f} ({r['bytes'] / d / 1e12:.2f} TB/s) best {k:12s} "
                     f"{s * 1e6:7.1f} ({d / s:.2f}x, {r['bytes'] / s / 1e12:.2f} TB/s) maxdiff {diff:.1e}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    r = run(sys.argv[1] if len(sys.argv) > 1 else None)
    print(table(r))
