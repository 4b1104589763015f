"""The full fuzz run: 10,000 seeded mutations of valid traces (the synthetic kinds and the first steps of a bundled
real trace), each read by ``nosasim.trace.read_trace``, and 3,000 of the bundled hardware profiles, each built by
``nosasim.hardware.Profile.from_dict``. Every case must give a valid trace or profile or be refused with a
ValueError; the summary (counts per category, failures) goes to ``benchmarks/results/fuzz_traces.json``.

    python -m benchmarks.fuzz_traces [--cases 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from nosasim.atomic import atomic_write
    from nosasim.trace import fuzz

    ap = argparse.ArgumentParser(prog="python -m benchmarks.fuzz_traces", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile-cases", type=int, default=3000, help="mutated hardware profiles (default 3000)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz_traces.json"))
    a = ap.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        sources = fuzz.make_sources(tmp, str(ROOT / "traces" / "samples" / "smollm2-argparse-8k.nosatrace"))
        res = fuzz.run(sources, a.cases, seed=a.seed)
    res["profiles"] = fuzz.run_profiles(a.profile_cases, seed=a.seed)
    res["seconds"] = time.time() - t0
    res["sources"] = ["random", "infllmv2", "nosa", "smollm2-argparse-8k (24 steps, 2 layers)"]
    atomic_write(a.out, (json.dumps(res, indent=1) + "\n").encode())
    print(f"{a.cases} mutated traces and {a.profile_cases} mutated profiles in {res['seconds']:.0f} s; failures: "
          f"{len(res['failures'])} traces, {len(res['profiles']['failures'])} profiles")
    for c, counts in res["counts"].items():
        print(f"  {c:10s} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"  profiles   " + ", ".join(f"{k} {v}" for k, v in sorted(res["profiles"]["counts"].items())))
    return 1 if res["failures"] or res["profiles"]["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
