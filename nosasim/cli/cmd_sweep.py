"""``nosasim sweep``: evaluate many configurations of one trace; CSV of all points, Pareto front, plot."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from nosasim.cli.cmd_replay import add_config_options, config_from_args, default_trace
from nosasim.models import config_fields

LISTED = ("variant", "k", "k_q", "capacity", "policy", "batch", "microbatches", "split_attention", "kv_dtype",
          "ckey_dtype")


def _run(args) -> int:
    from nosasim.plot import plot_sweep
    from nosasim.sim import resolve
    from nosasim.atomic import atomic_folder, atomic_write, check_folder_target
    from nosasim.sweep import expand, pareto, run_sweep, write_csv
    from nosasim.trace import TraceReader, read_trace

    path = Path(args.trace) if args.trace else default_trace()
    if not path.exists():
        raise ValueError(f"TRACE: no such file {str(path)!r}")
    check_folder_target(args.out)  # refused before the work, not after it
    if args.ray is not None:
        from nosasim.ray_sweep import _ray

        _ray()  # a missing extra is one line before any work
    with TraceReader(path) as reader:
        has_scores = "qaware_score" in reader.header.arrays
    if args.k and len(args.k) > 1 and not has_scores:
        raise ValueError("--k: sweeping k needs a score trace (qaware_score) to re-select from")
    grid = {f: getattr(args, f) for f in LISTED if getattr(args, f) is not None}
    # The base config holds the unlisted fields; listed ones get a valid placeholder (their first value, or None
    # for budgets, which expand() fills per point).
    defaults = {name: default for name, default, *_ in config_fields()}
    placeholder = {f: (grid[f][0] if f in ("variant", "policy", "batch", "microbatches", "split_attention",
                                           "kv_dtype", "ckey_dtype") else None)
                   if f in grid else defaults[f] for f in LISTED}
    if placeholder["variant"] == "dense":
        # Dense as the first variant with listed fp8 element types or split attention would be refused as a
        # placeholder; expand() sets those per point (dense's to its own).
        placeholder.update(split_attention=False, kv_dtype="bf16", ckey_dtype="bf16")
    base = config_from_args(args, **placeholder)
    head = read_trace(path, 0, 1)  # budgets default to the trace's; one step is enough to read them
    resolved, _, _ = resolve(head, dataclasses.replace(base, variant="nosa" if base.variant == "dense" else base.variant))
    base = dataclasses.replace(base, model=resolved.model, k=resolved.k if base.k is None else base.k,
                               k_q=resolved.k_q if base.k_q is None and resolved.variant == "nosa" else base.k_q)
    cfgs, skipped = expand(base, grid)
    if not cfgs:
        raise ValueError(f"sweep: all {skipped} combinations are impossible budgets (k_q > k, C < k, ...)")
    workers = args.workers or min(os.cpu_count() or 1, 8)
    unreplayable: list[dict] = []
    rows = run_sweep(str(path), cfgs, workers=workers, progress=not args.quiet, skipped=unreplayable,
                     use_ray=args.ray is not None, ray_address=args.ray or None)
    if not rows:
        raise ValueError(f"sweep: none of the {len(cfgs)} points can be replayed on this trace; the first reason: "
                         f"{unreplayable[0]['skipped']}")
    out = Path(args.out)
    front = pareto(rows)
    summary = {"trace": str(path), "points": len(rows), "skipped_impossible": skipped,
               "skipped_unreplayable": len(unreplayable), "skipped_points": unreplayable,
               "fitting": sum(r["fits"] for r in rows), "pareto": front}
    # The folder appears whole or not at all, and replaces an earlier run's files rather than mixing with them.
    with atomic_folder(out) as tmp:
        write_csv(tmp / "points.csv", rows)
        write_csv(tmp / "pareto.csv", front)
        if any(r["recall"] is not None for r in rows):
            summary["pareto_recall"] = pareto(rows, x="recall", minimize_x=False)
            write_csv(tmp / "pareto_recall.csv", summary["pareto_recall"])
        atomic_write(tmp / "summary.json", json.dumps(summary, indent=1, default=str).encode())
        plot_sweep(rows, front, tmp / "sweep.png", title=f"{path.name} on {base.profile}, {base.model}",
                   recall_front=summary.get("pareto_recall"))
    print(f"{len(rows)} points ({skipped} impossible budgets and {len(unreplayable)} points the trace cannot replay "
          f"skipped, {summary['fitting']} fit); Pareto front:")
    for r in front:
        how = f" {r['kv_dtype']}" + (" ckeys-fp8" if r.get("ckey_dtype") == "fp8" else "") + (
            " split" if r["split_attention"] else "")
        print(f"  {r['variant']:<8} k={r['k']} k_q={r['k_q']} C={r['capacity']} {r['policy']:<6} batch={r['batch']:<4}"
              f" mb={r['microbatches']}{how}  {r['tokens_per_s']:10.1f} tok/s  {r['gpu_memory_bytes'] / 2**30:7.2f} GiB"
              f"  x floor {r['x_floor']:.2f}")
    print(f"wrote {out}/points.csv, pareto.csv, summary.json, sweep.png")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="evaluate a grid of budgets, policies and batches; Pareto front + plot",
                              description=__doc__)
    p.add_argument("trace", nargs="?", help="trace file (default: the bundled sample score trace)")
    add_config_options(p, as_lists=LISTED)
    p.add_argument("--out", default="sweep-out", help="output folder (default sweep-out), replaced whole when the "
                                                      "sweep finishes")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: local cores, at most 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the grid on a Ray cluster: ADDRESS ('auto', HOST:PORT or ray://HOST:PORT) of an "
                        "existing one, or none to start a local one for this sweep (the 'ray' extra: pip install "
                        "'nosasim[ray]'); the same CSV as a local run")
    p.set_defaults(func=_run)
