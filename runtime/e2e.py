"""End-to-end decode measurements that the simulator must predict (the validation protocol, docs/validation.md).

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
import time

import numpy as np
import torch

from nosasim.contract import Budget
from nosasim.experiment import E2EConfig, fingerprint, load_source, replay_batch

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
NOSA, INFLLMV2 = Budget(64, 33), Budget(64)

CONFIGS = [
    *[E2EConfig(f"dense-8k-b{b}", REAL, "dense", b) for b in (8, 16, 32)],
    *[E2EConfig(f"infllmv2-8k-b{b}", REAL, "infllmv2", b, INFLLMV2) for b in (16, 32, 64, 96)],
    *[E2EConfig(f"nosa-8k-b{b}", REAL, "nosa", b, NOSA) for b in (16, 32, 64, 96)],
    E2EConfig("nosa-8k-b32-lru96", REAL, "nosa", 32, NOSA.with_capacity(96), "lru"),
    E2EConfig("infllmv2-8k-b64-k32", REAL, "infllmv2", 64, Budget(32)),
    E2EConfig("nosa-8k-b64-k32", REAL, "nosa", 64, Budget(32, 24)),
    E2EConfig("dense-32k-b8", {"kind": "infllmv2", **SYNTH_32K}, "dense", 8),
    E2EConfig("infllmv2-32k-b32", {"kind": "infllmv2", **SYNTH_32K}, "infllmv2", 32, INFLLMV2),
    E2EConfig("nosa-32k-b32", {"kind": "nosa", "kq": 33, **SYNTH_32K}, "nosa", 32, NOSA),
    # Micro-batches: one group's transfers overlap the others' compute (the simulator's schedule, measured). The
    # copies run as 33 persistent programs: a program per entry, or one per SM, keeps the GEMMs beside them off the
    # SMs until the copy ends (benchmarks/bench_overlap.py: overlap 0.01 and 0.09, against 0.85 with 33 programs).
    *[E2EConfig(f"{v}-8k-b{b}-mb2", REAL, v, b, INFLLMV2 if v == "infllmv2" else NOSA, microbatches=2,
                gather_programs=33) for v, b in (("infllmv2", 64), ("nosa", 64), ("nosa", 96))],
    E2EConfig("nosa-32k-b32-mb2", {"kind": "nosa", "kq": 33, **SYNTH_32K}, "nosa", 32, NOSA, microbatches=2,
              gather_programs=33),
]


def run_config(cfg: E2EConfig, weights, host, traces, copies: bool = True) -> dict:
    trace = load_source(cfg.source, traces)
    batch_trace = replay_batch(trace, cfg)
    steps = WARMUP + 2 + TIMED + 1
    if batch_trace.steps < steps:
        raise ValueError(f"{cfg.name}: the assembled batch has {batch_trace.steps} steps, fewer than the {steps} "
                         f"needed")
    ctx = batch_trace.context_len
    rcfg = RuntimeConfig(PRESETS[cfg.model], cfg.variant, batch=cfg.batch, context=int(ctx[0].max()) - 1,
                         steps=steps, budget=cfg.budget, policy=cfg.policy,
                         host_seqs=min(cfg.batch, HOST_SEQS) if cfg.budget else None, microbatches=cfg.microbatches,
                         gather_programs=cfg.gather_programs)
    kw = {}
    if cfg.budget is not None:
        kw = dict(host=host, trace_sel=torch.from_numpy(batch_trace.sel[:steps].astype(np.int64)).cuda(),
                  ctx0=torch.from_numpy(ctx[0].astype(np.int64)).cuda(), copies=copies)
    r = Runner(rcfg, "cuda", weights=weights, **kw)
    t = r.measure(steps=TIMED, warmup=WARMUP)
    out = {
        **cfg.to_fields(), "trace_sel_sha256": fingerprint(trace),
        "steps": [WARMUP + 2, WARMUP + 2 + TIMED],
        "measured": {"median_step_s": t.median_ms / 1e3, "p10_step_s": float(np.percentile(t.ms, 10)) / 1e3,
                     "p90_step_s": float(np.percentile(t.ms, 90)) / 1e3, "timed_steps": len(t.ms)},
        "step_ms": t.ms,
    }
    if cfg.budget is not None:
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
                             steps=SYNTH_32K["steps"] + 8)
    host = HostStore.allocate(host_cfg, pin=True)
    host.fill_random(1, "cuda")
    res = {"env": environment(), "date": environment()["date"], "protocol": {"warmup": WARMUP, "timed": TIMED,
           "graph": True, "host_seqs": HOST_SEQS}, "runs": [], "skipped": []}
    res["device"] = {"name": res["env"].get("device"), "driver": res["env"].get("driver"),
                     "torch": res["env"].get("torch"), "triton": res["env"].get("triton")}
    traces: dict = {}
    for entry in configs:
        if time.time() - t0 > budget_s:
            res["skipped"].append({"name": entry.name, "why": "time budget"})
            continue
        try:
            r = run_config(entry, weights, host, traces)
            res["runs"].append(r)
            print(f"{r['name']:22s} {1e3 * r['measured']['median_step_s']:8.2f} ms  "
                  f"{r['batch'] / r['measured']['median_step_s']:8.1f} tok/s", flush=True)
        except (ValueError, torch.OutOfMemoryError) as exc:
            res["skipped"].append({"name": entry.name, "why": f"{type(exc).__name__}: {exc}"[:400]})
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

