"""Prediction versus measurement: hold the simulator to the GPU runtime's end-to-end step times.

Input: a measurement file written on the GPU by ``runtime.e2e`` (``analysis/results/e2e-*.json``) and a hardware
profile calibrated from *isolated* microbenchmarks (``runtime.calibrate``). The simulator never sees the
end-to-end numbers except to be scored against them.

For each measured configuration the simulator replays the same trace with the same budgets, batch assembly and
model shape, and predicts the median decode step time. The report gives ``(pred - meas) / meas`` per
configuration, its median and maximum absolute value, and the predicted breakdown beside the measurement.

    python -m analysis.validate analysis/results/e2e-h100.json --profile analysis/results/profile-h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from nosasim.experiment import ROOT, E2EConfig, fingerprint, load_source, replay_batch, resolve_path


def predict_run(run: dict, profile: str, traces: dict) -> dict:
    """Simulator prediction for one measured run (same trace, budgets, batch, model, policy)."""
    from nosasim.batch import per_layer_seq
    from nosasim.sim import predict, resolve, run_cache

    e2e = E2EConfig.from_fields(run)
    for field in ("measured", "steps"):
        if field not in run:
            raise ValueError(f"measurement run {e2e.name!r}: missing field '{field}'")
    trace = load_source(e2e.source, traces)
    want = run.get("trace_sel_sha256")
    if want and fingerprint(trace) != want:
        raise ValueError(f"run {e2e.name!r}: the trace here is not the one the GPU decoded (sha256 differs)")
    cfg, model, prof = resolve(trace, e2e.replay_config(profile))
    if cfg.offloaded:
        trace = replay_batch(trace, e2e)  # what the GPU replayed: re-selected, assembled, every slot cold
    res = run_cache(trace, cfg)
    pred = predict(trace, cfg, check_memory=False, cache_result=res, resolved=(model, prof))
    # The runtime timed steps [lo, hi) of the assembled batch (after warm-up); compare the same window.
    lo, hi = run["steps"]
    step_s = float(np.median(pred.step_times[lo:hi]))
    meas = float(run["measured"]["median_step_s"])
    pred_loaded = None
    if res is not None:  # the simulator's misses over the same window: must equal the runtime's loaded blocks
        per_step = per_layer_seq(res.misses, model.layers, model.kv_heads).sum(axis=(1, 2))
        pred_loaded = float(per_step[lo:hi].mean())
    b = e2e.budget
    return {
        "name": e2e.name, "variant": e2e.variant, "batch": e2e.batch, "model": e2e.model,
        "k": b.k if b else None, "k_q": b.k_q if b else None, "capacity": b.capacity if b else None,
        "policy": e2e.policy, "measured_step_s": meas, "predicted_step_s": step_s,
        "error": (step_s - meas) / meas,
        "measured_tokens_per_s": e2e.batch / meas, "predicted_tokens_per_s": e2e.batch / step_s,
        "predicted_breakdown": pred.breakdown, "predicted_hit_rate": pred.hit_rate,
        "measured_loaded_blocks_per_step": (float(np.mean(run["loaded_blocks_per_step"]))
                                            if run.get("loaded_blocks_per_step") else None),
        "predicted_loaded_blocks_per_step": pred_loaded,
    }


def validate(measurements: str, profile: str) -> dict:
    data = json.loads(resolve_path(measurements).read_text())
    if "runs" not in data or not data["runs"]:
        raise ValueError(f"{measurements}: missing field 'runs' (a non-empty list of measured configurations)")
    traces: dict = {}
    rows = [predict_run(run, profile if not profile.endswith(".json") else str(resolve_path(profile)), traces)
            for run in data["runs"]]
    errs = [abs(r["error"]) for r in rows]
    return {
        "measurements": measurements, "profile": profile, "device": data.get("device", {}),
        "date_measured": data.get("date"), "rows": rows,
        "median_abs_error": statistics.median(errs), "max_abs_error": max(errs),
    }


def to_markdown(report: dict) -> str:
    dev = report["device"]
    lines = [
        "# Prediction versus measurement", "",
        f"Measured on {dev.get('name', '?')} (driver {dev.get('driver', '?')}, torch {dev.get('torch', '?')}, "
        f"Triton {dev.get('triton', '?')}) on {report['date_measured']}; predicted with profile "
        f"`{report['profile']}` (calibrated from isolated microbenchmarks only).", "",
        f"**Median |error| {100 * report['median_abs_error']:.1f}%, max |error| {100 * report['max_abs_error']:.1f}%** "
        f"over {len(report['rows'])} configurations.", "",
        "| configuration | variant | batch | measured ms | predicted ms | error | meas. tok/s | pred. tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['variant']} | {r['batch']} | {1e3 * r['measured_step_s']:.2f} | "
            f"{1e3 * r['predicted_step_s']:.2f} | {100 * r['error']:+.1f}% | {r['measured_tokens_per_s']:,.0f} | "
            f"{r['predicted_tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for variant, marker in (("dense", "s"), ("infllmv2", "^"), ("nosa", "o"), ("trace", "D")):
        pts = [r for r in rows if r["variant"] == variant]
        if pts:
            ax.scatter([1e3 * r["measured_step_s"] for r in pts], [1e3 * r["predicted_step_s"] for r in pts],
                       marker=marker, label=variant)
    hi = 1.1 * max(1e3 * max(r["measured_step_s"], r["predicted_step_s"]) for r in rows)
    ax.plot([0, hi], [0, hi], "k--", lw=1, label="exact")
    ax.fill_between([0, hi], [0, 0.9 * hi], [0, 1.1 * hi], color="grey", alpha=0.15, label="±10%")
    ax.set_xlabel("measured median step (ms)")
    ax.set_ylabel("predicted median step (ms)")
    ax.set_title(f"median |error| {100 * report['median_abs_error']:.1f}%, max {100 * report['max_abs_error']:.1f}%")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    import io

    from nosasim.atomic import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.validate", description=__doc__.split("\n\n")[0])
    ap.add_argument("measurements", help="e2e measurement JSON written by runtime.e2e on the GPU")
    ap.add_argument("--profile", required=True, help="calibrated hardware profile (name or JSON path)")
    ap.add_argument("--out", default=str(ROOT / "analysis" / "results"), help="folder for the report")
    args = ap.parse_args(argv)
    try:
        report = validate(args.measurements, args.profile)
    except ValueError as exc:
        print(f"validate: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    stem = Path(args.measurements).stem.replace("e2e-", "validation-")
    from nosasim.atomic import atomic_write

    atomic_write(out / f"{stem}.json", json.dumps(report, indent=1).encode())
    atomic_write(out / f"{stem}.md", to_markdown(report).encode())
    plot(report, out / f"{stem}.png")
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
