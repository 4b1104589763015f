"""Sweeps: many configurations of one trace through the analytic path, in parallel, with a Pareto front.

Points are the Cartesian product of the listed values; impossible ones are skipped and counted, not silently
dropped: budgets the contract refuses (``k_q > k``, ``C < k - 1``, more micro-batches than sequences) when the grid
is expanded, and, when they are evaluated, points the trace cannot replay (a batch that needs more step-shifted
copies than the trace has steps, a capacity below the trace's largest selection, budgets it has no scores for). Work is grouped by the policy engine's inputs
(variant, k, k_q, C, policy): a worker runs the cache once per group and then every batch and micro-batch count
from that one result. A point whose footprint does not fit the GPU is kept with ``fits = False`` and left off the
front. When the trace has true attention mass, each point also gets the attention-mass recall of its selections
(``nosasim.quality``), and a second front of tokens/s against recall.
"""

from __future__ import annotations

import dataclasses
import itertools
from multiprocessing import get_context
from pathlib import Path

from nosasim.atomic import atomic_write
from nosasim.contract import ONLINE_POLICIES
from nosasim.cost import CLASSES
from nosasim.memory import usable_bytes
from nosasim.models import ReplayConfig

GRID_FIELDS = ("variant", "k", "k_q", "capacity", "policy", "batch", "microbatches", "split_attention", "kv_dtype",
               "ckey_dtype")
COLUMNS = ("variant", "k", "k_q", "capacity", "policy", "batch", "microbatches", "split_attention", "kv_dtype",
           "ckey_dtype",
           "fits", "step_time_s",
           "floor_s", "x_floor", "tokens_per_s", "hit_rate", "h2d_bytes_per_step", "transfer_share", "gpu_memory_bytes", "max_batch",
           "host_kv_bytes", "host_fits", "recall", *(f"t_{c}" for c in CLASSES))


def expand(base: ReplayConfig, grid: dict[str, list]) -> tuple[list[ReplayConfig], int]:
    """Every valid configuration of the grid (unlisted fields from ``base``) and how many were impossible."""
    # An unlisted capacity is each point's own default (k - 1 of its k), not the base's value for the base's k.
    values = [grid.get(f) or [None if f == "capacity" else getattr(base, f)] for f in GRID_FIELDS]
    out, skipped, seen = [], 0, set()
    for combo in itertools.product(*values):
        change = dict(zip(GRID_FIELDS, combo))
        if change["variant"] == "dense":  # budgets and cache do not apply: one point per batch / micro-batch
            change.update(k=None, k_q=None, capacity=None, policy=base.policy, split_attention=False, kv_dtype="bf16",
                          ckey_dtype="bf16")
        elif change["variant"] == "infllmv2":
            change["k_q"] = None  # infllmv2's k_q is k; a listed or default k_q belongs to nosa points
        try:
            cfg = dataclasses.replace(base, **change)
        except ValueError:
            skipped += 1
            continue
        key = tuple(getattr(cfg, f) for f in GRID_FIELDS)
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out, skipped


def _recall(sel_trace) -> float | None:
    """Hook for selection quality: mean attention-mass recall when the trace carries ``attn_mass``."""
    if sel_trace is None or getattr(sel_trace, "attn_mass", None) is None:
        return None
    from nosasim.quality import recall_summary

    return recall_summary(sel_trace).mean


_TRACE = None
_SELECTIONS: dict = {}


def _init_worker(trace_path: str):
    global _TRACE
    from nosasim.trace import read_trace

    _TRACE = read_trace(trace_path)


def _skipped(cfg: ReplayConfig, why: str) -> dict:
    return {**{f: getattr(cfg, f) for f in GRID_FIELDS}, "skipped": why}


def run_group(cfgs: list[ReplayConfig], trace=None) -> list[dict]:
    """All points that share one cache configuration: one policy-engine run, then the analytic path per point.
    A point the trace cannot replay comes back as ``{grid fields..., "skipped": reason}``."""
    from nosasim.sim import predict, resolve, selection_trace

    trace = trace if trace is not None else _TRACE
    cfg0, model, profile = resolve(trace, cfgs[0])
    cache = sel_trace = None
    if cfg0.offloaded:
        from nosasim.cache.simulate import simulate_cache

        key = (id(trace), cfg0.k, cfg0.k_q, cfg0.sink, cfg0.window)
        try:
            if key not in _SELECTIONS:  # re-selection is shared by every capacity and policy of one budget
                _SELECTIONS.clear()
                _SELECTIONS[key] = selection_trace(trace, cfg0)
            sel_trace = _SELECTIONS[key]
            cache = simulate_cache(sel_trace, cfg0.policy, cfg0.capacity)
        except ValueError as exc:  # no scores for these budgets, or C below the largest selection
            return [_skipped(cfg, str(exc)) for cfg in cfgs]
    recall = _recall(sel_trace)
    rows = []
    for cfg in cfgs:
        cfg = dataclasses.replace(cfg, model=cfg0.model, k=cfg0.k, k_q=cfg0.k_q, capacity=cfg0.capacity,
                                  sink=cfg0.sink, window=cfg0.window)
        try:
            pred = predict(trace, cfg, cache_result=cache, check_memory=False, resolved=(model, profile))
        except ValueError as exc:  # e.g. a batch longer than the trace can assemble
            rows.append(_skipped(cfg, str(exc)))
            continue
        row = {f: getattr(cfg, f) for f in GRID_FIELDS}
        row.update(fits=pred.gpu_memory_bytes <= usable_bytes(profile), step_time_s=pred.step_time_s,
                   floor_s=pred.floor_s, x_floor=pred.x_floor,
                   tokens_per_s=pred.tokens_per_s, hit_rate=pred.hit_rate, h2d_bytes_per_step=pred.h2d_bytes_per_step,
                   transfer_share=pred.transfer_share, gpu_memory_bytes=pred.gpu_memory_bytes,
                   max_batch=pred.max_batch, host_kv_bytes=pred.host_kv_bytes, host_fits=pred.host_fits,
                   recall=recall)
        row.update({f"t_{c}": v for c, v in pred.breakdown.items()})
        rows.append(row)
    return rows


def groups(cfgs: list[ReplayConfig]) -> list[list[ReplayConfig]]:
    by_key: dict[tuple, list[ReplayConfig]] = {}
    # Sorted by budget so consecutive groups of one worker reuse its last re-selection.
    for cfg in sorted(cfgs, key=lambda c: (c.variant, str(c.k), str(c.k_q), c.policy, str(c.capacity))):
        by_key.setdefault((cfg.variant, cfg.k, cfg.k_q, cfg.capacity, cfg.policy), []).append(cfg)
    return list(by_key.values())


def run_sweep(trace_path: str, cfgs: list[ReplayConfig], workers: int = 1, progress: bool = True,
              skipped: list | None = None, ray_address: str | None = None, use_ray: bool = False) -> list[dict]:
    """Evaluate every configuration; ``workers`` > 1 spreads cache groups over local processes, ``use_ray`` over
    a Ray cluster (``ray_address``, or a local one started for the sweep when None; ``nosasim.ray_sweep``). Points
    the trace cannot replay are left out of the result and appended to ``skipped`` (grid fields plus the reason).
    Rows come back in grid order whatever ran them, so every backend writes the same CSV."""
    from tqdm import tqdm

    work = groups(cfgs)
    rows: list[dict] = []
    bar = tqdm(total=len(cfgs), desc="sweep", unit="point", disable=not progress)
    if use_ray:
        from nosasim.ray_sweep import ray_groups

        parts = ray_groups(trace_path, work, ray_address)
        pool = None
    elif workers <= 1:
        _init_worker(trace_path)
        parts = map(run_group, work)
        pool = None
    else:
        # fork would copy numba's state mid-compilation; spawn gives each worker a clean interpreter.
        pool = get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(str(trace_path),))
        parts = pool.imap_unordered(run_group, work)
    try:
        for part in parts:
            for r in part:
                if "skipped" in r:
                    if skipped is not None:
                        skipped.append(r)
                else:
                    rows.append(r)
            bar.update(len(part))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        bar.close()
    rows.sort(key=lambda r: tuple(str(r[f]) for f in GRID_FIELDS))
    return rows


def online(row: dict) -> bool:
    """Whether a point's cache policy can run online (Belady's needs the future: it is a bound, not a choice)."""
    return row["variant"] == "dense" or row["policy"] in ONLINE_POLICIES


def pareto(rows: list[dict], x: str = "gpu_memory_bytes", y: str = "tokens_per_s", minimize_x: bool = True) -> list[dict]:
    """Points not dominated in (``x``, ``y``): ``y`` higher is better, ``x`` lower (or higher) is better.
    Only points that fit, have both values and run online are candidates (Belady's points are plotted as the
    bound they are, never offered as a configuration)."""
    cand = [r for r in rows if r["fits"] and r.get(x) is not None and r.get(y) is not None and online(r)]
    cand.sort(key=lambda r: (r[x] if minimize_x else -r[x], -r[y]))
    front, best = [], float("-inf")
    for r in cand:
        if r[y] > best:
            front.append(r)
            best = r[y]
    return front


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """CSV of ``rows`` with :data:`COLUMNS`, written atomically."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in COLUMNS})
    atomic_write(path, buf.getvalue().encode())
