"""A hardware profile for a GPU nobody here has: a calibrated profile of another GPU, scaled by the two GPUs'
published figures (``nosasim profile derive``).

A data sheet gives what a calibration cannot: the target's HBM bandwidth and size, tensor (matmul) and vector
peaks, SM count and host link. What it cannot give is how close kernels come to those peaks; that is taken from the
measured GPU, on the assumption that the same kernels reach the same share of each ceiling on a GPU of the same
kind. So every measured ceiling is scaled by the ratio of the two data sheets' figures for it, and every table entry
by the ratio of its roofline time on the two GPUs (``max(flops / peak, bytes / hbm)``, the cost model's own roofline
of that entry's shape): an entry bound by bytes scales with HBM bandwidth, one bound by FLOPs with the tensor peak.
Transfers scale with the host link (PCIe generation x lanes); tables without a roofline (per-layer glue, the block
table, the empty attention walk: launch- and latency-bound) are kept as measured; compute beside a gather slows in
proportion to the share of SMs the gather's programs occupy. The derived profile's ``notes`` say, per table, what it
was scaled from and by what.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from nosasim.contract import is_real

SPEC_SCHEMA = "nosasim-spec/1"
SPEC_DIR = Path(__file__).with_name("specs")
SPEC_FIELDS = ("name", "hbm_Bps", "gpu_memory_gb", "matmul_flops", "vector_flops", "sms", "pcie_gen", "pcie_lanes")
# Usable bytes per second per lane and direction, by PCIe generation (after line coding).
PCIE_LANE_Bps = {3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}
# Tables the data sheets do not describe (launch- and latency-bound work): kept as measured.
KEPT = ("layer_glue", "attend_glue", "block_table", "sparse_attention_walk")
LINK_TABLES = ("gather_h2d", "writeback_d2h")


def check_spec(d: dict, where: str = "spec") -> dict:
    """A data-sheet spec, validated: ValueError naming the field and what was expected."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if d.get("schema", SPEC_SCHEMA) != SPEC_SCHEMA:
        raise ValueError(f"{where} field schema: expected {SPEC_SCHEMA!r}, got {d.get('schema')!r}")
    missing = [f for f in SPEC_FIELDS if f not in d]
    if missing:
        raise ValueError(f"{where} {d.get('name', '?')!r}: missing field(s) {', '.join(missing)}")
    for f in SPEC_FIELDS[1:]:
        v = d[f]
        if not is_real(v) or v <= 0:
            raise ValueError(f"{where} field {f}: expected a positive number, got {v!r}")
    if d["pcie_gen"] not in PCIE_LANE_Bps:
        raise ValueError(f"{where} field pcie_gen: expected one of {sorted(PCIE_LANE_Bps)}, got {d['pcie_gen']!r}")
    if d["pcie_lanes"] not in (1, 2, 4, 8, 16):
        raise ValueError(f"{where} field pcie_lanes: expected 1, 2, 4, 8 or 16, got {d['pcie_lanes']!r}")
    return d


def bundled_specs() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.json"))


def load_spec(name_or_path: str | Path) -> dict:
    """A spec by bundled name or JSON path."""
    p = Path(name_or_path)
    if not p.exists():
        p = SPEC_DIR / f"{name_or_path}.json"
    if not p.exists():
        raise ValueError(f"spec: no such file or bundled spec {str(name_or_path)!r} (bundled: "
                         f"{', '.join(bundled_specs())})")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"spec {str(p)!r}: not valid JSON ({exc})") from None
    return check_spec(d, f"spec {p.name}")


def spec_for_device(device: str) -> dict:
    """The bundled spec whose ``device_match`` the profile's device string contains (longest match first)."""
    specs = [load_spec(n) for n in bundled_specs()]
    hits = sorted((s for s in specs if s.get("device_match") and s["device_match"] in device),
                  key=lambda s: -len(s["device_match"]))
    if not hits:
        raise ValueError(f"--from-spec: no bundled spec matches the profile's device {device!r}; give the measured "
                         f"GPU's data sheet with --from-spec (bundled: {', '.join(bundled_specs())})")
    return hits[0]


def link_Bps(spec: dict) -> float:
    return PCIE_LANE_Bps[spec["pcie_gen"]] * spec["pcie_lanes"]


def derive(profile: dict, src: dict, tgt: dict, name: str | None = None) -> dict:
    """The profile of ``tgt``'s GPU from ``profile``, measured on ``src``'s (both data-sheet specs)."""
    from nosasim.cost import _MATMUL_KINDS, _table_fb
    from nosasim.hardware import Profile

    Profile.from_dict(profile)  # the source must be a valid profile
    r = {"hbm": tgt["hbm_Bps"] / src["hbm_Bps"], "mm": tgt["matmul_flops"] / src["matmul_flops"],
         "vec": tgt["vector_flops"] / src["vector_flops"], "link": link_Bps(tgt) / link_Bps(src),
         "mem": tgt["gpu_memory_gb"] / src["gpu_memory_gb"], "sms": src["sms"] / tgt["sms"]}
    out = copy.deepcopy(profile)
    src_name = profile["name"]
    out["name"] = name or f"{tgt['name']}-derived"
    out["device"] = f"{tgt['name']} (derived from {src_name}, not measured)"
    for f, k in (("hbm_Bps", "hbm"), ("hbm_read_Bps", "hbm"), ("matmul_flops", "mm"), ("vector_flops", "vec")):
        if f in out:
            out[f] = profile[f] * r[k]
    out["gpu_memory_bytes"] = profile["gpu_memory_bytes"] * r["mem"]
    out.pop("host_memory_bytes", None)  # the host is not the GPU's: unknown unless the spec gives it
    if "host_memory_bytes" in tgt:
        out["host_memory_bytes"] = float(tgt["host_memory_bytes"])
    for d in ("h2d", "d2h"):
        out[d] = dict(profile[d], peak_Bps=profile[d]["peak_Bps"] * r["link"])
    if "overlap_slowdown" in out:
        out["overlap_slowdown"] = profile["overlap_slowdown"] * r["sms"]
    notes = {}
    hbm0, hbm1 = profile["hbm_Bps"], out["hbm_Bps"]
    for kind, entries in profile.get("ops", {}).items():
        if kind in KEPT:
            notes[kind] = f"{src_name}'s {kind}, as measured (launch- and latency-bound: no data-sheet figure)"
            continue
        if kind in LINK_TABLES:
            out["ops"][kind] = [dict(e, seconds=e["seconds"] / r["link"]) for e in entries]
            notes[kind] = f"{src_name}'s {kind} / {r['link']:.3f} (host link {link_Bps(tgt) / 1e9:.1f} GB/s vs " \
                          f"{link_Bps(src) / 1e9:.1f})"
            continue
        thr0 = profile["matmul_flops" if kind in _MATMUL_KINDS else "vector_flops"]
        thr1 = out["matmul_flops" if kind in _MATMUL_KINDS else "vector_flops"]
        scaled = []
        ratios = []
        for e in entries:
            flops, nbytes = _table_fb(kind, e)
            roof0 = max(float(np.asarray(flops)) / thr0, float(np.asarray(nbytes)) / hbm0)
            roof1 = max(float(np.asarray(flops)) / thr1, float(np.asarray(nbytes)) / hbm1)
            ratios.append(roof1 / roof0)
            scaled.append(dict(e, seconds=e["seconds"] * roof1 / roof0))
        out["ops"][kind] = scaled
        notes[kind] = (f"{src_name}'s {kind} x roofline ratio {min(ratios):.3f}-{max(ratios):.3f} (HBM x{r['hbm']:.3f}, "
                       f"{'matmul' if kind in _MATMUL_KINDS else 'vector'} x"
                       f"{r['mm'] if kind in _MATMUL_KINDS else r['vec']:.3f})")
    notes["ceilings"] = (f"hbm_Bps and hbm_read_Bps x{r['hbm']:.3f}, matmul_flops x{r['mm']:.3f}, vector_flops "
                         f"x{r['vec']:.3f}, gpu_memory_bytes x{r['mem']:.3f}, link peaks x{r['link']:.3f}, "
                         f"overlap_slowdown x{r['sms']:.3f} (SMs {src['sms']} -> {tgt['sms']}); launch_s, latencies "
                         f"and reserved_bytes as measured")
    out["notes"] = notes
    out["provenance"] = (f"derived by nosasim profile derive from {src_name} (measured: {profile['provenance'][:200]}"
                         f"{'...' if len(profile['provenance']) > 200 else ''}) with data sheets {src['name']} -> "
                         f"{tgt['name']} ({tgt.get('source', 'no source given')})")
    Profile.from_dict(out)
    return out
