"""Hardware profiles: what a GPU and its PCIe link can do, as the cost model needs it.

A profile is a JSON file (schema in ``docs/profile-format.md``). It holds ceilings (HBM bandwidth, matrix and vector
throughput, link peaks), fixed costs (kernel launch, transfer latency), and optional per-operator tables that the
GPU runtime's calibration (``runtime/calibrate.py``) writes from isolated microbenchmarks. Tables replace the
ceilings where present; they are never fit to end-to-end step times.

Transfers are not one bandwidth number: small gathers are latency-bound and a zero-copy gather only reaches the
link's peak with thousands of chunks in flight, so a transfer costs ``latency + bytes / (peak * efficiency)`` with an
efficiency interpolated over chunk size and chunk count.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nosasim.contract import is_real

SCHEMA = "nosasim-profile/1"
PROFILE_DIR = Path(__file__).with_name("profiles")

# Operator tables the calibration may write: each entry holds these shape fields plus "seconds".
# Keep these names in sync with runtime/calibrate.py and the op names in nosasim/cost.py.
OP_FIELDS: dict[str, tuple[str, ...]] = {
    "gemm": ("m", "n", "k"),
    "sparse_attention": ("batch", "q_heads", "kv_heads", "head_dim", "k_blocks"),
    "sparse_attention_fp8": ("batch", "q_heads", "kv_heads", "head_dim", "k_blocks"),
    # An attention pass that walks every entry and loads none (a split step's misses pass with nothing missed).
    "sparse_attention_walk": ("batch", "q_heads", "kv_heads", "head_dim", "k_blocks"),
    "dense_attention": ("batch", "q_heads", "kv_heads", "head_dim", "context"),
    "selection": ("batch", "q_heads", "kv_heads", "head_dim", "context"),
    "selection_nosa": ("batch", "q_heads", "kv_heads", "head_dim", "context"),
    # The same with fp8 (e4m3) compressed keys.
    "selection_fp8": ("batch", "q_heads", "kv_heads", "head_dim", "context"),
    "selection_nosa_fp8": ("batch", "q_heads", "kv_heads", "head_dim", "context"),
    "block_table": ("rows", "k", "capacity"),
    # Composite per-layer work, interpolated in batch (see nosasim/cost.py, BATCH_TABLES).
    "layer_glue": ("batch", "hidden", "q_heads", "kv_heads", "head_dim", "mlp"),
    "attend_glue": ("batch", "kv_heads"),
    "elementwise": ("bytes",),
    "gather_h2d": ("chunk_bytes", "count"),
    "writeback_d2h": ("chunk_bytes", "count"),
}
_REQUIRED = ("name", "provenance", "gpu_memory_bytes", "hbm_Bps", "matmul_flops", "vector_flops", "launch_s",
             "h2d", "d2h")
_OPTIONAL = ("schema", "device", "reserved_bytes", "ops", "notes", "overlap_slowdown", "hbm_read_Bps",
             "host_memory_bytes")


# Values past these are damage: no table time comes near 1e4 s, and a rate or size past 1e100 would overflow or
# vanish in the cost model's arithmetic (idealised what-if profiles, such as a free 1e30 FLOP/s, stay well inside).
MAX_RATE, MAX_SECONDS, MAX_SHAPE = 1e100, 1e4, 1 << 40


def _positive(where: str, value, hi: float = MAX_RATE) -> float:
    if not is_real(value) or value <= 0 or value > hi:
        raise ValueError(f"profile field {where}: expected a positive number up to {hi:g}, got {value!r}")
    return float(value)


def _number(where: str, value, lo: float, hi: float, what: str) -> float:
    """A JSON number (not a bool, null, string or container) in ``[lo, hi)``; ``what`` says what it means."""
    if not is_real(value) or not lo <= value < hi:
        raise ValueError(f"profile field {where}: expected a number in [{lo:g}, {hi:g}) ({what}), got {value!r}")
    return float(value)


def _text(where: str, value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"profile field {where}: expected a string, got {value!r}")
    return value


def _interp_log(x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Linear interpolation in log(x), clamped at both ends (never extrapolates a trend past the measurements)."""
    if len(xs) == 1:
        return np.full(np.shape(x), ys[0], dtype=np.float64)
    return np.interp(np.log(np.maximum(x, 1e-300)), np.log(xs), ys)


@dataclass(frozen=True, slots=True)
class TransferModel:
    """One direction of the host link: ``time = latency + n * chunk / (peak * eff(chunk, n))`` for ``n > 0``."""

    peak_Bps: float
    latency_s: float
    chunk_bytes: np.ndarray  # ascending, the efficiency grid's first axis
    counts: np.ndarray  # ascending, its second axis
    efficiency: np.ndarray  # [len(chunk_bytes), len(counts)], each in (0, 1]

    def eff(self, chunk_bytes: float, count: np.ndarray) -> np.ndarray:
        """Efficiency at ``chunk_bytes`` for each count: bilinear in (log chunk, log count), clamped."""
        count = np.asarray(count, dtype=np.float64)
        per_chunk = np.array([_interp_log(np.maximum(count, 1.0), self.counts, row) for row in self.efficiency])
        if len(self.chunk_bytes) == 1:
            return per_chunk[0]
        w = float(np.clip(np.interp(math.log(chunk_bytes), np.log(self.chunk_bytes),
                                    np.arange(len(self.chunk_bytes))), 0, len(self.chunk_bytes) - 1))
        lo = int(math.floor(w))
        hi = min(lo + 1, len(self.chunk_bytes) - 1)
        return per_chunk[lo] * (1 - (w - lo)) + per_chunk[hi] * (w - lo)

    def time(self, chunk_bytes: float, count: np.ndarray) -> np.ndarray:
        """Seconds to move ``count`` chunks of ``chunk_bytes`` each (zero chunks cost nothing: no kernel is launched)."""
        count = np.asarray(count, dtype=np.float64)
        t = self.latency_s + count * chunk_bytes / (self.peak_Bps * self.eff(chunk_bytes, count))
        return np.where(count > 0, t, 0.0)


def _transfer(where: str, spec, table: list[dict] | None) -> TransferModel:
    """Build a link direction; a calibration table (seconds per chunk size x count) replaces the efficiency grid."""
    if not isinstance(spec, dict):
        raise ValueError(f"profile field {where}: expected an object with peak_Bps, latency_s, efficiency, got {spec!r}")
    missing = [k for k in ("peak_Bps", "latency_s") if k not in spec]
    if missing:
        raise ValueError(f"profile field {where}: missing {', '.join(missing)}")
    peak = _positive(f"{where}.peak_Bps", spec["peak_Bps"])
    latency = _number(f"{where}.latency_s", spec["latency_s"], 0.0, 10.0, "seconds of one transfer's fixed cost")
    if table:
        chunks = sorted({float(e["chunk_bytes"]) for e in table})
        counts = sorted({float(e["count"]) for e in table})
        grid = np.full((len(chunks), len(counts)), np.nan)
        for e in table:
            moved = e["chunk_bytes"] * e["count"]
            spent = e["seconds"] - latency
            if spent <= 0:
                raise ValueError(f"profile table for {where}: an entry of {e['seconds']} s is not above the latency "
                                 f"{where}.latency_s = {latency} s (inconsistent)")
            grid[chunks.index(float(e["chunk_bytes"])), counts.index(float(e["count"]))] = moved / (spent * peak)
        if np.isnan(grid).any():
            raise ValueError(f"profile table for {where}: expected a full grid of chunk_bytes {chunks} x count "
                             f"{counts}, some cells are missing")
    else:
        eff = spec.get("efficiency")
        if not isinstance(eff, dict) or not {"chunk_bytes", "counts", "values"} <= set(eff):
            raise ValueError(f"profile field {where}.efficiency: expected an object with chunk_bytes, counts, values "
                             f"(or an ops table), got {eff!r}")
        for name in ("chunk_bytes", "counts", "values"):
            if not isinstance(eff[name], list):
                raise ValueError(f"profile field {where}.efficiency.{name}: expected a list, got {eff[name]!r}")
        chunks = [_positive(f"{where}.efficiency.chunk_bytes", c) for c in eff["chunk_bytes"]]
        counts = [_positive(f"{where}.efficiency.counts", c) for c in eff["counts"]]
        rows = eff["values"]
        if not all(isinstance(r, list) and all(not isinstance(v, bool) and isinstance(v, (int, float)) for v in r)
                   for r in rows):
            raise ValueError(f"profile field {where}.efficiency.values: expected a list of lists of numbers "
                             f"(chunk_bytes x counts), got {rows!r}"[:300])
        grid = np.asarray(rows, dtype=np.float64) if rows and len({len(r) for r in rows}) == 1 else np.zeros((0, 0))
        if grid.shape != (len(chunks), len(counts)):
            raise ValueError(f"profile field {where}.efficiency.values: expected shape "
                             f"{(len(chunks), len(counts))} (chunk_bytes x counts), got {grid.shape}")
    for name, axis in (("chunk_bytes", chunks), ("counts", counts)):
        if not axis or list(axis) != sorted(set(axis)):
            raise ValueError(f"profile field {where}.efficiency.{name}: expected strictly ascending values, got {axis}")
    if not np.all((grid > 0) & (grid <= 1.0 + 1e-9)):
        raise ValueError(f"profile field {where}: efficiencies must lie in (0, 1] of peak_Bps, got {grid.tolist()} "
                         f"(a table faster than the peak is inconsistent)")
    return TransferModel(peak, latency, np.asarray(chunks), np.asarray(counts), grid)


def _check_ops(ops) -> dict[str, list[dict]]:
    if ops is None:
        return {}
    if not isinstance(ops, dict):
        raise ValueError(f"profile field ops: expected an object of operator tables, got {type(ops).__name__}")
    unknown = sorted(set(ops) - set(OP_FIELDS))
    if unknown:
        raise ValueError(f"profile field ops: unknown operator table(s) {unknown}; expected some of {sorted(OP_FIELDS)}")
    for op, entries in ops.items():
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"profile field ops.{op}: expected a non-empty list of entries, got {entries!r}")
        for i, e in enumerate(entries):
            need = (*OP_FIELDS[op], "seconds")
            missing = [f for f in need if not isinstance(e, dict) or f not in e]
            if missing:
                raise ValueError(f"profile field ops.{op}[{i}]: missing {', '.join(missing)}")
            for f in OP_FIELDS[op]:
                v = e[f]
                if not is_real(v) or v != int(v) or not 1 <= v <= MAX_SHAPE:
                    raise ValueError(f"profile field ops.{op}[{i}].{f}: expected an integer in [1, {MAX_SHAPE}], "
                                     f"got {v!r}")
            _positive(f"ops.{op}[{i}].seconds", e["seconds"], MAX_SECONDS)
    return ops


@dataclass(frozen=True, slots=True)
class Profile:
    """A validated hardware profile. Build it with :func:`load_profile` or :meth:`from_dict`."""

    name: str
    provenance: str
    gpu_memory_bytes: float
    reserved_bytes: float
    hbm_Bps: float
    matmul_flops: float
    vector_flops: float
    launch_s: float
    h2d: TransferModel
    d2h: TransferModel
    ops: dict = field(default_factory=dict)
    device: str = ""
    # Compute kernels run this much slower while an H2D gather runs beside them (micro-batch overlap): the gather
    # kernel's programs share the SMs. 0.22 means 1.22x longer; measured by benchmarks/bench_overlap.py.
    overlap_slowdown: float = 0.0
    # The fastest HBM read rate a kernel reached in isolation (reads alone outrun a copy's mix of reads and
    # writes): the floor's HBM peak when higher than ``hbm_Bps``. 0 when not measured.
    hbm_read_Bps: float = 0.0
    # The host's memory, which holds every offloaded sequence's whole KV history (pinned): 0 when not known.
    host_memory_bytes: float = 0.0

    @property
    def hbm_peak_Bps(self) -> float:
        """The HBM rate a step's floor divides its bytes by: the best measured, read or copy."""
        return max(self.hbm_Bps, self.hbm_read_Bps)

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        if not isinstance(d, dict):
            raise ValueError(f"profile: expected a JSON object, got {type(d).__name__}")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"profile {d.get('name', '?')!r}: missing field(s) {', '.join(missing)}")
        unknown = sorted(set(d) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise ValueError(f"profile {d['name']!r}: unknown field(s) {unknown} (typo?)")
        if d.get("schema", SCHEMA) != SCHEMA:
            raise ValueError(f"profile field schema: expected {SCHEMA!r}, got {d['schema']!r}")
        ops = _check_ops(d.get("ops"))
        launch = _number("launch_s", d["launch_s"], 0.0, 1.0, "seconds per kernel launch")
        mem = _positive("gpu_memory_bytes", d["gpu_memory_bytes"])
        reserved = _number("reserved_bytes", d.get("reserved_bytes", 0), 0.0, mem,
                           "bytes held before the run, below gpu_memory_bytes")
        slow = _number("overlap_slowdown", d.get("overlap_slowdown", 0.0), 0.0, 10.0,
                       "fractional slowdown of compute beside a gather")
        return cls(
            name=_text("name", d["name"]), provenance=_text("provenance", d["provenance"]), gpu_memory_bytes=mem,
            reserved_bytes=reserved,
            hbm_Bps=_positive("hbm_Bps", d["hbm_Bps"]), matmul_flops=_positive("matmul_flops", d["matmul_flops"]),
            vector_flops=_positive("vector_flops", d["vector_flops"]), launch_s=launch,
            h2d=_transfer("h2d", d["h2d"], ops.get("gather_h2d")),
            d2h=_transfer("d2h", d["d2h"], ops.get("writeback_d2h")),
            ops=ops, device=_text("device", d.get("device", "")), overlap_slowdown=slow,
            hbm_read_Bps=_positive("hbm_read_Bps", d["hbm_read_Bps"]) if "hbm_read_Bps" in d else 0.0,
            host_memory_bytes=_positive("host_memory_bytes", d["host_memory_bytes"])
            if "host_memory_bytes" in d else 0.0,
        )

    def scaled(self, *, pcie: float = 1.0, hbm: float = 1.0, flops: float = 1.0) -> "Profile":
        """A copy with faster or slower links/HBM/compute (what-if studies and monotonicity tests)."""
        from dataclasses import replace

        return replace(self, hbm_Bps=self.hbm_Bps * hbm, matmul_flops=self.matmul_flops * flops,
                       vector_flops=self.vector_flops * flops,
                       h2d=replace(self.h2d, peak_Bps=self.h2d.peak_Bps * pcie),
                       d2h=replace(self.d2h, peak_Bps=self.d2h.peak_Bps * pcie))


def bundled_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def read_profile(name_or_path: str | Path, option: str = "--profile") -> dict:
    """The JSON object of a bundled profile by name (``h100-pcie5``) or of any profile JSON by path, unvalidated;
    ``option`` names the command-line option in errors."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise ValueError(f"{option}: unknown profile {str(name_or_path)!r}; expected one of "
                             f"{bundled_profiles()} or a path to a profile JSON")
    elif not path.exists():
        raise ValueError(f"{option}: no such file {str(path)!r}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"profile {str(path)!r}: not valid JSON ({exc})") from None


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a bundled profile by name (``h100-pcie5``) or any profile JSON by path."""
    return Profile.from_dict(read_profile(name_or_path))
