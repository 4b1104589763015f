"""``nosasim cache``: replay a trace through the GPU block cache and report hits, misses and write-backs."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from nosasim.cache import POLICIES

DESCRIPTION = """\
Replay a selection trace through a GPU cache of complete KV blocks, one cache per (layer, KV head,
sequence), and count per layer: hits (selected block already on the GPU), misses (one block of K and V
copied host -> device), write-backs (a tail block that just completed, copied device -> host once) and
evictions. The partial tail block is always on the GPU and never counts. The first step starts cold.
Rules: docs/cache-semantics.md.

policies (what is kept when more than C complete blocks are candidates; ties evict the lower id):
""" + "\n".join(
    textwrap.fill(text, width=100, initial_indent=f"  {name:8s}", subsequent_indent=" " * 10)
    for name, text in POLICIES.items()
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cache", help="replay a trace through the GPU block cache (hits, misses, write-backs per layer)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="trace file (format v1, see docs/trace-format.md)")
    p.add_argument("--policy", "-p", choices=sorted(POLICIES), default="lru",
                   help="eviction policy (default: %(default)s)")
    p.add_argument("--capacity", "-C", type=int, default=None, metavar="C",
                   help="GPU slots for complete blocks per (layer, KV head, seq); must be >= the largest "
                        "selection (default: k - 1, the most complete blocks a budget-rule selection holds; k for "
                        "an imported trace)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (totals hits, misses, writebacks, hit_rate, per-layer lists) "
                        "instead of a table")
    p.add_argument("--progress", action="store_true", help="show a progress bar over trace chunks on stderr")
    p.set_defaults(func=run)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _rate(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(summary: dict) -> str:
    """The human-readable report: one line per layer, then the totals."""
    per = summary["per_layer"]
    head = (f"policy {summary['policy']}, C={summary['capacity']} slots, {summary['steps']} steps, "
            f"{summary['layers']} layers x {summary['kv_heads']} KV heads x {summary['seqs']} seqs, "
            f"block {summary['block_size']} tokens")
    cols = ("layer", "hits", "misses", "writebacks", "evictions", "hit_rate")
    rows = [[str(layer), *(str(per[c][layer]) for c in cols[1:5]), _rate(per["hit_rate"][layer])]
            for layer in range(summary["layers"])]
    rows.append(["total", *(str(summary[c]) for c in cols[1:5]), _rate(summary["hit_rate"])])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(cell.rjust(w) for cell, w in zip(cells, widths))  # noqa: E731
    out = [head, "", line(cols), line(["-" * w for w in widths])]
    out += [line(r) for r in rows[:-1]] + [line(["-" * w for w in widths]), line(rows[-1])]
    if summary.get("block_bytes"):
        out += ["", f"host->device {_fmt_bytes(summary['h2d_bytes'])}, device->host "
                    f"{_fmt_bytes(summary['d2h_bytes'])} ({summary['block_bytes']} bytes per block of K+V)"]
    return "\n".join(out)


def run(args) -> int:
    from nosasim.cache import simulate_cache

    result = simulate_cache(args.file, policy=args.policy, capacity=args.capacity, progress=args.progress)
    summary = result.to_json()
    if args.json:
        from nosasim.provenance import provenance

        json.dump(dict(summary, provenance=provenance(args.file)), sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_table(summary))
    return 0
