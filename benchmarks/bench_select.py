"""Block selection per layer: the torch path against the Triton kernels, side by side, at llama3-8b shapes.

Run: ``PYTHONPATH=. python benchmarks/bench_select.py [out.json]``. Rows are (sequence, KV head) pairs: 8 KV heads,
GQA group 4, head dim 128, bf16 compressed keys; NOSA budgets k=64, k_q=33. Each of scoring, selection and both is
captured in a CUDA graph (10 calls per graph, as a decode step's 32 layers are) and replayed, so Triton's host-side
launch cost is not counted. Each configuration also checks the two paths against each other:

- selection from the same scores must be identical (``ids_equal``);
- Triton scores must match the torch scores computed in fp32 from the same bf16 keys to 1e-5 relative
  (``scores_close_fp32``); the torch bf16 path itself rounds each logit to bf16 (the matmul's output dtype), so its
  distance from the Triton scores is reported (``scores_maxrel_vs_torch_bf16``), as is the share of rows whose
  full-pipeline selection agrees (``pipeline_rows_equal``: near-ties can flip under that rounding).
"""

from __future__ import annotations

import sys

import torch

from runtime import select_kernels
from runtime.selection import ScoreState, qaware_block_scores, select_blocks_gpu
from runtime.timing import environment, time_graph, write_json

KV_HEADS, GROUP, HEAD_DIM = 8, 4, 128
CONFIGS = ((16, 8192), (64, 8192), (96, 8192), (32, 32768))  # (batch, context)
K, K_Q, STEPS = 64, 33, 128


def make_inputs(batch: int, context: int, dev="cuda", seed: int = 0) -> dict:
    """Scoring state and queries of one layer; contexts spread over the run's decode steps."""
    g = torch.Generator(device=dev).manual_seed(seed)
    R = batch * KV_HEADS
    max_tokens = context + STEPS
    nb = (max_tokens - 1) // 64 + 1
    st = ScoreState.allocate(1, R, HEAD_DIM, max_tokens, nb, qaware=True, agnostic=False, dtype=torch.bfloat16,
                             device=dev)
    st.ckeys.normal_(generator=g)
    q = torch.randn((R, GROUP, HEAD_DIM), generator=g, device=dev).to(torch.bfloat16)
    ctx = context + 1 + torch.randint(0, STEPS, (R,), generator=g, device=dev)
    agn = torch.randn((R, nb + 1), generator=g, device=dev)[:, :nb]  # a view, like the state's frozen scores
    return {"state": st, "q": q, "ctx": ctx, "nb": nb, "agnostic": agn, "rows": R}


def _fns(x: dict, use_triton: bool) -> dict:
    st, q, ctx, nb, agn = x["state"], x["q"], x["ctx"], x["nb"], x["agnostic"]
    scores = qaware_block_scores(st, 0, q, ctx, nb, use_triton=False)  # fixed input of the selection-only timing

    def score():
        return qaware_block_scores(st, 0, q, ctx, nb, use_triton=use_triton)

    def select():
        return select_blocks_gpu(scores, ctx, k=K, k_q=K_Q, agnostic=agn, use_triton=use_triton)

    def both():
        return select_blocks_gpu(score(), ctx, k=K, k_q=K_Q, agnostic=agn, use_triton=use_triton)

    return {"scoring": score, "selection": select, "both": both}


def check(x: dict) -> dict:
    """The two paths' outputs against each other (see the module docstring)."""
    st, q, ctx, nb, agn = x["state"], x["q"], x["ctx"], x["nb"], x["agnostic"]
    s_torch = qaware_block_scores(st, 0, q, ctx, nb, use_triton=False)
    s_tri = qaware_block_scores(st, 0, q, ctx, nb, use_triton=True)
    st32 = ScoreState(st.ckeys.float(), None, None, None, None, None, st.stride, st.block_size)
    s_f32 = qaware_block_scores(st32, 0, q.float(), ctx, nb, use_triton=False)
    fin = torch.isfinite(s_f32)

    def maxrel(a, b):
        return float(((a - b).abs() / b.abs().clamp(min=1e-30))[fin].max())

    ids_t = select_blocks_gpu(s_torch, ctx, k=K, k_q=K_Q, agnostic=agn, use_triton=False)
    ids_k = select_blocks_gpu(s_torch, ctx, k=K, k_q=K_Q, agnostic=agn, use_triton=True)
    pipe_k = select_blocks_gpu(s_tri, ctx, k=K, k_q=K_Q, agnostic=agn, use_triton=True)
    ids_q_t = select_blocks_gpu(s_torch, ctx, k=K, agnostic=None, use_triton=False)  # InfLLM-V2 rule
    ids_q_k = select_blocks_gpu(s_torch, ctx, k=K, agnostic=None, use_triton=True)
    return {
        "ids_equal": bool(torch.equal(ids_t, ids_k)),
        "ids_equal_infllmv2": bool(torch.equal(ids_q_t, ids_q_k)),
        "scores_close_fp32": bool(torch.allclose(s_tri, s_f32, rtol=1e-5, atol=1e-7)
                                  and torch.equal(torch.isinf(s_tri), torch.isinf(s_f32))),
        "scores_maxrel_vs_fp32": maxrel(s_tri, s_f32),
        "scores_maxrel_vs_torch_bf16": maxrel(s_tri, s_torch),
        "pipeline_rows_equal": float((pipe_k == ids_t).all(1).float().mean()),
    }


def time_config(batch: int, context: int, inner: int = 10, reps: int = 10) -> dict:
    x = make_inputs(batch, context)
    row = {"batch": batch, "context": context, "rows": x["rows"], "n_blocks": x["nb"], "k": K, "k_q": K_Q,
           "timing": f"cuda graph replay, {inner} calls per graph"}
    row.update(check(x))
    for path, use in (("torch", False), ("triton", True)):
        for part, fn in _fns(x, use).items():
            row[f"{part}_{path}_s"] = time_graph(fn, inner=inner, reps=reps)
    for part in ("scoring", "selection", "both"):
        row[f"{part}_speedup"] = row[f"{part}_torch_s"] / row[f"{part}_triton_s"]
    return row


def variants(batch: int = 96, context: int = 8192) -> list[dict]:
    """Kernel parameters the wrappers fix: radix / warps of the selection, chunk / warps of the logits kernel."""
    x = make_inputs(batch, context)
    st, q, ctx, nb, agn = x["state"], x["q"], x["ctx"], x["nb"], x["agnostic"]
    scores = qaware_block_scores(st, 0, q, ctx, nb, use_triton=False)
    rows = []
    for radix, warps in ((1, 1), (2, 1), (2, 2), (2, 4), (2, 8), (4, 2), (4, 4)):
        fn = lambda radix=radix, warps=warps: select_kernels.select_blocks_triton(
            scores, ctx, k=K, k_q_eff=K_Q, sink=1, window=16, block_size=64, agnostic=agn, radix=radix,
            num_warps=warps)
        rows.append({"kernel": "select", "radix": radix, "num_warps": warps, "seconds": time_graph(fn)})
    for bn in (32, 64, 128):
        for warps in (2, 4, 8):
            fn = lambda bn=bn, warps=warps: select_kernels.qaware_scores_triton(
                st.ckeys[0], st.nc, q, ctx, nb, stride=16, block_size=64, bn=bn, num_warps=warps)
            rows.append({"kernel": "scores", "bn": bn, "num_warps": warps, "seconds": time_graph(fn)})
    return [dict(r, batch=batch, context=context) for r in rows]


def kernel_times(batch: int, context: int, calls: int = 5) -> dict:
    """Device time per kernel of the Triton path (torch profiler, plain launches), microseconds per call."""
    from torch.profiler import ProfilerActivity, profile

    x = make_inputs(batch, context)
    fn = _fns(x, True)["both"]
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count:
            out[e.key] = round(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) / calls, 2)
    return out


def run(out_path: str | None = None, configs=CONFIGS, experiments: bool = True) -> dict:
    res = {"env": environment(), "shape": {"kv_heads": KV_HEADS, "group": GROUP, "head_dim": HEAD_DIM,
                                           "dtype": "bfloat16", "k": K, "k_q": K_Q},
           "rows": [time_config(b, c) for b, c in configs]}
    res["all_equal"] = all(r["ids_equal"] and r["ids_equal_infllmv2"] and r["scores_close_fp32"]
                           for r in res["rows"])
    if experiments:
        res["variants"] = variants(96, 8192) + variants(32, 32768)
        res["kernel_us"] = {f"{b}x{c}": kernel_times(b, c) for b, c in configs}
    if out_path:
        write_json(out_path, res)
    return res


def table(res: dict) -> str:
    us = 1e6
    lines = [f"{res['env'].get('device', 'cpu')}; times in us per layer call (torch / triton / speedup)",
             "batch   ctx  rows  scoring              selection            both                 ids  scores"]
    for r in res["rows"]:
        cells = "  ".join(f"{r[f'{p}_torch_s'] * us:6.1f} /{r[f'{p}_triton_s'] * us:6.1f} /{r[f'{p}_speedup']:4.1f}x"
                          for p in ("scoring", "selection", "both"))
        lines.append(f"{r['batch']:5d} {r['context']:5d} {r['rows']:5d}  {cells}  "
                     f"{'ok' if r['ids_equal'] and r['ids_equal_infllmv2'] else 'DIFF':4s} "
                     f"{r['scores_maxrel_vs_fp32']:.1e} (bf16 torch {r['scores_maxrel_vs_torch_bf16']:.1e}, "
                     f"pipeline rows equal {100 * r['pipeline_rows_equal']:.1f}%)")
    lines.append(f"all equal: {res['all_equal']}")
    for v in res.get("variants", []):
        params = ", ".join(f"{k}={v[k]}" for k in ("radix", "bn", "num_warps") if k in v)
        lines.append(f"  {v['kernel']:6s} b{v['batch']} ctx{v['context']} {params}: {v['seconds'] * us:.1f} us")
    for cfg, kt in res.get("kernel_us", {}).items():
        lines.append(f"  kernels {cfg}: " + ", ".join(f"{k} {v:.1f}" for k, v in kt.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run(sys.argv[1] if len(sys.argv) > 1 else None)))
