"""Selection kernels inside the decode step: end-to-end steps with each variant of the scoring pool pass and the
top-k search, side by side in one run.

For each named ``runtime.e2e`` configuration the graph-replayed step is measured with every variant in turn
(``VARIANTS``: the pool pass as one program per row looping over its block tiles, or split over programs per tile;
the top-k search by compare passes, radix 1/2, or by byte histograms, radix 8), on the same weights, host store and
trace, so their ratio is what the kernels change in a real step. Loaded blocks must not change with the kernels.

Run on a GPU: ``PYTHONPATH=. python -m runtime.device_suite --stages bench:select_e2e --out $OUT``
(``SELECT_E2E=name,name`` picks configurations, ``SELECT_E2E_BUDGET`` seconds).
"""

from __future__ import annotations

import os
import time

import torch

from runtime import e2e, select_kernels
from runtime.model import Weights
from runtime.timing import environment, write_json

DEFAULT = ("floor-nosa-128k-b96-k64-prev-mb2", "equal-nosa-128k-b168-fp8-ck8-mb2", "floor-nosa-64k-b16-k64-lru128",
           "nosa-8k-b32-lru96")
LOOP = 1 << 20  # pool tiles per program past any row's blocks: one program per row, looping (the earlier pass)
# name: (pool tiles per program, radix below 2,048 padded blocks, radix from 2,048)
VARIANTS = {"loop-r2r1": (LOOP, 2, 1), "tiles-r2r1": (1, 2, 1), "tiles-r8": (1, 8, 8)}


def _set(variant: str) -> None:
    select_kernels.POOL_TILES, select_kernels.RADIX_SHORT, select_kernels.RADIX_LONG = VARIANTS[variant]


def run(out_path: str | None = None) -> dict:
    names = [n for n in os.environ.get("SELECT_E2E", ",".join(DEFAULT)).split(",") if n]
    budget = float(os.environ.get("SELECT_E2E_BUDGET", "300"))
    configs = {c.name: c for c in e2e.CONFIGS}
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"bench_select_e2e: unknown configurations {unknown}")
    saved = (select_kernels.POOL_TILES, select_kernels.RADIX_SHORT, select_kernels.RADIX_LONG)
    weights = Weights.random(e2e.PRESETS["llama3-8b"], torch.bfloat16, "cuda", 0)
    res = {"env": environment(), "variants": {k: dict(zip(("pool_tiles", "radix_short", "radix_long"), v))
                                              for k, v in VARIANTS.items()}, "rows": [], "skipped": []}
    t0 = time.time()
    stores: dict = {}
    traces: dict = {}
    try:
        for name in names:
            row = {"name": name, "steps": {}, "loaded_blocks_equal": True}
            loaded = None
            for v in VARIANTS:
                if time.time() - t0 > budget:
                    res["skipped"].append({"name": name, "variant": v, "why": "time budget"})
                    continue
                _set(v)
                r = e2e.run_config(configs[name], weights, stores, traces)
                row["steps"][v] = r["measured"]["median_step_s"]
                lb = r.get("loaded_blocks_per_step")
                if lb is not None:
                    row["loaded_blocks_equal"] &= loaded is None or lb == loaded
                    loaded = lb
                print(f"{name:40s} {v:12s} {r['measured']['median_step_s'] * 1e3:8.2f} ms", flush=True)
            res["rows"].append(row)
            if out_path:
                write_json(out_path, res)
            stores.clear()  # one configuration's host store at a time
            torch.cuda.empty_cache()
    finally:
        select_kernels.POOL_TILES, select_kernels.RADIX_SHORT, select_kernels.RADIX_LONG = saved
    res["seconds"] = time.time() - t0
    if out_path:
        write_json(out_path, res)
    return res


def table(res: dict) -> str:
    vs = list(res["variants"])
    lines = ["selection variants in the step (ms; ratio to the first)", f"{'config':40s} " +
             " ".join(f"{v:>12s}" for v in vs) + "  blocks equal"]
    for r in res["rows"]:
        base = r["steps"].get(vs[0])
        cells = []
        for v in vs:
            s = r["steps"].get(v)
            cells.append(f"{'-':>12s}" if s is None else
                         f"{s * 1e3:7.2f}" + (f" {s / base:4.2f}" if base else "     "))
        lines.append(f"{r['name']:40s} " + " ".join(cells) + f"  {r['loaded_blocks_equal']}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    res = run(sys.argv[1] if len(sys.argv) > 1 else "select_e2e.json")
    print(table(res))
