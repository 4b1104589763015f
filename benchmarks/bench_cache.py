"""Speed of the block-cache engine: block accesses per second on one core, for every policy.

The workload of issue 2: a synthetic NOSA trace of 30 layers x 3 KV heads x 16 sequences x 1,024 decode steps,
k = 64 (context about 8K tokens, so about 128 blocks per row): about 94 million block accesses. Target: at least
50 million accesses/s for ``lru``. Timings are of the whole ``simulate_cache`` call (kernel, allocation and
result assembly) on an in-memory trace, best of ``--repeats`` runs; JIT compilation is timed separately on a
fresh numba cache directory, so it is a real compile, not a cache load.

    python benchmarks/bench_cache.py            # writes benchmarks/results/bench_cache.json
    python benchmarks/bench_cache.py --steps 64 --no-write   # a quick look

The synthetic trace takes a couple of minutes to generate, so it is kept in the temp folder between runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

# A fresh numba cache directory, set before numba is imported, so the compile time below is a real compile.
NUMBA_DIR = tempfile.mkdtemp(prefix="nosasim-bench-numba-")
os.environ["NUMBA_CACHE_DIR"] = NUMBA_DIR

import numba  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nosasim.atomic import atomic_write  # noqa: E402
from nosasim.cache import POLICIES, simulate_arrays, simulate_cache  # noqa: E402
from nosasim.trace import read_trace, write_trace  # noqa: E402
from nosasim.trace.synth import synthesize  # noqa: E402

TARGET = {"policy": "lru", "accesses_per_s": 50e6}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_cache.json")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_trace(args):
    """The synthetic trace, from the temp-folder cache when an identical one was generated before."""
    name = (f"nosasim-bench-{args.kind}-L{args.layers}-H{args.heads}-B{args.seqs}-T{args.steps}-k{args.k}"
            f"-ctx{args.context}-s{args.seed}.nosatrace")
    path = os.path.join(tempfile.gettempdir(), name)
    if os.path.exists(path):
        t0 = time.perf_counter()
        trace = read_trace(path)
        return trace, {"trace_source": "cached file", "trace_load_seconds": round(time.perf_counter() - t0, 2)}
    t0 = time.perf_counter()
    trace = synthesize(args.kind, args.layers, args.heads, args.seqs, args.steps, args.k, args.context,
                       seed=args.seed)
    seconds = time.perf_counter() - t0
    write_trace(path, trace)
    return trace, {"trace_source": "synthesized", "trace_load_seconds": round(seconds, 2)}


def time_compile() -> float:
    """First call on a tiny input: the kernel compiles once (the policy is a runtime argument)."""
    sel = np.array([[[0, 1]], [[0, 2]]], np.int16)
    t0 = time.perf_counter()
    simulate_arrays(sel, [200, 201], "lru", 2)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", default="nosa", help="synthetic trace kind (nosa has the scores 'static' needs)")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--steps", type=int, default=1024)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--context", type=int, default=8192, help="prompt length in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capacity", type=int, nargs="+", default=[64, 96], help="cache slots C to time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="print only; do not update the results file")
    args = p.parse_args(argv)

    compile_s = time_compile()
    trace, trace_info = load_trace(args)
    accesses = None
    runs = []
    for capacity in args.capacity:
        for policy in POLICIES:
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                res = simulate_cache(trace, policy, capacity)
                times.append(time.perf_counter() - t0)
            accesses = res.accesses
            best, median = min(times), statistics.median(times)
            runs.append({
                "policy": policy, "capacity": capacity, "seconds_best": round(best, 4),
                "seconds_median": round(median, 4), "accesses_per_s_best": round(accesses / best),
                "accesses_per_s_median": round(accesses / median), "hit_rate": round(res.hit_rate, 6),
                "misses": res.total_misses, "evictions": res.total_evictions,
            })
            print(f"{policy:7s} C={capacity:<4d} {accesses / best / 1e6:7.1f} M accesses/s (best of "
                  f"{args.repeats}, median {accesses / median / 1e6:.1f})  hit rate {res.hit_rate:.4f}")
    lru = [r for r in runs if r["policy"] == TARGET["policy"]]
    passed = all(r["accesses_per_s_best"] >= TARGET["accesses_per_s"] for r in lru)
    print(f"compile {compile_s:.2f} s; {accesses / 1e6:.1f} M accesses per run; lru target "
          f"{TARGET['accesses_per_s'] / 1e6:.0f} M/s: {'met' if passed else 'NOT met'}")
    report = {
        "benchmark": "bench_cache",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_name(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
            "threads_used": 1,
            # The machine may be shared: a load average well above the core count means noisy timings.
            "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],
        },
        "trace": {
            "kind": args.kind, "layers": args.layers, "kv_heads": args.heads, "seqs": args.seqs,
            "steps": args.steps, "k": args.k, "context": args.context, "seed": args.seed,
            "n_blocks": trace.n_blocks, "block_accesses": accesses, **trace_info,
        },
        "compile_seconds": round(compile_s, 3),
        "timing": "whole simulate_cache call on an in-memory trace, JIT excluded; best and median of repeats",
        "repeats": args.repeats,
        "target": TARGET, "target_met": passed,
        "runs": runs,
    }
    if not args.no_write:
        atomic_write(RESULTS, (json.dumps(report, indent=1) + "\n").encode())
        print(f"wrote {RESULTS}")
    return 0 if passed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        shutil.rmtree(NUMBA_DIR, ignore_errors=True)
