"""End-to-end decode measurements that the simulator must predict (the validation protocol of DESIGN.md).

Each configuration decodes a real (or seeded synthetic) nosasim trace on the GPU: the offloaded variants run their
full selection and then use the trace's selections, so the transfers are the trace's; the batch is assembled and
the trace retargeted to the model shape exactly as ``nosasim.batch`` does it (same sequences, same step shifts,
layers and heads mapped cyclically), so simulator and runtime replay the same selections. Step time is the median
of 64 CUDA-graph-replayed steps after warm-up (CUDA events).

The results are written as ``analysis/results/e2e-*.json`` and scored by ``python -m analysis.validate``; nothing
here feeds the simulator's calibration.
"""

from __future__ import annotations

import gc
import hashlib
import time

import numpy as np
import torch

from nosasim.batch import assemble_trace
from nosasim.select import for_budgets
from nosasim.trace import read_trace
from nosasim.trace.synth import synthesize

from .config import PRESETS, RuntimeConfig
from .decode import Runner
from .kvstore import HostStore
from .model import Weights
from .timing import environment, write_json

WARMUP, TIMED = 8, 64
HOST_SEQS = 4  # host rows shared across the batch: same bytes over the link, a fraction of the host memory

REAL = "traces/samples/smollm2-topics-8k.nosatrace"
SYNTH_32K = {"layers": 32, "heads": 8, "seqs": 4, "steps": 160, "k": 64, "context": 32768, "seed": 7,
             "head_dim": 128}

# (name, trace source, variant, batch, k, k_q, capacity, policy[, microbatches[, gather programs]])
CONFIGS = [
    *[(f"dense-8k-b{b}", REAL, "dense", b, None, None, None, "prev") for b in (8, 16, 32)],
    *[(f"infllmv2-8k-b{b}", REAL, "infllmv2", b, 64, 64, None, "prev") for b in (16, 32, 64, 96)],
    *[(f"nosa-8k-b{b}", REAL, "nosa", b, 64, 33, None, "prev") for b in (16, 32, 64, 96)],
    ("nosa-8k-b32-lru96", REAL, "nosa", 32, 64, 33, 96, "lru"),
    ("infllmv2-8k-b64-k32", REAL, "infllmv2", 64, 32, 32, None, "prev"),
    ("nosa-8k-b64-k32", REAL, "nosa", 64, 32, 24, None, "prev"),
    ("dense-32k-b8", {"kind": "infllmv2", **SYNTH_32K}, "dense", 8, None, None, None, "prev"),
    ("infllmv2-32k-b32", {"kind": "infllmv2", **SYNTH_32K}, "infllmv2", 32, 64, 64, None, "prev"),
    ("nosa-32k-b32", {"kind": "nosa", "kq": 33, **SYNTH_32K}, "nosa", 32, 64, 33, None, "prev"),
    # Micro-batches: one group's transfers overlap the others' compute (the simulator's schedule, measured). The
    # copies run as 33 persistent programs: a program per entry, or one per SM, keeps the GEMMs beside them off the
    # SMs until the copy ends (benchmarks/bench_overlap.py: overlap 0.01 and 0.09, against 0.85 with 33 programs).
    *[(f"{v}-8k-b{b}-mb2", REAL, v, b, 64, 64 if v == "infllmv2" else 33, None, "prev", 2, 33)
      for v, b in (("infllmv2", 64), ("nosa", 64), ("nosa", 96))],
    ("nosa-32k-b32-mb2", {"kind": "nosa", "kq": 33, **SYNTH_32K}, "nosa", 32, 64, 33, None, "prev", 2, 33),
]


def load_source(source):
    """A trace path, or a dict of ``nosasim.trace.synth.synthesize`` arguments (regenerated identically on the CPU)."""
    if isinstance(source, str):
        return read_trace(source)
    return synthesize(**source)


def assemble(trace, variant: str, batch: int, k, k_q):
    """Selections ``[steps, L, H, batch, k]`` and contexts ``[steps, batch]``, re-selected for the budgets and
    assembled by ``nosasim.batch.assemble_trace``, exactly as ``analysis.validate`` replays them."""
    if variant != "dense":
        trace = for_budgets(trace, k, k_q, sink=1, window=16)
    batch_trace = assemble_trace(trace, batch)
    return (batch_trace.sel if variant != "dense" else None), batch_trace.context_len, batch_trace


def run_config(entry, weights, host, traces, copies: bool = True) -> dict:
    name, source, variant, batch, k, k_q, cap, policy = entry[:8]
    microbatches = entry[8] if len(entry) > 8 else 1
    programs = entry[9] if len(entry) > 9 else 0
    key = source if isinstance(source, str) else tuple(sorted(source.items()))
    if key not in traces:
        traces[key] = load_source(source)
    trace = traces[key]
    sel, ctx, batch_trace = assemble(trace, variant, batch, k, k_q)
    steps = WARMUP + 2 + TIMED + 1
    if batch_trace.steps < steps:
        raise ValueError(f"{name}: the assembled batch has {batch_trace.steps} steps, fewer than the {steps} needed")
    shape = PRESETS["llama3-8b"]
    cfg = RuntimeConfig(shape, variant, batch=batch, context=int(ctx[0].max()) - 1, steps=steps, k=k or 64,
                        k_q=k_q if variant == "nosa" else None, capacity=cap, policy=policy,
                        host_seqs=min(batch, HOST_SEQS) if variant != "dense" else None, microbatches=microbatches,
                        gather_programs=programs)
    kw = {}
    if variant != "dense":
        kw = dict(host=host, trace_sel=torch.from_numpy(sel[:steps].astype(np.int64)).cuda(),
                  ctx0=torch.from_numpy(ctx[0].astype(np.int64)).cuda())
    r = Runner(cfg, "cuda", weights=weights, copies=copies, **kw) if variant != "dense" else \
        Runner(cfg, "cuda", weights=weights)
    t = r.measure(steps=TIMED, warmup=WARMUP)
    out = {
        "name": name, "trace": source if isinstance(source, str) else None,
        "synth": None if isinstance(source, str) else source, "model": "llama3-8b", "variant": variant,
        "trace_sel_sha256": hashlib.sha256(np.ascontiguousarray(trace.sel).tobytes()).hexdigest(),
        "batch": batch, "k": k, "k_q": k_q, "capacity": cap, "policy": policy, "microbatches": microbatches,
        "gather_programs": programs,
        "steps": [WARMUP + 2, WARMUP + 2 + TIMED],
        "measured": {"median_step_s": t.median_ms / 1e3, "p10_step_s": float(np.percentile(t.ms, 10)) / 1e3,
                     "p90_step_s": float(np.percentile(t.ms, 90)) / 1e3, "timed_steps": len(t.ms)},
        "step_ms": t.ms,
    }
    if variant != "dense":
        lo = WARMUP + 2
        out["loaded_blocks_per_step"] = r.backend.loaded[lo: lo + TIMED].sum((1, 2)).tolist()
    del r
    gc.collect()
    torch.cuda.empty_cache()
    return out


def run(out_path: str, budget_s: float = 300.0, configs=CONFIGS) -> dict:
    t0 = time.time()
    shape = PRESETS["llama3-8b"]
    weights = Weights.random(shape, torch.bfloat16, "cuda", 0)
    host_cfg = RuntimeConfig(shape, "nosa", batch=HOST_SEQS, context=SYNTH_32K["context"],
                             steps=SYNTH_32K["steps"] + 8, k_q=33)
    host = HostStore.allocate(host_cfg, pin=True)
    host.fill_random(1, "cuda")
    res = {"env": environment(), "date": environment()["date"], "protocol": {"warmup": WARMUP, "timed": TIMED,
           "graph": True, "host_seqs": HOST_SEQS}, "runs": [], "skipped": []}
    res["device"] = {"name": res["env"].get("device"), "driver": res["env"].get("driver"),
                     "torch": res["env"].get("torch"), "triton": res["env"].get("triton")}
    traces: dict = {}
    for entry in configs:
        if time.time() - t0 > budget_s:
            res["skipped"].append({"name": entry[0], "why": "time budget"})
            continue
        try:
            r = run_config(entry, weights, host, traces)
            res["runs"].append(r)
            print(f"{r['name']:22s} {1e3 * r['measured']['median_step_s']:8.2f} ms  "
                  f"{r['batch'] / r['measured']['median_step_s']:8.1f} tok/s", flush=True)
        except (ValueError, torch.OutOfMemoryError) as exc:
            res["skipped"].append({"name": entry[0], "why": f"{type(exc).__name__}: {exc}"[:400]})
            gc.collect()
            torch.cuda.empty_cache()
        write_json(out_path, res)
    return res


def table(res: dict) -> str:
    lines = ["e2e: name                  ms/step    tok/s   p10-p90 ms"]
    for r in res["runs"]:
        m = r["measured"]
        lines.append(f"e2e: {r['name']:22s} {1e3 * m['median_step_s']:8.2f} {r['batch'] / m['median_step_s']:8.1f}"
                     f"   {1e3 * m['p10_step_s']:.2f}-{1e3 * m['p90_step_s']:.2f}")
    lines += [f"e2e skipped {s['name']}: {s['why'][:120]}" for s in res["skipped"]]
    return "\n".join(lines)

