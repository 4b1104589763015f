"""``nosasim compare``: predicted tokens/s of dense, InfLLM-V2 offload and NOSA offload for one score trace.

Each variant runs at the requested batch; one that does not fit the GPU there is shown at its own largest batch
instead (marked), since dense attention's KV usually caps its batch long before the offloaded variants'.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from nosasim.cli.cmd_replay import default_trace, gib, load_trace
from nosasim.models import ReplayConfig


def compare(trace, profile: str, model: str | None, batch: int, k: int, k_q: int, policy: str, capacity: int | None,
            microbatches: int):
    """[(label, Prediction, note)] for dense, infllmv2 and nosa on the same trace, profile and model."""
    from nosasim.sim import predict, resolve

    if trace.qaware_score is None or trace.agnostic_score is None:
        raise ValueError("TRACE: compare needs a score trace (qaware_score and agnostic_score) to select for both "
                         "InfLLM-V2 and NOSA")
    out = []
    for variant, kq in (("dense", None), ("infllmv2", k), ("nosa", k_q)):
        cfg = ReplayConfig(profile=profile, model=model, variant=variant, batch=batch, policy=policy,
                           microbatches=microbatches, k=None if variant == "dense" else k, k_q=kq,
                           capacity=None if variant == "dense" else capacity)
        cfg, m, p = resolve(trace, cfg)
        note = ""
        try:
            pred = predict(trace, cfg, resolved=(m, p))
        except ValueError as exc:
            if "GPU memory" not in str(exc):
                raise
            # Dense caps its batch by KV memory: show it at the largest batch that fits instead.
            probe = predict(trace, dataclasses.replace(cfg, batch=1, microbatches=1), resolved=(m, p),
                            check_memory=False)
            if probe.max_batch < 1:
                raise
            fit = probe.max_batch
            pred = predict(trace, dataclasses.replace(cfg, batch=fit, microbatches=min(microbatches, fit)),
                           resolved=(m, p))
            note = f"batch {batch} does not fit; at its max batch {pred.config['batch']}"
        out.append((variant, pred, note))
    return out


def _run(args) -> int:
    from nosasim.plot import plot_compare, plot_format

    plot_format(args.plot)  # before any work: a plot it cannot write is refused at once
    trace = load_trace(args.trace)
    results = compare(trace, args.profile, args.model, args.batch, args.k, args.kq, args.policy, args.capacity,
                      args.microbatches)
    if args.json:
        from nosasim.provenance import provenance

        prov = provenance(args.trace or default_trace(), results[0][1].config["profile"])
        json.dump({v: dict(p.to_json(), note=n, provenance=prov) for v, p, n in results}, sys.stdout, indent=1)
        print()
    else:
        first = results[0][1].config
        print(f"{trace.header.provenance.get('source', '') or 'trace'}: {trace.steps} steps, {trace.seqs} seqs; "
              f"profile {first['profile']}, model {first['model']}")
        print(f"{'variant':<10}{'batch':>6}{'tokens/s':>11}{'step ms':>9}{'floor ms':>9}{'x floor':>8}"
              f"{'hit rate':>9}{'transfer':>9}{'H2D MiB':>9}{'GPU mem':>11}  note")
        for v, p, n in results:
            hr = "-" if p.hit_rate is None else f"{p.hit_rate:.3f}"
            print(f"{v:<10}{p.config['batch']:>6}{p.tokens_per_s:>11.1f}{p.step_time_s * 1e3:>9.2f}"
                  f"{p.floor_s * 1e3:>9.2f}{p.x_floor:>8.2f}{hr:>9}"
                  f"{100 * p.transfer_share:>8.1f}%{p.h2d_bytes_per_step / 2**20:>9.1f}{gib(p.gpu_memory_bytes):>11}"
                  f"  {n}")
        nosa, inf = results[2][1], results[1][1]
        print(f"NOSA / InfLLM-V2 offload: {nosa.tokens_per_s / inf.tokens_per_s:.2f}x")
    plot_compare([(v, p) for v, p, _ in results], args.plot,
                 title=f"{results[0][1].config['model']} on {results[0][1].config['profile']}")
    print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("compare", help="dense vs InfLLM-V2 offload vs NOSA offload on one score trace",
                              description=__doc__)
    p.add_argument("trace", nargs="?", help="score trace (default: the bundled sample)")
    p.add_argument("--profile", default="h100-pcie5", help="hardware profile (default h100-pcie5)")
    p.add_argument("--model", default="llama3-8b", help="model shape (default llama3-8b; the trace is retargeted)")
    p.add_argument("--batch", type=int, default=64, help="sequences per batch (default 64)")
    p.add_argument("--k", type=int, default=64, help="selected blocks per row, tail included (default 64)")
    p.add_argument("--kq", type=int, default=33, help="NOSA's query-aware blocks incl. sink + window (default 33)")
    p.add_argument("--capacity", type=int, default=None, help="cache slots per row (default k - 1)")
    p.add_argument("--policy", default="prev", help="cache policy (default prev, NOSI's rule)")
    p.add_argument("--microbatches", type=int, default=1, help="micro-batches (default 1)")
    p.add_argument("--plot", default="nosasim-compare.png", help="plot to write, PNG, PDF or SVG by its suffix (default nosasim-compare.png)")
    p.add_argument("--json", action="store_true", help="print one JSON object per variant")
    p.set_defaults(func=_run)
