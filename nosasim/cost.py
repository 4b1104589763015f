"""Per-operation cost model: seconds for each kernel of one decode step, from a hardware profile and a model shape.

Every operator the GPU runtime launches per layer is listed here with its FLOPs and HBM bytes. Its time is the
roofline ``max(flops / throughput, bytes / hbm_Bps)`` plus ``launch_s`` per kernel, or, when the profile carries a
calibration table for the operator's kind, the roofline divided by the efficiency that the table shows at a similar
roofline time (small kernels reach a smaller share of the ceilings; a measured time already contains its launch).
Op names (``qkv_proj``, ``selection``, ``gather_h2d`` ...) and table kinds (``gemm``, ``elementwise`` ...) are the
names the runtime's calibration uses; see ``docs/profile-format.md``.

Costs are vectorized over decode steps: contexts grow by one token per step, so attention and selection costs are
arrays ``[steps]``; the rest are constants broadcast to that shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nosasim.contract import CMP_STRIDE, CMP_WINDOW
from nosasim.hardware import Profile
from nosasim.models import ModelSpec, ReplayConfig

# Breakdown classes, in report order. h2d_wait/d2h_wait are compute-stream stalls, filled by the simulator.
CLASSES = ("gemm", "attention", "selection", "cache", "elementwise", "h2d_wait", "d2h_wait")
CLASS_INDEX = {c: i for i, c in enumerate(CLASSES)}


@dataclass(frozen=True, slots=True)
class OpCost:
    """One operator instance: its name, breakdown class, table kind, and seconds per step."""

    name: str
    cls: str
    seconds: np.ndarray


def _gemm_fb(m, n, k, dt=2):
    return 2.0 * m * n * k, float(dt) * (m * k + k * n + m * n)


def _attn_fb(batch_tokens, batch, q_heads, kv_heads, head_dim, dt=2, kv_dt=None):
    """Decode attention over ``batch_tokens`` cached tokens summed over the batch (flash-decoding reads K and V once,
    in their own element type ``kv_dt``, default ``dt``)."""
    kv_bytes = 2.0 * (dt if kv_dt is None else kv_dt) * kv_heads * head_dim * batch_tokens
    qo_bytes = 2.0 * dt * batch * q_heads * head_dim
    return 4.0 * q_heads * head_dim * batch_tokens, kv_bytes + qo_bytes  # q.K and p.V for every query head


def _n_cmp(context):
    """Compressed keys of a context: windows of 32 with stride 16 (at least one)."""
    return np.maximum((np.asarray(context, dtype=np.float64) - CMP_WINDOW) // CMP_STRIDE + 1, 1)


def _select_fb(batch_cmp, batch_blocks, batch, q_heads, kv_heads, head_dim, dt=2, agnostic=False, ck_dt=None):
    """InfLLM-V2 scoring: q . compressed keys (in their own element type ``ck_dt``, default ``dt``), softmax, GQA
    sum, max-pool to blocks, top-k (+ NOSA's static top-k)."""
    flops = 2.0 * q_heads * head_dim * batch_cmp + 6.0 * q_heads * batch_cmp
    bytes_ = ((dt if ck_dt is None else ck_dt) * kv_heads * head_dim * batch_cmp + dt * batch * q_heads * head_dim
              + 4.0 * 2 * q_heads * batch_cmp + 4.0 * kv_heads * batch_cmp + 4.0 * 2 * kv_heads * batch_blocks)
    if agnostic:
        bytes_ = bytes_ + 4.0 * 2 * kv_heads * batch_blocks
    return flops, bytes_


def _table_bytes(rows, k, capacity):
    """Block-table update: read the selection and the slot map, write slots and keys (int32)."""
    return 4.0 * rows * (2 * k + 2 * capacity)


# How each calibration table kind turns an entry's shape into (flops, bytes), so entries and queries share a roofline.
def _table_fb(kind: str, e: dict):
    if kind == "gemm":
        return _gemm_fb(e["m"], e["n"], e["k"])
    if kind == "elementwise":
        return 0.0, float(e["bytes"])
    if kind in ("sparse_attention", "sparse_attention_fp8"):
        return _attn_fb(e["batch"] * e["k_blocks"] * 64, e["batch"], e["q_heads"], e["kv_heads"], e["head_dim"],
                        kv_dt=1 if kind == "sparse_attention_fp8" else 2)
    if kind == "dense_attention":
        return _attn_fb(e["batch"] * e["context"], e["batch"], e["q_heads"], e["kv_heads"], e["head_dim"])
    if kind in SELECTION_KINDS:
        cmp = e["batch"] * _n_cmp(e["context"])
        return _select_fb(cmp, e["batch"] * (e["context"] // 64 + 1), e["batch"], e["q_heads"], e["kv_heads"],
                          e["head_dim"], agnostic=kind.startswith("selection_nosa"),
                          ck_dt=1 if kind.endswith("_fp8") else 2)
    if kind == "block_table":
        return 0.0, _table_bytes(e["rows"], e["k"], e["capacity"])
    raise RuntimeError(f"no roofline for table kind {kind!r}: a bug")


# Selection tables: per variant (NOSA adds its eviction-score top-k), and with fp8 compressed keys.
SELECTION_KINDS = ("selection", "selection_nosa", "selection_fp8", "selection_nosa_fp8")
_MATMUL_KINDS = ("gemm", "sparse_attention", "sparse_attention_fp8", "dense_attention")
# Tables of composite work (chains of small kernels) measured per layer by batch: no single roofline describes
# them, so their seconds are interpolated linearly in the batch size (and extrapolated along the last segment).
BATCH_TABLES = ("layer_glue", "attend_glue")
# Tables measured on a (batch, context) grid whose time depends on both apart: selection pays per row (the top-k
# over the row's blocks, its program's start) and per compressed key, so points of equal bytes but other shapes
# differ threefold, and one efficiency curve over the roofline would mix them. Their seconds are interpolated
# linearly in context within each measured batch, then linearly in batch; past the largest measured batch they grow
# in proportion to it, and below the smallest along the first segment.
# Sparse attention too: its kernel's launch (pieces per row, pipeline stages) depends on the rows, so equal bytes at
# other batches run at other rates (an H200's FP8 pool: 54% of the roofline at batch 64, 69% at 96), and one curve
# over the roofline would read a batch-48 step off the wrong batches' points.
GRID_TABLES = (*SELECTION_KINDS, "dense_attention", "sparse_attention_walk", "sparse_attention",
               "sparse_attention_fp8")
# Grid tables of a part of a kernel (the walk of an empty split-attention pass), whose bytes and FLOPs no roofline
# gives: on another model's shape they are not used at all.
NO_ROOFLINE = ("sparse_attention_walk",)
# The grid's second axis where it is not the context.
GRID_SECOND = {"sparse_attention_walk": "k_blocks", "sparse_attention": "k_blocks", "sparse_attention_fp8": "k_blocks"}


# How far past its last measured context (a share of the asked one) a grid table's batch row still counts as
# measured there (the e2e steps run up to a few hundred tokens past the calibrated 131,072).
REACH = 0.1


def _linear(xs: np.ndarray, ys: np.ndarray, x) -> np.ndarray:
    """Piecewise-linear through (xs, ys), extrapolated along the end segments; one point: proportional to x."""
    x = np.asarray(x, dtype=np.float64)
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2)
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    return ys[i] + slope * (x - xs[i])


class CostModel:
    """Operator costs for one (profile, model, config); per-kind efficiency curves are built once here."""

    def __init__(self, profile: Profile, model: ModelSpec, config: ReplayConfig, block_size: int = 64):
        self.p, self.m, self.cfg, self.block_size = profile, model, config, block_size
        self.block = config.block(model, block_size)
        self._curves = {}
        self._batch_curves = {}
        self._grids = {}
        for kind, entries in profile.ops.items():
            if kind in ("gather_h2d", "writeback_d2h"):
                continue  # folded into the transfer models by nosasim.hardware
            if kind in GRID_TABLES:
                own = {"q_heads": model.q_heads, "kv_heads": model.kv_heads, "head_dim": model.head_dim}
                rows: dict = {}
                second = GRID_SECOND.get(kind, "context")
                for e in entries:
                    if all(e[f] == v for f, v in own.items()):
                        rows.setdefault(float(e["batch"]), []).append((float(e[second]), e["seconds"]))
                if rows:
                    self._grids[kind] = {b: (np.array([c for c, _ in sorted(p)]), np.array([t for _, t in sorted(p)]))
                                         for b, p in sorted(rows.items())}
                    continue
                if kind in NO_ROOFLINE:  # measured on other shapes only: the model goes without this table
                    continue
            if kind in BATCH_TABLES:
                # Only entries measured on this model's shape apply: glue cost scales with widths, not FLOPs.
                own = {"hidden": model.hidden, "q_heads": model.q_heads, "kv_heads": model.kv_heads,
                       "head_dim": model.head_dim, "mlp": model.intermediate}
                pts = sorted((e["batch"], e["seconds"]) for e in entries
                             if all(e[f] == v for f, v in own.items() if f in e))
                if pts:
                    self._batch_curves[kind] = (np.array([p[0] for p in pts], float), np.array([p[1] for p in pts]))
                continue
            roof = np.array([self._roofline(kind, *_table_fb(kind, e)) for e in entries])
            eff = roof / np.array([e["seconds"] for e in entries])
            order = np.argsort(roof)
            self._curves[kind] = (roof[order], np.minimum(eff[order], 1.0))

    def _roofline(self, kind, flops, bytes_):
        thr = self.p.matmul_flops if kind in _MATMUL_KINDS else self.p.vector_flops
        return np.maximum(np.asarray(flops, dtype=np.float64) / thr, np.asarray(bytes_, dtype=np.float64) / self.p.hbm_Bps)

    def op_time(self, kind: str, flops, bytes_, kernels: int = 1) -> np.ndarray:
        """Seconds for one operator: calibrated efficiency when the profile has a table, else roofline + launches."""
        roof = self._roofline(kind, flops, bytes_)
        curve = self._curves.get(kind)
        if curve is None:
            return roof + kernels * self.p.launch_s
        xs, effs = curve
        if len(xs) == 1:
            eff = np.full(np.shape(roof), effs[0])
        else:
            eff = np.interp(np.log(np.maximum(roof, 1e-12)), np.log(xs), effs)
        return roof / eff

    def grid_time(self, kind: str, batch: int, context) -> np.ndarray | None:
        """Seconds of ``kind`` for ``batch`` rows at mean ``context`` (array over steps) from its (batch, context)
        table, or None when the profile has none for this model shape."""
        grid = self._grids.get(kind)
        if grid is None:
            return None
        # A batch row measured only at shorter contexts would be extrapolated far along its last segment, which
        # follows the costs of short rows (launch, top-k start), not the per-key reads that dominate long ones: where
        # other rows were measured near the asked context, interpolate in batch between those alone.
        reach = float(np.max(context)) * (1.0 - REACH)
        near = {b: v for b, v in grid.items() if v[0][-1] >= reach}
        if near and len(near) < len(grid):
            grid = near
        bs = np.array(list(grid))
        at = np.array([_linear(*grid[b], context) for b in bs])  # [batches, steps]
        if len(bs) == 1 or batch > bs[-1]:
            # Past the largest measured batch, the cost per row stays that batch's: the trend between two smaller
            # batches (where a kernel is further from its peak) would run on below the bytes' own time.
            return np.maximum(at[-1] * batch / bs[-1], 0.0)
        i = int(np.clip(np.searchsorted(bs, batch) - 1, 0, len(bs) - 2))
        t = at[i] + (at[i + 1] - at[i]) * (batch - bs[i]) / (bs[i + 1] - bs[i])
        return np.maximum(t, 0.0)

    def reach_notes(self, batch: int, context: float) -> list[str]:
        """Where this configuration's per-micro-batch ``batch`` and longest ``context`` lie outside what the
        profile's tables measured for this model shape, one sentence each (empty when every table it reads covers
        them): a prediction there rests on the tables' extrapolation rules, not on measured points."""
        kinds = [self.attention_kind if self.cfg.offloaded else "dense_attention"]
        if self.cfg.offloaded:
            kinds.append(self.selection_kind)
        notes = []
        for kind in kinds:
            grid = self._grids.get(kind)
            if grid is None:
                have = kind in self.p.ops
                notes.append(f"{kind}: " + ("measured on other model shapes only" if have else "not calibrated") +
                             ": read off the roofline and an efficiency curve")
                continue
            bmax = max(grid)
            if batch > bmax:
                notes.append(f"{kind}: batch {batch} past the largest measured, {bmax:g} (taken in proportion)")
            if GRID_SECOND.get(kind, "context") == "context":
                cmax = max(float(xs[-1]) for xs, _ in grid.values())
                if context > cmax * (1.0 + REACH):
                    notes.append(f"{kind}: context {context:,.0f} past the longest measured, {cmax:,.0f} "
                                 f"(extrapolated along its last segment)")
            else:
                kmax = max(float(xs[-1]) for xs, _ in grid.values())
                if self.cfg.k > kmax:
                    notes.append(f"{kind}: k {self.cfg.k} past the largest measured, {kmax:g}")
        return notes

    def batch_table(self, kind: str, batch: int) -> float | None:
        """Seconds of a composite per-layer op at ``batch`` from its calibration table, or None without one."""
        curve = self._batch_curves.get(kind)
        if curve is None:
            return None
        bs, ts = curve
        if len(bs) == 1:
            return float(ts[0] * batch / bs[0])
        i = int(np.clip(np.searchsorted(bs, batch) - 1, 0, len(bs) - 2))
        slope = (ts[i + 1] - ts[i]) / (bs[i + 1] - bs[i])
        return float(max(ts[i] + slope * (batch - bs[i]), 0.0))

    def gemm(self, m, n, k):
        return self.op_time("gemm", *_gemm_fb(m, n, k, self.m.dtype_bytes))

    def elementwise(self, bytes_, kernels=1):
        return self.op_time("elementwise", 0.0, bytes_, kernels)

    def layer_ops(self, b: int, ctx_sum: np.ndarray) -> tuple[list[OpCost], list[OpCost]]:
        """Compute-stream ops of one layer for a micro-batch of ``b`` sequences whose contexts sum to ``ctx_sum``
        (one value per step): (ops before the transfers are needed, ops after). Offloaded variants run selection and
        the block-table update before attention; dense runs neither."""
        m, cfg, dt = self.m, self.cfg, self.m.dtype_bytes
        ctx_sum = np.asarray(ctx_sum, dtype=np.float64)
        ones = np.ones_like(ctx_sum)
        qkv_out = (m.q_heads + 2 * m.kv_heads) * m.head_dim
        pre = [
            OpCost("attn_norm", "elementwise", ones * self.elementwise(dt * (2 * b * m.hidden + m.hidden))),
            OpCost("qkv_proj", "gemm", ones * self.gemm(b, qkv_out, m.hidden)),
            # RoPE on q and k, then K and V appended to the tail block: two kernels.
            OpCost("rope", "elementwise", ones * self.elementwise(
                dt * b * m.head_dim * (2 * (m.q_heads + m.kv_heads) + 2 * m.kv_heads), kernels=2)),
        ]
        glue = self.batch_table("layer_glue", b)
        if glue is not None:
            # Calibrated as the decoder really runs it: norms, RoPE, reshapes, residuals, SiLU-mul in one table.
            pre = [OpCost("layer_glue", "elementwise", ones * glue), pre[1]]
        if cfg.offloaded:
            attend_glue = self.batch_table("attend_glue", b)
            if attend_glue is not None:
                pre.append(OpCost("attend_glue", "cache", ones * attend_glue))
            # Compressed keys summed over the micro-batch: n_cmp is affine in context (up to flooring), so b times
            # n_cmp of the mean context equals the per-sequence sum within one key per sequence.
            cmp_sum = _n_cmp(ctx_sum / b) * b
            blocks_sum = ctx_sum / self.block_size + b
            nosa = cfg.variant == "nosa"
            f, by = _select_fb(cmp_sum, blocks_sum, b, m.q_heads, m.kv_heads, m.head_dim, dt, agnostic=nosa,
                               ck_dt=cfg.ckey_bytes(m))
            kind = self.selection_kind
            sel = self.grid_time(kind, b, ctx_sum / b)
            base = kind.removesuffix("_fp8")
            if sel is None and kind != base:
                # fp8 keys on a profile calibrated with bf16 keys only: the bf16 table's time in proportion to the
                # bytes read (the keys are most of them past a few thousand tokens).
                t16 = self.grid_time(base, b, ctx_sum / b)
                if t16 is not None:
                    by16 = _select_fb(cmp_sum, blocks_sum, b, m.q_heads, m.kv_heads, m.head_dim, dt, agnostic=nosa)[1]
                    sel = t16 * by / by16
            if sel is None:
                sel = self.op_time(kind if kind in self._curves else base, f, by, kernels=6 if nosa else 4)
            pre.append(OpCost("selection", "selection", ones * sel))
            rows = b * m.kv_heads
            pre.append(OpCost("block_table", "cache", ones * self.op_time(
                "block_table", 0.0, _table_bytes(rows, cfg.k, cfg.capacity), kernels=2)))
            attn = OpCost("sparse_attention", "attention", ones * self.sparse_attention_time(b))
        else:
            f, by = _attn_fb(ctx_sum, b, m.q_heads, m.kv_heads, m.head_dim, dt)
            t = self.grid_time("dense_attention", b, ctx_sum / b)
            attn = OpCost("dense_attention", "attention",
                          t if t is not None else self.op_time("dense_attention", f, by, kernels=2))
        post = [
            attn,
            OpCost("o_proj", "gemm", ones * self.gemm(b, m.hidden, m.q_heads * m.head_dim)),
            OpCost("mlp_norm", "elementwise", ones * self.elementwise(dt * (2 * b * m.hidden + m.hidden))),
            OpCost("gate_up_proj", "gemm", ones * self.gemm(b, 2 * m.intermediate, m.hidden)),
            OpCost("silu_mul", "elementwise", ones * self.elementwise(dt * 3 * b * m.intermediate)),
            OpCost("down_proj", "gemm", ones * self.gemm(b, m.hidden, m.intermediate)),
        ]
        if glue is not None:  # mlp_norm and silu_mul are inside layer_glue
            post = [op for op in post if op.name not in ("mlp_norm", "silu_mul")]
        return pre, post

    def attention_split(self, b: int, hits: np.ndarray, misses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Attention of a micro-batch of ``b`` sequences split around its gather (``split_attention``): seconds
        before the wait (the resident blocks and the tails) and after it (the copied blocks, then the merge of the
        two softmax results), from ``hits``/``misses`` [..., layers] complete blocks per layer summed over the
        micro-batch's rows. Each part is one attention launch sized by its share of the tokens."""
        m = self.m
        rows = b * m.kv_heads
        hits, misses = np.asarray(hits, dtype=np.float64), np.asarray(misses, dtype=np.float64)
        total = hits + misses + rows  # every row's tail is attended with the resident blocks
        full = self.sparse_attention_time(b)
        # Each pass walks every entry of the plan and loads only its own blocks: the walk's cost (measured alone,
        # when calibrated) plus its share of the full pass's remaining cost.
        walk = self.grid_time("sparse_attention_walk", b, np.full(np.shape(total), float(self.cfg.k)))
        walk = np.zeros(np.shape(total)) if walk is None else np.minimum(walk, full)
        parts = [walk + share * (full - walk) for share in ((hits + rows) / total, misses / total)]
        # The merge reads both partial outputs and log-sum-exps and writes one output.
        merge = self.elementwise(rows * m.group * (3 * m.head_dim * m.dtype_bytes + 12))
        return parts[0], parts[1] + merge

    def _has(self, kind: str) -> bool:
        return kind in self._curves or kind in self._grids

    @property
    def selection_kind(self) -> str:
        """The selection table that describes this configuration: NOSA's own (eviction score, second top-k) when
        calibrated, and the ``_fp8`` form with fp8 compressed keys. Where the profile has no fp8 table,
        ``layer_ops`` takes the bf16 table's time in proportion to the bytes read, never its times as they are
        (which would charge fp8 keys the bf16 keys' reads)."""
        nosa = self.cfg.variant == "nosa" and (self._has("selection_nosa") or self._has("selection_nosa_fp8"))
        base = "selection_nosa" if nosa else "selection"
        if self.cfg.ckey_dtype == "fp8":
            return base + "_fp8"
        return base

    @property
    def attention_kind(self) -> str:
        """The calibration table of the sparse attention kernel: its fp8 one for an fp8 block pool, when measured
        (else the bf16 table, applied to the fp8 kernel's bytes)."""
        if self.block.dtype_bytes == 1 and ("sparse_attention_fp8" in self._curves or
                                             "sparse_attention_fp8" in self._grids):
            return "sparse_attention_fp8"
        return "sparse_attention"

    def sparse_attention_time(self, b: int) -> float:
        """Seconds of one layer's sparse attention for a micro-batch of ``b`` sequences over ``k`` blocks each:
        read off the kernel's (batch, blocks) table when calibrated on this shape (NOSA's bias bytes added in
        proportion), else from the roofline and the table's efficiency curve."""
        m, k = self.m, self.cfg.k
        rows = b * m.kv_heads
        f, by = _attn_fb(b * k * self.block_size, b, m.q_heads, m.kv_heads, m.head_dim, m.dtype_bytes,
                         self.block.dtype_bytes)
        bias = 4.0 * rows * k
        kind = self.attention_kind
        if kind == "sparse_attention" and self.block.dtype_bytes == 1:
            t = None  # the bf16 kernel's table does not describe an fp8 pool's shape-for-shape times
        else:
            t = self.grid_time(kind, b, float(k))
        if t is None:
            return float(self.op_time(kind, f, by + bias, kernels=2))
        return float(t) * (by + bias) / by

    def step_ops(self, b: int, steps: int) -> tuple[list[OpCost], list[OpCost]]:
        """Once-per-step ops around the layers for a micro-batch: (embedding lookup, final norm + LM head)."""
        m, dt = self.m, self.m.dtype_bytes
        ones = np.ones(steps)
        head = [
            OpCost("final_norm", "elementwise", ones * self.elementwise(dt * (2 * b * m.hidden + m.hidden))),
            OpCost("lm_head", "gemm", ones * self.gemm(b, m.vocab, m.hidden)),
        ]
        return [OpCost("embed", "elementwise", ones * self.elementwise(dt * 2 * b * m.hidden))], head

    def gather_time(self, missed_blocks: np.ndarray) -> np.ndarray:
        """H2D gather of the missed blocks of one layer and micro-batch (one kernel), in the block's chunks."""
        b = self.block
        return self.p.h2d.time(b.chunk_bytes, b.chunks_per_block * np.asarray(missed_blocks))

    def writeback_time(self, written_blocks: np.ndarray) -> np.ndarray:
        """D2H writeback of the blocks completed at this step."""
        b = self.block
        return self.p.d2h.time(b.chunk_bytes, b.chunks_per_block * np.asarray(written_blocks))


def class_totals(ops: list[OpCost], steps: int) -> np.ndarray:
    """Sum op seconds per breakdown class: ``[steps, len(CLASSES)]``."""
    out = np.zeros((steps, len(CLASSES)))
    for op in ops:
        out[:, CLASS_INDEX[op.cls]] += np.broadcast_to(op.seconds, (steps,))
    return out
