"""Assemble the current H200 hardware profile from the calibration files measured on the GPU (isolated
microbenchmarks only).

- ``nosasim/profiles/h200-pcie5.json`` (a copy in ``analysis/results/runtime_h200-pcie5-calibrated-run3.json``): the
  profile of the runtime that ``e2e-h200-run3.json`` measured, as one calibration call wrote it
  (``runtime_h200-pcie5-run3-written.json``: ``runtime.calibrate.run_all`` plus the overlap benchmark, with link
  tables from ``runtime_gather-h200.json``), plus the floor's HBM read peak (the best read rate of
  ``benchmarks/results/bench_attention-h200.json``).
- With ``runtime_phases-h200-select.json`` (every selection phase re-measured after the selection kernels changed),
  the bundled profile is run 3's with those tables replaced (a copy in
  ``analysis/results/runtime_h200-pcie5-calibrated-run5.json``), the profile of the runtime ``e2e-h200-run5.json``
  measured; run 3's stays in its copy, for runs 3 and 4.
- The profiles of the two earlier runtimes stay as they were assembled then (this script's earlier version, in the
  history): ``runtime_h200-pcie5-calibrated-fused.json`` (``e2e-h200-run1.json``: the fused selection kernel) and
  ``runtime_h200-pcie5-calibrated.json`` (``e2e-h200-run2.json``: the three-launch selection, before the launch
  rules of ``bench_tune.py``).

    python -m analysis.h200_profile
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from nosasim.atomic import atomic_write
from nosasim.hardware import Profile

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "analysis" / "results"


def _phase_tables():
    """``runtime.calibrate.phase_tables``, from the tree (``runtime``) or an installed wheel (``nosasim.runtime``)."""
    try:
        from ..runtime.calibrate import phase_tables
    except ImportError:  # run from the tree: analysis is a top-level package there
        from runtime.calibrate import phase_tables
    return phase_tables


def _load(name: str) -> dict:
    return json.loads((RES / name).read_text())


def hbm_read_peak() -> float:
    """The floor's HBM peak: the fastest read rate any attention variant reached in the attention benchmark run
    alone on the H200 (reads alone outrun the 1 GiB copy that ``hbm_Bps`` measures)."""
    bench = json.loads((ROOT / "benchmarks" / "results" / "bench_attention-h200.json").read_text())
    return max(v["Bps"] for r in bench["rows"] for n, v in r["variants"].items() if n != "fp8" and "Bps" in v)


# The offloaded phases with fp8 compressed keys (their selection tables), measured after run 3 on the runtime of
# e2e-h200-run4.json, whose kernels are run 3's but for the fp8-key paths.
CKEY8_PHASES = "runtime_phases-h200-ckey8.json"
# Denser calibration tables, measured after run 4: attention every 16 batches, selection between the phase rows.
FILL = "runtime_calibration-h200-fill.json"


def assemble_run3(hbm_read_Bps: float) -> dict:
    """The current runtime's profile: what the calibration stage wrote in one call (``runtime.calibrate.run_all``:
    ceilings, GEMMs, bf16 and FP8 attention, the empty pass's walk, dense attention, glue, offloaded phases, overlap;
    link tables from the committed gather benchmark), plus the floor's HBM read peak, defined as for run 2."""
    prof = _load("runtime_h200-pcie5-run3-written.json")
    cal = _load("runtime_calibration-h200-run3.json")
    prof["hbm_read_Bps"] = hbm_read_Bps
    prof["provenance"] += (f"; calibration call of {cal['env']['date']} (runtime_calibration-h200-run3.json), link "
                           "tables from runtime_gather-h200.json; hbm_read_Bps: the best read rate of "
                           "benchmarks/bench_attention.py's variants")
    host = RES / "host_memory-h200.json"
    if host.exists():  # read on the same kind of machine after the calibration call, which did not record it
        mem = json.loads(host.read_text())
        prof["host_memory_bytes"] = mem["host_memory_bytes"]
        prof["provenance"] += f"; host_memory_bytes: physical memory of the lent H200 machine ({mem['date']})"
    ck8 = RES / CKEY8_PHASES
    if ck8.exists():  # the selection tables with fp8 compressed keys, from their own calibration call
        from nosasim.models import load_model
        phase_tables = _phase_tables()

        ph = json.loads(ck8.read_text())
        prof["ops"].update(phase_tables(ph["offload_phases"], [], load_model("llama3-8b")))
        prof["provenance"] += (f"; selection_fp8 and selection_nosa_fp8 from a calibration call of "
                               f"{ph['env']['date']} ({CKEY8_PHASES}: runtime.calibrate.ckey_fp8_phases)")
    fill = RES / FILL
    if fill.exists():  # denser tables from a later calibration call (same kernels)
        from nosasim.models import load_model
        phase_tables = _phase_tables()

        cal2 = json.loads(fill.read_text())
        for kind in ("sparse_attention", "sparse_attention_fp8"):
            prof["ops"][kind] = cal2[kind]
        for kind, entries in phase_tables(cal2["offload_phases"], [], load_model("llama3-8b")).items():
            if kind.startswith("selection"):
                have = {(e["batch"], e["context"]) for e in entries}
                prof["ops"][kind] = sorted([e for e in prof["ops"].get(kind, []) if (e["batch"], e["context"])
                                            not in have] + entries, key=lambda e: (e["batch"], e["context"]))
        prof["provenance"] += (f"; sparse_attention, sparse_attention_fp8 (every 16 batches, the runtime's slot "
                               f"layout) and selection points at batch 16-96, 64K-128K from a calibration call of "
                               f"{cal2['env']['date']} ({FILL}: runtime.calibrate.sparse_attention(layout='runtime'), "
                               f"fill_phases)")
    Profile.from_dict(prof)
    prof["name"] = "h200-pcie5"
    return prof


# Every selection phase re-measured after the selection kernels changed (pool pass split over programs, radix-1
# search with one warp per 512 blocks): the runtime that e2e-h200-run5.json measures.
SELECT = "runtime_phases-h200-select.json"


def assemble_current(run3: dict) -> dict | None:
    """Run 3's profile with the selection tables (both variants, both key types), the block-table update and the
    attend glue replaced by ``SELECT``'s (None while that file is absent). The glue is the whole attend less its
    phases and the attention kernel, which keeps the runtime-layout table of ``FILL``."""
    sel = RES / SELECT
    if not sel.exists():
        return None
    from nosasim.models import load_model
    phase_tables = _phase_tables()

    ph = json.loads(sel.read_text())
    prof = copy.deepcopy(run3)
    tables = phase_tables(ph["offload_phases"], prof["ops"]["sparse_attention"], load_model("llama3-8b"))
    missing = {"selection", "selection_nosa", "selection_fp8", "selection_nosa_fp8", "block_table",
               "attend_glue"} - set(tables)
    if missing:
        raise ValueError(f"{SELECT}: no entries for the tables {sorted(missing)}")
    prof["ops"].update(tables)
    prof["provenance"] += (f"; selection, selection_nosa, selection_fp8, selection_nosa_fp8, block_table and "
                           f"attend_glue replaced from a calibration call of {ph['env']['date']} ({SELECT}: "
                           f"runtime.calibrate.select_phases, after the selection kernels changed)")
    Profile.from_dict(prof)
    return prof


def main() -> int:
    run3 = assemble_run3(hbm_read_peak())
    current = assemble_current(run3)
    out = [(RES / "runtime_h200-pcie5-calibrated-run3.json", run3)]
    if current is not None:
        out.append((RES / "runtime_h200-pcie5-calibrated-run5.json", current))
    out.append((ROOT / "nosasim" / "profiles" / "h200-pcie5.json", current or run3))
    for path, prof in out:
        atomic_write(path, (json.dumps(prof, indent=1) + "\n").encode())
    print("wrote " + ", ".join(str(p.relative_to(ROOT)) for p, _ in out) +
          f"; the bundled profile is run {'5' if current else '3'}'s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
