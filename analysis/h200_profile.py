"""Assemble the H200 hardware profiles from the calibration files measured on the GPU (all isolated microbenchmarks).

The session's device time came in four calls on fresh H200 machines, and the runtime changed between them (the
selection kernels), so the profiles are assembled from the raw files rather than taken as written:

- ``runtime_h200-pcie5-calibrated-fused.json``: the profile the calibration stage wrote (call 2: ceilings, GEMMs,
  attention, layer glue, offloaded phases with the fused selection kernel, link tables, overlap), plus the empty
  attention pass's table measured alone in call 3 (``runtime_attention_walk-h200.json``). It is the profile of the
  runtime that ``e2e-h200-run1.json`` measured.
  The fp8 block pool's attention kernel is taken from the attention benchmark run alone in call 1
  (``benchmarks/results/bench_attention-h200.json``, its ``fp8`` variant at the defaults: K selected blocks plus a
  partial tail, i.e. ``k_blocks = K + 1``), since the calibration stage timed the bf16 kernel only.
- ``nosasim/profiles/h200-pcie5.json`` (a copy in ``runtime_h200-pcie5-calibrated.json``): the same with the
  offloaded phases (selection, block table, attend glue) re-measured for the three-launch selection in call 4
  (``runtime_phases-h200-three.json``): the current runtime, which ``e2e-h200-run2.json`` measured.

    python -m analysis.h200_profile
"""

from __future__ import annotations

import json
from pathlib import Path

from nosasim.atomic import atomic_write
from nosasim.hardware import Profile
from nosasim.models import load_model

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "analysis" / "results"


def _load(name: str) -> dict:
    return json.loads((RES / name).read_text())


def assemble() -> tuple[dict, dict]:
    from runtime.calibrate import phase_tables

    base = _load("runtime_h200-pcie5-calibrated-fused.json")
    walk = _load("runtime_attention_walk-h200.json")
    cal = _load("runtime_calibration-h200.json")
    fused = json.loads(json.dumps(base))
    fused["ops"]["sparse_attention_walk"] = walk["sparse_attention_walk"]
    bench = json.loads((ROOT / "benchmarks" / "results" / "bench_attention-h200.json").read_text())
    shape = bench.get("shape", {})
    fused["ops"]["sparse_attention_fp8"] = [
        {"batch": r["batch"], "q_heads": shape.get("q_heads", 32), "kv_heads": shape.get("kv_heads", 8),
         "head_dim": shape.get("head_dim", 128), "k_blocks": r["k"] + 1, "seconds": r["variants"]["fp8"]["seconds"]}
        for r in bench["rows"] if r["kind"] == "sparse" and "seconds" in r["variants"].get("fp8", {})]
    fused["provenance"] += (f"; sparse_attention_fp8 from benchmarks/bench_attention.py's fp8 variant, run alone "
                            f"on {bench['env']['date']} (call 1)")
    # The floor's HBM peak: the fastest read rate any attention variant reached in that benchmark (reads alone
    # outrun the 1 GiB copy that hbm_Bps measures).
    fused["hbm_read_Bps"] = max(v["Bps"] for r in bench["rows"] for n, v in r["variants"].items()
                                if n != "fp8" and "Bps" in v)
    fused["provenance"] += "; hbm_read_Bps: the best read rate of benchmarks/bench_attention.py's variants (call 1)"
    fused["provenance"] += (f"; sparse_attention_walk measured alone on {walk['env']['date']} (call 3, "
                            "runtime.calibrate.sparse_attention_walk)")
    three = json.loads(json.dumps(fused))
    phases = _load("runtime_phases-h200-three.json")
    tables = phase_tables(phases["offload_phases"], cal["sparse_attention"], load_model(cal.get("model", "llama3-8b")))
    three["ops"].update(tables)
    three["provenance"] += (f"; selection, selection_nosa, block_table and attend_glue re-measured on "
                            f"{phases['env']['date']} (call 4) for the three-launch selection "
                            "(RuntimeConfig.selection='three'), by runtime.calibrate.offload_phases")
    three["notes"] = (three.get("notes", "") + " Assembled by python -m analysis.h200_profile from the raw "
                      "calibration files in analysis/results/ (four calls on fresh H200 machines).").strip()
    for prof in (fused, three):
        Profile.from_dict(prof)  # both must load in nosasim
    three["name"] = "h200-pcie5"
    return fused, three


def main() -> int:
    fused, three = assemble()
    atomic_write(RES / "runtime_h200-pcie5-calibrated-fused.json", (json.dumps(fused, indent=1) + "\n").encode())
    for path in (RES / "runtime_h200-pcie5-calibrated.json", ROOT / "nosasim" / "profiles" / "h200-pcie5.json"):
        atomic_write(path, (json.dumps(three, indent=1) + "\n").encode())
    print("wrote the fused-selection and current H200 profiles")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
