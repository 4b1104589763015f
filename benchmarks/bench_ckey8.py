"""Scoring with fp8 (e4m3) compressed keys against bf16 ones, at llama3-8b shapes on long contexts.

Run: ``PYTHONPATH=. python benchmarks/bench_ckey8.py [out.json]`` (or the device suite's ``bench:ckey8`` stage).

Per (batch, context): the two scoring launches of the three-launch selection (``qaware_scores_triton``: q . keys,
softmax statistics, group sum, block max-pool), each alone in a CUDA graph, over several layers' keys so no call is
served from L2, for three variants:

- ``bf16``: bf16 keys and a bf16 query (today's default);
- ``fp8_bf16dot``: e4m3 keys converted in the kernel to bf16 for the tensor-core dot;
- ``fp8_f16dot``: the same keys converted to fp16, the query rounded to fp16 (the cheaper conversion on Hopper;
  the runtime's choice, ``select_kernels.FP8_KEY_DOTS_IN_F16``).

Each figure is given with the rate of the key bytes it must read (what scoring cannot avoid) against the HBM copy
peak measured in the same run. Checks: each fp8 variant's scores equal the torch math in fp32 on the same e4m3
values to fp32 rounding (``close_fp32``), and the share of rows whose top-33 query-aware blocks equal the bf16
keys' (``rows_same_top``: the selection effect of the rounding on random keys, a worst case next to real ones).
"""

from __future__ import annotations

import sys
import time

import torch

from runtime import select_kernels
from runtime.selection import ScoreState, qaware_block_scores
from runtime.timing import environment, hbm_copy_peak, time_graph, write_json

KV_HEADS, GROUP, HEAD_DIM, STRIDE, BLOCK = 8, 4, 128, 16, 64
CONFIGS = ((128, 131072), (128, 65536), (192, 131072), (32, 131072), (64, 32768))
VARIANTS = ("bf16", "fp8_bf16dot", "fp8_f16dot")


def _one(batch: int, context: int, l2: int) -> dict:
    R = batch * KV_HEADS
    nc = context // STRIDE
    nb = context // BLOCK + 1
    layer_bytes = R * (nc + 1) * HEAD_DIM * 2
    layers = max(1, min(8, -(-4 * l2 // layer_bytes)))
    g = torch.Generator(device="cuda").manual_seed(batch + context)
    keys16 = [torch.randn((R, nc + 1, HEAD_DIM), generator=g, device="cuda", dtype=torch.bfloat16)
              for _ in range(layers)]
    keys8 = [k.to(torch.float8_e4m3fn) for k in keys16]
    q = torch.randn((R, GROUP, HEAD_DIM), generator=g, device="cuda", dtype=torch.bfloat16)
    ctx = torch.full((R,), context, device="cuda", dtype=torch.int64)
    args = {"bf16": (keys16, q), "fp8_bf16dot": (keys8, q), "fp8_f16dot": (keys8, q.half())}
    out = {"batch": batch, "context": context, "rows": R, "layers_cycled": layers,
           "key_bytes_bf16": layer_bytes, "key_bytes_fp8": layer_bytes // 2}
    scores = {}
    for name, (ks, qq) in args.items():
        i = [0]

        def call():
            k = ks[i[0] % len(ks)]
            i[0] += 1
            return select_kernels.qaware_scores_triton(k, nc, qq, ctx, nb, stride=STRIDE, block_size=BLOCK)

        # The runtime's choice for fp8 keys is a module flag read at each call (captures included).
        select_kernels.FP8_KEY_DOTS_IN_F16 = name != "fp8_bf16dot"
        try:
            scores[name] = call()
            out[f"{name}_s"] = time_graph(call, inner=max(10, layers))
        finally:
            select_kernels.FP8_KEY_DOTS_IN_F16 = True
    st8 = ScoreState(keys8[0][None].float(), None, None, None, None, None, STRIDE, BLOCK)
    refs = {"fp8_bf16dot": qaware_block_scores(st8, 0, q.float(), ctx, nb, use_triton=False),
            "fp8_f16dot": qaware_block_scores(st8, 0, q.half().float(), ctx, nb, use_triton=False)}
    top = lambda s: s.nan_to_num(float("-inf")).topk(33, dim=-1).indices.sort(-1).values  # noqa: E731
    t16 = top(scores["bf16"])
    for name in VARIANTS[1:]:
        out[f"{name}_close_fp32"] = bool(torch.allclose(scores[name], refs[name], rtol=1e-4, atol=1e-6))
        out[f"{name}_rows_same_top"] = float((top(scores[name]) == t16).all(-1).float().mean())
        out[f"{name}_speedup"] = out["bf16_s"] / out[f"{name}_s"]
    del keys16, keys8
    torch.cuda.empty_cache()
    return out


def run(out_path: str, budget_s: float = 150.0) -> dict:
    t0 = time.time()
    peak = hbm_copy_peak()
    l2 = int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20) or (50 << 20))
    res = {"env": environment(), "hbm_copy_Bps": peak, "variants": VARIANTS, "rows": [], "skipped": []}
    for b, c in CONFIGS:
        if time.time() - t0 > budget_s:
            res["skipped"].append({"batch": b, "context": c, "why": "time budget"})
            continue
        r = _one(b, c, l2)
        for name in VARIANTS:
            nbytes = r["key_bytes_bf16"] if name == "bf16" else r["key_bytes_fp8"]
            r[f"{name}_hbm_share"] = nbytes / r[f"{name}_s"] / peak
        res["rows"].append(r)
        write_json(out_path, res)
    return res


def table(res: dict) -> str:
    lines = ["ckey8: batch context   bf16 us  fp8/bf16dot us  fp8/f16dot us  (key-byte rate / copy peak)  same-top"]
    for r in res["rows"]:
        lines.append(
            f"ckey8: {r['batch']:5d} {r['context']:7d} {r['bf16_s'] * 1e6:9.0f} ({r['bf16_hbm_share']:.0%})"
            f" {r['fp8_bf16dot_s'] * 1e6:9.0f} ({r['fp8_bf16dot_hbm_share']:.0%})"
            f" {r['fp8_f16dot_s'] * 1e6:9.0f} ({r['fp8_f16dot_hbm_share']:.0%})"
            f"  {r['fp8_bf16dot_rows_same_top']:.3f}/{r['fp8_f16dot_rows_same_top']:.3f}"
            f" close {r['fp8_bf16dot_close_fp32']}/{r['fp8_f16dot_close_fp32']}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run(sys.argv[1] if len(sys.argv) > 1 else "bench_ckey8.json")))
