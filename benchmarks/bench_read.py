"""Reading speed of the bundled traces: this tree's reader against an earlier commit's, side by side.

The reader checks every invariant of the format before it returns a trace (docs/trace-format.md); this measures
what those checks cost. Each round reads every bundled trace with both readers, each in a fresh interpreter (so
neither warms the other's caches) and in alternating order; the figure is the ratio of the medians. The default
baseline is the last commit before the reader enforced the invariants.

    python -m benchmarks.bench_read [--baseline COMMIT] [--rounds 7] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "4761024"  # the reader before issue 15's checks
TRACES = ("traces/samples/smollm2-argparse-8k.nosatrace", "traces/samples/smollm2-topics-8k.nosatrace")

# Run in a fresh interpreter whose nosasim is the tree on PYTHONPATH: the best of `repeat` reads of each trace.
PROBE = """
import json, sys, time
import nosasim
from nosasim.trace import read_trace
out = {"nosasim": nosasim.__file__}
for path in sys.argv[2:]:
    best = float("inf")
    for _ in range(int(sys.argv[1])):
        t0 = time.perf_counter()
        read_trace(path)
        best = min(best, time.perf_counter() - t0)
    out[path] = best
print(json.dumps(out))
"""


def _probe(tree: Path, repeat: int) -> dict:
    import os

    env = dict(os.environ, PYTHONPATH=str(tree))
    paths = [str(ROOT / t) for t in TRACES]
    res = subprocess.run([sys.executable, "-c", PROBE, str(repeat), *paths], env=env, cwd=tree, check=True,
                         capture_output=True, text=True)
    out = json.loads(res.stdout)
    if not out.pop("nosasim").startswith(str(tree)):
        raise RuntimeError(f"the probe did not import nosasim from {tree}")
    return {Path(p).name: s for p, s in out.items()}


def main(argv=None) -> int:
    from nosasim.atomic import atomic_write

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_read", description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default=BASELINE, help=f"commit whose reader is the baseline (default {BASELINE})")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of both readers, alternating order (default 7)")
    ap.add_argument("--repeat", type=int, default=5, help="reads of each trace per round; the best counts (5)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_read.json"))
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        base.mkdir()
        # Only the package is needed: the archive of the baseline's nosasim/ folder.
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.baseline, "nosasim"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        times = {"current": [], "baseline": []}
        for r in range(a.rounds):
            order = ("current", "baseline") if r % 2 == 0 else ("baseline", "current")
            for who in order:
                times[who].append(_probe(ROOT if who == "current" else base, a.repeat))
            print(f"round {r + 1}/{a.rounds}", file=sys.stderr)
    rows = []
    for name in (Path(t).name for t in TRACES):
        cur = statistics.median(t[name] for t in times["current"])
        old = statistics.median(t[name] for t in times["baseline"])
        rows.append({"trace": name, "baseline_s": old, "current_s": cur, "ratio": cur / old})
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip()
    res = {"date": time.strftime("%Y-%m-%d"), "baseline": a.baseline, "current": commit or "?",
           "python": sys.version.split()[0], "rounds": a.rounds, "repeat": a.repeat, "rows": rows,
           "what": "median over rounds of the best of `repeat` read_trace calls per trace, each reader in its own "
                   "interpreter, order alternating"}
    atomic_write(a.out, (json.dumps(res, indent=1) + "\n").encode())
    print("| trace | baseline ms | current ms | current / baseline |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['trace']} | {1e3 * r['baseline_s']:.1f} | {1e3 * r['current_s']:.1f} | {r['ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
