"""``nosasim trace synth`` end to end (synthesis and write), this checkout against an earlier commit, one machine.

The case is the long-context synthesis users reach 64K through: InfLLM-V2 scores, 32 layers x 8 KV heads x 4
sequences x 512 steps at a 64K-token context (a 0.9 GB score trace). Each side runs the CLI in its own process
(this checkout, and a ``git worktree`` of ``--base`` with its own default generator), one after the other, so the
ratio is what the code changed. Each output trace's adjacent overlap is read back (``nosasim trace info``).

    python benchmarks/bench_synth.py --base 936c1db --out benchmarks/results/bench_synth.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASE = ["--kind", "infllmv2", "--layers", "32", "--heads", "8", "--seqs", "4", "--steps", "512",
        "--context", "65536", "--seed", "0"]


def _time_synth(tree: Path, out: Path, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "nosasim", "trace", "synth", *CASE, *extra, "-o", str(out)],
                       cwd=tree, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"synth in {tree} failed: {p.stderr[-2000:]}")
    info = subprocess.run([sys.executable, "-m", "nosasim", "trace", "info", str(out), "--json"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True)
    s = json.loads(info.stdout)
    return {"seconds": secs, "bytes": out.stat().st_size, "mean_adjacent_overlap": s["overlap_mean"],
            "shape": s["shape"], "recorder": s["provenance"].get("recorder")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the earlier commit to compare with")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_synth.json"))
    a = ap.parse_args(argv)
    res = {"env": {"python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count(),
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
           "case": CASE, "base": a.base, "runs": {}}
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), a.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            res["runs"]["base"] = _time_synth(base, Path(d) / "base.nosatrace", [])
            (Path(d) / "base.nosatrace").unlink()
            res["runs"]["this"] = _time_synth(ROOT, Path(d) / "this.nosatrace", [])
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    res["speedup"] = res["runs"]["base"]["seconds"] / res["runs"]["this"]["seconds"]
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    for k, r in res["runs"].items():
        print(f"{k:5s} {r['seconds']:7.1f} s  {r['bytes'] / 1e6:7.1f} MB  overlap {r['mean_adjacent_overlap']}")
    print(f"speedup {res['speedup']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
