"""Plots of sweeps and comparisons (matplotlib, Agg backend: no display needed), written atomically as PNG, PDF or
SVG (by the file's suffix)."""

from __future__ import annotations

import io
from pathlib import Path

from nosasim.cost import CLASSES

_COLORS = {"gemm": "#4c72b0", "attention": "#dd8452", "selection": "#55a868", "cache": "#8172b3",
           "elementwise": "#937860", "h2d_wait": "#c44e52", "d2h_wait": "#da8bc3"}


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# The formats a plot is written in, by the file's suffix; dates are left out so the same plot gives the same file.
FORMATS = {".png": {}, ".pdf": {"CreationDate": None}, ".svg": {"Date": None}}


def plot_format(path: str | Path, option: str = "--plot") -> str:
    """The format of a plot file from its suffix; ValueError naming ``option`` for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{option}: {str(path)!r} must end in one of {', '.join(FORMATS)} (the format is taken from "
                         f"the suffix), got {suffix or 'no suffix'!r}")
    return suffix[1:]


def _save(fig, path: str | Path) -> None:
    from nosasim.atomic import atomic_write

    fmt = plot_format(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=120, bbox_inches="tight", metadata=FORMATS["." + fmt])
    atomic_write(path, buf.getvalue())


# Sweep points: the colour is the cache policy, the marker the variant, the size the batch; Belady's points are
# hollow (an offline bound, never on the front).
_POLICY_COLORS = {"dense": "#8c8c8c", "prev": "#4c72b0", "lru": "#dd8452", "lfu": "#55a868", "static": "#8172b3",
                  "belady": "#c44e52"}
_VARIANT_MARKERS = {"dense": "s", "infllmv2": "^", "nosa": "o", "trace": "D"}


def _policy(r: dict) -> str:
    return "dense" if r["variant"] == "dense" else r["policy"]


def plot_sweep(rows: list[dict], front: list[dict], path: str | Path, title: str = "",
               recall_front: list[dict] | None = None) -> None:
    """Tokens/s against GPU memory for every fitting point, with the Pareto front of the online configurations
    (each front point labelled with its capacity and batch); on a score trace (rows carry ``recall``) a second panel
    shows tokens/s against attention-mass recall and its front. Colour: policy; marker: variant; size: batch."""
    from matplotlib.lines import Line2D

    plt = _figure()
    with_recall = recall_front is not None and any(r.get("recall") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if with_recall else 1, figsize=(13 if with_recall else 8, 5), squeeze=False)
    fits = [r for r in rows if r["fits"]]
    batches = [r["batch"] for r in fits] or [1]
    lo, hi = min(batches), max(batches)
    size = (lambda b: 36.0) if lo == hi else (lambda b: 12.0 + 60.0 * (b - lo) / (hi - lo))
    panels = [(axes[0][0], "gpu_memory_bytes", 2**30, "GPU memory (GiB)", front)]
    if with_recall:
        panels.append((axes[0][1], "recall", 1.0, "attention-mass recall (mean)", recall_front))
    for ax, key, scale, label, pts_front in panels:
        for (variant, policy) in sorted({(r["variant"], _policy(r)) for r in fits}):
            pts = [r for r in fits if r["variant"] == variant and _policy(r) == policy and r.get(key) is not None]
            color = _POLICY_COLORS.get(policy, "black")
            ax.scatter([r[key] / scale for r in pts], [r["tokens_per_s"] for r in pts],
                       s=[size(r["batch"]) for r in pts], marker=_VARIANT_MARKERS.get(variant, "x"), alpha=0.7,
                       facecolors="none" if policy == "belady" else color, edgecolors=color)
        if pts_front:
            ax.plot([r[key] / scale for r in pts_front], [r["tokens_per_s"] for r in pts_front], "k-", lw=1.0)
            for r in pts_front:
                what = "dense" if r["variant"] == "dense" else f"{r['variant']} C={r['capacity']}"
                ax.annotate(f"{what} b={r['batch']}", (r[key] / scale, r["tokens_per_s"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("predicted tokens/s")
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.grid(alpha=0.3)
    present = {(r["variant"], _policy(r)) for r in fits}
    handles = [Line2D([], [], ls="", marker=_VARIANT_MARKERS.get(v, "x"), color="grey", label=v)
               for v in sorted({v for v, _ in present})]
    handles += [Line2D([], [], ls="", marker="o", label=p + (" (offline bound)" if p == "belady" else ""),
                       markerfacecolor="none" if p == "belady" else _POLICY_COLORS.get(p, "black"),
                       markeredgecolor=_POLICY_COLORS.get(p, "black")) for p in sorted({p for _, p in present} - {"dense"})]
    handles.append(Line2D([], [], color="k", lw=1.0, label="Pareto front (online policies)"))
    if lo != hi:
        handles.append(Line2D([], [], ls="", label=f"marker size: batch {lo}-{hi}"))
    axes[0][-1].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(title or "sweep: throughput vs GPU memory")
    _save(fig, path)
    plt.close(fig)


def plot_compare(results: list[tuple[str, object]], path: str | Path, title: str = "") -> None:
    """Left: tokens/s per variant. Right: each variant's median step split into breakdown classes."""
    plt = _figure()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [n for n, _ in results]
    a.bar(names, [p.tokens_per_s for _, p in results], color=["#8c8c8c", "#dd8452", "#4c72b0"][:len(names)])
    for i, (_, p) in enumerate(results):
        a.text(i, p.tokens_per_s, f"{p.tokens_per_s:,.0f}", ha="center", va="bottom", fontsize=8)
    a.set_ylabel("predicted tokens/s")
    a.grid(axis="y", alpha=0.3)
    bottom = [0.0] * len(results)
    for c in CLASSES:
        vals = [p.breakdown[c] * 1e3 for _, p in results]
        b.bar(names, vals, bottom=bottom, color=_COLORS[c], label=c)
        bottom = [x + y for x, y in zip(bottom, vals)]
    b.set_ylabel("median step time (ms)")
    b.legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)
