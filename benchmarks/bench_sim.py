"""Speed of the simulator: DES replay, analytic path, and a 500-point analytic sweep.

Targets (issue 3): a 1,024-step, 32-layer, batch-64 replay through the discrete-event model in under 5 s on one
core; the analytic path at least 100x faster; a 500-point analytic sweep in under 60 s on 2 cores.

The replay uses a synthetic NOSA trace (2 layers, 1 KV head, 16 sequences) retargeted to llama3-8b (32 layers,
8 KV heads) and assembled into a batch of 64 from step-shifted copies: the simulator's work depends on steps,
layers and micro-batches, not on how many rows the trace stored. Timings exclude trace synthesis and the numba
compile of the cache engine (one warm-up call), and run in one process (one core).

Run: ``python benchmarks/bench_sim.py [--out benchmarks/results/bench_sim.json]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nosasim.atomic import atomic_write  # noqa: E402
from nosasim.models import ReplayConfig  # noqa: E402
from nosasim.trace import write_trace  # noqa: E402
from nosasim.trace.synth import synthesize  # noqa: E402


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def bench_replay(results: dict) -> None:
    from nosasim.batch import per_layer_seq, plan_batch
    from nosasim.cost import CostModel
    from nosasim.sim import analytic, build_inputs, des, resolve, run_cache

    steps_needed, batch = 1024, 64
    seqs = 16
    copies = batch // seqs
    trace_steps = int(steps_needed * 2 * copies / (2 * copies - (copies - 1))) + 2 * copies
    trace = synthesize("nosa", 2, 1, seqs, trace_steps, 64, 16384, head_dim=128, seed=11)
    for mb in (1, 4):
        cfg, model, profile = resolve(trace, ReplayConfig(model="llama3-8b", variant="nosa", batch=batch,
                                                          microbatches=mb))
        cache = run_cache(trace, cfg)
        plan = plan_batch(trace.seqs, trace.steps, batch)
        if plan.steps < steps_needed:
            raise RuntimeError(f"benchmark trace too short ({plan.steps} replay steps): a bug in its sizing")
        plan = type(plan)(plan.seq, plan.offset, steps_needed)  # exactly 1,024 replayed steps
        t0 = time.perf_counter()
        misses = plan.take(per_layer_seq(cache.misses, model.layers, model.kv_heads))
        wbs = plan.take(per_layer_seq(cache.writebacks, model.layers, model.kv_heads))
        inputs = build_inputs(CostModel(profile, model, cfg), plan.take(trace.context_len), misses, wbs, mb)
        prep = time.perf_counter() - t0
        t_des, r_des = _best(lambda: des.simulate(inputs), 2)
        t_ana, r_ana = _best(lambda: analytic.simulate(inputs), 20)
        rel = float(abs(r_des.step_s - r_ana.step_s).max() / r_ana.step_s.min())
        results[f"replay_1024x32_b64_mb{mb}"] = {
            "steps": int(inputs.pre.shape[0]), "layers": inputs.layers, "batch": batch, "microbatches": mb,
            "inputs_s": round(prep, 4), "des_s": round(t_des, 4), "analytic_s": round(t_ana, 6),
            "speedup": round(t_des / t_ana, 1), "max_rel_diff": rel,
            "des_target_met": t_des < 5.0, "speedup_target_met": t_des / t_ana >= 100,
            "median_step_ms": round(float(r_ana.median_step()[0]) * 1e3, 4),
        }
        print(results[f"replay_1024x32_b64_mb{mb}"], flush=True)


def bench_sweep(results: dict, workers: int) -> None:
    from nosasim.sweep import expand, run_sweep

    trace = synthesize("nosa", 2, 2, 4, 256, 64, 16384, head_dim=128, seed=12)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.nosatrace"
        write_trace(path, trace)
        base = ReplayConfig(model="llama3-8b", variant="nosa", k=64)
        grid = {"k_q": [17, 25, 33, 41, 49], "capacity": [64, 80, 96, 128, 160],
                "policy": ["prev", "lru", "lfu", "static", "belady"], "batch": [8, 16, 32, 64]}
        cfgs, skipped = expand(base, grid)
        t0 = time.perf_counter()
        rows = run_sweep(str(path), cfgs, workers=workers, progress=False)
        took = time.perf_counter() - t0
    results["sweep_500_points"] = {"points": len(rows), "workers": workers, "seconds": round(took, 2),
                                   "points_per_s": round(len(rows) / took, 1), "target_met": took < 60.0,
                                   "note": "includes worker start-up (spawn) and the cache engine per group"}
    print(results["sweep_500_points"], flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "bench_sim.json"))
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
    }
    bench_replay(results)
    bench_sweep(results, args.workers)
    out = Path(args.out)
    atomic_write(out, (json.dumps(results, indent=1) + "\n").encode())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
