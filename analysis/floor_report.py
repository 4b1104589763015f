"""Measured decode steps against their floor (bytes and FLOPs at the hardware's peaks, ``nosasim.floor``).

For every measured run of the given e2e files, the floor of the same assembled batch over the same timed steps
(the median of the per-step floors), from a calibrated profile's peaks; ``x_floor = measured / floor``. Writes the
floor grid (``benchmarks/results/floor-<device>.json``) and, from the runs named ``equal-*`` plus the dense and
offloaded long-context runs, the equal-memory comparison (``analysis/results/equal-memory-<device>.json``).

    python -m analysis.floor_report analysis/results/e2e-h200-run1.json analysis/results/e2e-h200-run2.json \
        --profile h200-pcie5 --device h200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from nosasim.experiment import ROOT, E2EConfig, load_source, replay_batch, resolve_path



def floor_rows(e2e_paths: list[str], profile: str) -> list[dict]:
    from nosasim.sim import predict, resolve, run_cache

    traces: dict = {}
    rows = []
    for path in e2e_paths:
        data = json.loads(resolve_path(path).read_text())
        for run in data["runs"]:
            e = E2EConfig.from_fields(run)
            trace = load_source(e.source, traces)
            cfg, model, prof = resolve(trace, e.replay_config(profile))
            if cfg.offloaded:
                trace = replay_batch(trace, e)
            res = run_cache(trace, cfg)
            pred = predict(trace, cfg, check_memory=False, cache_result=res, resolved=(model, prof))
            lo, hi = run["steps"]
            f = pred.floor_steps
            window = np.arange(lo, min(hi, len(f.floor_s)))
            terms = f.at(window)
            meas = float(run["measured"]["median_step_s"])
            ctx = int(np.asarray(trace.context_len)[lo:hi].max())
            b = e.budget
            rows.append({
                "name": e.name, "file": Path(path).name, "variant": e.variant, "batch": e.batch, "context": ctx,
                "k": b.k if b else None, "capacity": b.capacity if b else None, "policy": e.policy if b else None,
                "microbatches": e.microbatches, "kv_dtype": e.kv_dtype, "ckey_dtype": e.ckey_dtype,
                "split_attention": e.split_attention,
                "selection": (run.get("runtime") or {}).get("selection"),
                "measured_s": meas, "floor_s": terms["floor_s"], "x_floor": meas / terms["floor_s"],
                "bound": terms["bound"], "floor_terms": {k: terms[k] for k in ("hbm_s", "flop_s", "link_s")},
                "overlapped": terms["overlapped"], "tokens_per_s": e.batch / meas,
                "loaded_blocks_per_step": (float(np.mean(run["loaded_blocks_per_step"]))
                                           if run.get("loaded_blocks_per_step") else None),
            })
    return rows


def equal_memory(rows: list[dict], link_Bps: float) -> list[dict]:
    """Long-context rows (64K and 128K) of dense at its largest measured batch and every offloaded run, with the
    link's cap for NOSA's traffic: blocks per sequence-step over the link's peak."""
    out = []
    for r in rows:
        if r["context"] < 60000:
            continue
        row = {k: r[k] for k in ("name", "file", "context", "variant", "batch", "capacity", "policy",
                                 "microbatches", "kv_dtype", "ckey_dtype", "selection", "tokens_per_s")}
        if r["loaded_blocks_per_step"]:
            block = 2 * 64 * 128 * (1 if r["kv_dtype"] == "fp8" else 2)
            per_seq = r["loaded_blocks_per_step"] / r["batch"]
            row["loaded_blocks_per_sequence_step"] = per_seq
            row["link_cap_tokens_per_s"] = link_Bps / (per_seq * block)
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.floor_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("measurements", nargs="+", help="e2e measurement JSON files written by runtime.e2e")
    ap.add_argument("--profile", required=True, help="calibrated profile (a bundled name or a JSON path)")
    ap.add_argument("--device", required=True, help="device label for the output names (h200)")
    args = ap.parse_args(argv)
    from nosasim.atomic import atomic_write
    from nosasim.hardware import load_profile

    try:
        rows = floor_rows(args.measurements, args.profile)
        prof = load_profile(args.profile)
    except ValueError as exc:
        print(f"floor_report: error: {exc}", file=sys.stderr)
        return 2
    env = json.loads(resolve_path(args.measurements[0]).read_text()).get("env", {})
    env = {**env, "profile": prof.name, "hbm_Bps": prof.hbm_Bps, "matmul_flops": prof.matmul_flops,
           "h2d_peak_Bps": prof.h2d.peak_Bps, "measurements": [Path(p).name for p in args.measurements]}
    floor = {"env": env, "runs": rows}
    atomic_write(ROOT / "benchmarks" / "results" / f"floor-{args.device}.json",
                 (json.dumps(floor, indent=1) + "\n").encode())
    eq = {"env": env, "rows": equal_memory(rows, prof.h2d.peak_Bps)}
    atomic_write(ROOT / "analysis" / "results" / f"equal-memory-{args.device}.json",
                 (json.dumps(eq, indent=1) + "\n").encode())
    print("run                                      file              ctx  meas ms floor ms x floor bound")
    for r in rows:
        print(f"{r['name'][:40]:40s} {r['file'][-12:]:>12s} {r['context']:7d} {1e3 * r['measured_s']:8.2f} "
              f"{1e3 * r['floor_s']:8.2f} {r['x_floor']:7.2f} {r['bound']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
