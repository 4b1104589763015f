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
    check_run(run, e2e.name)
    try:
        trace = load_source(e2e.source, traces)
    except TypeError as exc:  # synthesize() given arguments it does not take
        raise ValueError(f"measurement run {e2e.name!r}: field 'synth': {exc}") from None
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
    if hi > len(pred.step_times):
        raise ValueError(f"measurement run {e2e.name!r}: field 'steps' ends at step {hi}, but the replayed batch has "
                         f"{len(pred.step_times)} steps (not this trace's measurement)")
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


def _number(name: str, field: str, value, low: float, high: float, low_open: bool = False) -> float:
    """A measured figure: a JSON number (not a bool) that is finite and within [low, high] (``low`` excluded when
    ``low_open``)."""
    from nosasim.contract import is_real

    if not is_real(value) or not (low < value if low_open else low <= value) or value > high:
        bound = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
        raise ValueError(f"measurement run {name!r}: field '{field}' must be a finite number {bound}, got {value!r}")
    return float(value)


def check_run(run: dict, name: str) -> None:
    """Everything the comparison reads from a measured run beyond its configuration (which
    ``E2EConfig.from_fields`` checks): the timed window, the measured median and the loaded-block counts."""
    for field in ("measured", "steps"):
        if field not in run:
            raise ValueError(f"measurement run {name!r}: missing field '{field}'")
    steps = run["steps"]
    if not (isinstance(steps, list) and len(steps) == 2 and all(type(x) is int for x in steps)
            and 0 <= steps[0] < steps[1]):
        raise ValueError(f"measurement run {name!r}: field 'steps' must be [first, end) timed steps, two integers "
                         f"with 0 <= first < end, got {steps!r}")
    measured = run["measured"]
    if not isinstance(measured, dict) or "median_step_s" not in measured:
        raise ValueError(f"measurement run {name!r}: field 'measured' must be an object with 'median_step_s'")
    # A decode step takes microseconds to seconds; 1e4 s bounds what any measurement here could be.
    _number(name, "measured.median_step_s", measured["median_step_s"], 0.0, 1e4, low_open=True)
    loaded = run.get("loaded_blocks_per_step")
    if loaded is not None:
        if not isinstance(loaded, list):
            raise ValueError(f"measurement run {name!r}: field 'loaded_blocks_per_step' must be a list of counts")
        for i, x in enumerate(loaded):
            _number(name, f"loaded_blocks_per_step[{i}]", x, 0.0, 1e15)
    sha = run.get("trace_sel_sha256")
    if sha is not None and not isinstance(sha, str):
        raise ValueError(f"measurement run {name!r}: field 'trace_sel_sha256' must be a hex string, got {sha!r}")


def read_measurements(measurements: str) -> dict:
    """The measurement file as a JSON object with a non-empty list of run objects; ValueError otherwise."""
    path = resolve_path(measurements)
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"{measurements}: cannot read the measurement file ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{measurements}: not valid JSON ({type(exc).__name__}: {str(exc)[:100]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{measurements}: must be a JSON object with field 'runs', got {type(data).__name__}")
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{measurements}: missing field 'runs' (a non-empty list of measured configurations)")
    for i, run in enumerate(runs):
        if not isinstance(run, dict):
            raise ValueError(f"{measurements}: field 'runs[{i}]' must be an object, got {type(run).__name__}")
    return data


def validate(measurements: str, profile: str) -> dict:
    data = read_measurements(measurements)
    traces: dict = {}
    from tqdm import tqdm

    prof = profile if not profile.endswith(".json") else str(resolve_path(profile))
    # A bar on a terminal only (disable=None): a 45-configuration file takes minutes.
    rows = [predict_run(run, prof, traces)
            for run in tqdm(data["runs"], desc="validate", unit="config", disable=None)]
    errs = [abs(r["error"]) for r in rows]
    return {
        "measurements": measurements, "profile": profile, "device": data.get("device", {}),
        "date_measured": data.get("date"), "rows": rows,
        "median_abs_error": statistics.median(errs), "max_abs_error": max(errs), "splits": splits(rows),
    }


# Random configurations (runtime.e2e.random_configs) carry their split in their name: ``rand-t..`` may be looked
# at while the model changes, ``rand-h..`` is held out; every other configuration is hand-picked.
SPLITS = (("random, tune", "rand-t"), ("random, held out", "rand-h"))


def split_of(name: str) -> str:
    return next((label for label, prefix in SPLITS if name.startswith(prefix)), "hand-picked")


def splits(rows: list[dict]) -> dict:
    """Median and max |error| and count per split, for the splits present."""
    out = {}
    for label in ("hand-picked", *(lab for lab, _ in SPLITS)):
        errs = [abs(r["error"]) for r in rows if split_of(r["name"]) == label]
        if errs:
            out[label] = {"configurations": len(errs), "median_abs_error": statistics.median(errs),
                          "max_abs_error": max(errs)}
    return out


def to_markdown(report: dict) -> str:
    dev = report["device"]
    lines = [
        "# Prediction versus measurement", "",
        f"Measured on {dev.get('name', '?')} (driver {dev.get('driver', '?')}, torch {dev.get('torch', '?')}, "
        f"Triton {dev.get('triton', '?')}) on {report['date_measured']}; predicted with profile "
        f"`{report['profile']}` (calibrated from isolated microbenchmarks only).", "",
        f"**Median |error| {100 * report['median_abs_error']:.1f}%, max |error| {100 * report['max_abs_error']:.1f}%** "
        f"over {len(report['rows'])} configurations.", "",
        *([f"- {label}: median |error| {100 * v['median_abs_error']:.1f}%, max {100 * v['max_abs_error']:.1f}% over "
           f"{v['configurations']} configurations" for label, v in report.get("splits", {}).items()] + [""]
          if len(report.get("splits", {})) > 1 else []),
        "| configuration | variant | batch | measured ms | predicted ms | error | meas. tok/s | pred. tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['variant']} | {r['batch']} | {1e3 * r['measured_step_s']:.2f} | "
            f"{1e3 * r['predicted_step_s']:.2f} | {100 * r['error']:+.1f}% | {r['measured_tokens_per_s']:,.0f} | "
            f"{r['predicted_tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict) -> bytes:
    """The predicted-against-measured scatter as PNG bytes."""
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

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


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

    # Everything is rendered before anything is written, so a failure leaves no report without its plot.
    files = {f"{stem}.json": json.dumps(report, indent=1).encode(), f"{stem}.md": to_markdown(report).encode(),
             f"{stem}.png": plot(report)}
    try:
        for name, data in files.items():
            atomic_write(out / name, data)
    except OSError as exc:
        from nosasim.cli import os_error

        print(f"validate: error: --out {args.out}: cannot write ({os_error(exc)})", file=sys.stderr)
        return 1
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
