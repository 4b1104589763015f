"""Decode step time of the llama3-8b shape: dense vs InfLLM-V2 offload vs NOSA offload, at 16K and 32K context.

Run: ``PYTHONPATH=. python benchmarks/bench_decode.py [out.json]`` on a GPU machine.

What is measured, per (context, variant, batch) that fits: the median of 64 CUDA-graph-replayed steps after 8 eager
warm-up steps (CUDA events), tokens/s, blocks loaded per step, and the share of the step spent on transfers
(``1 - t(copies off) / t``, from a second run with every host<->device copy skipped).

Random weights make query-aware selections churn far more than a trained model's, so the offloaded variants run
their full selection (scoring, top-k) and then *replace* its result with a synthetic trace's selection
(``nosasim.trace.synth``: InfLLM-V2 with adjacent overlap 0.889, NOSA with k_q = 33, the paper's figures): the
compute is real, the transfer volume realistic. Host rows are shared: sequence ``b`` uses host row ``b % 4`` (the bytes moved
are the same; 128 distinct 32K-token sequences would need 512 GiB of host memory; the trace has 4 sequences too).
"""

from __future__ import annotations

import gc
import sys
import time

import numpy as np
import torch

from nosasim import memory
from nosasim.contract import Budget
from runtime.config import PRESETS, RuntimeConfig
from runtime.decode import USABLE_SHARE, Runner, check_fits
from runtime.kvstore import HostStore
from runtime.model import Weights
from runtime.timing import environment, write_json

CONTEXTS = (16384, 32768)
BATCHES = (16, 0, 64, 32, 8)  # 0: each variant's largest batch
WARMUP, TIMED, NOCOPY = 8, 64, 16
HOST_SEQS = 4  # sequences b and b + 4 share a host row: same bytes over the link, a quarter of the host memory


def max_batch(cfg: RuntimeConfig, free_bytes: int, weights_given: bool = True) -> int:
    """Largest batch whose planned memory fits, by the same rule ``check_fits`` enforces (``nosasim.memory``)."""
    return memory.largest_batch(USABLE_SHARE * free_bytes, cfg.model_for_memory, cfg.variant, cfg.budget, cfg.policy,
                                cfg.max_tokens, cfg.block, weights_resident=weights_given)


def trace_sel(kind: str, context: int, steps: int, shape) -> tuple[torch.Tensor, dict]:
    from nosasim.trace.stats import overlap_per_layer  # noqa: F401 - documents where overlap is defined
    from nosasim.trace.synth import synthesize

    tr = synthesize(kind, layers=shape.layers, heads=shape.kv_heads, seqs=4, steps=steps, k=64, context=context,
                    kq=33 if kind == "nosa" else None, overlap=0.889, seed=11, head_dim=shape.head_dim)
    s = tr.sel.astype(np.int64)
    a, b = s[1:], s[:-1]
    inter = ((a[..., :, None] == b[..., None, :]) & (a[..., :, None] >= 0)).sum((-1, -2))
    overlap = float((inter / np.maximum((a >= 0).sum(-1), 1)).mean())
    return torch.from_numpy(s).cuda(), {"kind": kind, "steps": steps, "seqs": 4, "mean_adjacent_overlap": overlap}


def run_one(cfg, weights, host, sel, copies=True, timed=TIMED):
    r = Runner(cfg, "cuda", weights=weights, host=host, trace_sel=sel, copies=copies)
    t = r.measure(steps=timed, warmup=WARMUP)
    loaded = None
    if cfg.offloaded:
        first = WARMUP + 2
        loaded = r.backend.loaded[first: first + timed].sum((1, 2)).float().mean().item()
    del r
    gc.collect()
    torch.cuda.empty_cache()
    return t, loaded


def plan(contexts, variants, batches, maxb) -> list[tuple[int, str, int]]:
    """Runs in priority order, so a run cut short by the time budget still compares the variants: each batch for
    every context and variant before the next batch; ``0`` in ``batches`` stands for each variant's largest batch."""
    out = []
    for b in batches:
        for ctx in contexts:
            for v in variants:
                bb = maxb[f"{v}@{ctx}"] if b == 0 else b
                if (ctx, v, bb) not in out and bb >= 1:
                    out.append((ctx, v, bb))
    return out


def run(out_path=None, contexts=CONTEXTS, batches=BATCHES, variants=("dense", "infllmv2", "nosa"),
        budget_s: float = 400.0, shape_name="llama3-8b") -> dict:
    t_start = time.time()
    shape = PRESETS[shape_name]
    weights = Weights.random(shape, torch.bfloat16, "cuda", 0)
    free = torch.cuda.mem_get_info()[0]
    steps = WARMUP + 2 + TIMED + 1
    host_cfg = RuntimeConfig(shape, "nosa", batch=HOST_SEQS, context=max(contexts), steps=steps)
    host = HostStore.allocate(host_cfg, pin=True)
    host.fill_random(1, "cuda")
    res = {"env": environment(), "shape": shape_name, "free_gpu_bytes_after_weights": free, "runs": [],
           "max_batch": {}, "traces": {},
           "protocol": {"warmup": WARMUP, "timed_steps": TIMED, "graph": True, "host_seqs": HOST_SEQS,
                        "no_copy_timed_steps": NOCOPY, "k": 64, "k_q_nosa": 33, "policy": "prev",
                        "capacity": 63}}
    bases = {}
    for ctx in contexts:
        for v in variants:
            bases[(ctx, v)] = RuntimeConfig(shape, v, batch=1, context=ctx, steps=steps,
                                            budget=None if v == "dense" else Budget.for_variant(v, 64),
                                            host_seqs=1 if v != "dense" else None)
            res["max_batch"][f"{v}@{ctx}"] = max_batch(bases[(ctx, v)], free)
    sels = {}
    for ctx, v, b in plan(contexts, variants, batches, res["max_batch"]):
        entry = {"variant": v, "context": ctx, "batch": b, "largest": b == res["max_batch"][f"{v}@{ctx}"]}
        if time.time() - t_start > budget_s:
            entry["skipped"] = "time budget"
            res["runs"].append(entry)
            continue
        base = bases[(ctx, v)]
        cfg = base.with_(batch=b, host_seqs=min(b, HOST_SEQS) if v != "dense" else None)
        entry.update(k=64, k_q=cfg.budget.k_q if cfg.offloaded else None, policy=cfg.policy,
                     capacity=cfg.slots if cfg.offloaded else None,
                     planned_gpu_bytes=sum(cfg.gpu_bytes().values()))
        try:
            check_fits(cfg, "cuda", True)
            sel = None
            if v != "dense":
                if (v, ctx) not in sels:
                    sels[(v, ctx)] = trace_sel(v, ctx, steps, shape)
                    res["traces"][f"{v}@{ctx}"] = sels[(v, ctx)][1]
                sel = sels[(v, ctx)][0]
            t, loaded = run_one(cfg, weights, host, sel)
            entry.update(median_ms=t.median_ms, tokens_per_s=b / (t.median_ms / 1e3), step_ms=t.ms)
            if cfg.offloaded:
                t0, _ = run_one(cfg, weights, host, sel, copies=False, timed=NOCOPY)
                entry.update(loaded_blocks_per_step=loaded, h2d_bytes_per_step=loaded * cfg.block.block_bytes,
                             median_ms_without_copies=t0.median_ms,
                             transfer_share=max(0.0, 1 - t0.median_ms / t.median_ms))
            print(f"{v:9s} ctx {ctx:6d} B {b:4d}: {t.median_ms:8.2f} ms  {entry['tokens_per_s']:8.1f} tok/s"
                  + (f"  transfers {100 * entry['transfer_share']:.0f}%" if cfg.offloaded else ""), flush=True)
        except (ValueError, torch.OutOfMemoryError) as exc:
            entry["skipped"] = f"{type(exc).__name__}: {exc}"[:500]
            gc.collect()
            torch.cuda.empty_cache()
        res["runs"].append(entry)
        if out_path:
            write_json(out_path, res)
    del host
    if out_path:
        write_json(out_path, res)
    return res


def table(res: dict) -> str:
    lines = ["variant   ctx     B   ms/step   tok/s  xfer%  blocks/step"]
    for r in sorted(res["runs"], key=lambda r: (r["context"], r["variant"], r["batch"])):
        if "median_ms" not in r:
            lines.append(f"{r['variant']:9s} {r['context']:6d} {r['batch']:4d}  skipped: {r.get('skipped', '')[:60]}")
            continue
        lines.append(f"{r['variant']:9s} {r['context']:6d} {r['batch']:4d} {r['median_ms']:8.2f} {r['tokens_per_s']:8.1f}"
                     f" {100 * r.get('transfer_share', 0):5.1f} {r.get('loaded_blocks_per_step') or 0:10.0f}")
    lines.append("max batch: " + ", ".join(f"{k}={v}" for k, v in res["max_batch"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run(sys.argv[1] if len(sys.argv) > 1 else None)))
