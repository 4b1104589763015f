"""Block-sparse decode attention: one query token per sequence over a list of KV blocks in the block pool.

One Triton kernel serves every variant and both plan forms. A row (sequence, KV head; ``r = b * H + h``) owns
``S`` pool slots of one 64-token block each (K then V); the ``G`` query heads of its GQA group share each K/V load.

- ``EntryPlan``: ``[R, K]`` slots of the selected complete blocks (-1 padding) and their block ids, plus one tail
  per row (slot, block id, valid tokens). No concatenation is needed to build it. Dense mode (``EntryPlan.dense``)
  has no lists: row ``r`` attends slots ``0 .. tail_block[r] - 1`` as complete blocks whose id is their slot, plus
  its tail, so the dense baseline runs the same kernel as the offloaded variants and the two can't drift apart.
- ``AttentionPlan`` (the original form): entry lists with a valid-token count per entry; the kernel reads the
  counts instead of a tail.

The kernel is memory-bound (a block is 32 KiB of K/V against ~130 kFLOP), so its design is about bytes in flight:
entries are software-pipelined (``num_stages``) and optionally read ``tile_blocks`` at a time, K/V rows are 16-byte
vector loads, and split-K (``program_id(1)``) cuts each row's entries into pieces so that a small batch still
covers every SM. Pieces write (max, sum, acc) partials that one merge kernel combines; with one piece per row the
kernel writes the output directly and there is no second launch. Plans, scales and lengths are device tensors or
fixed per pool, so a launch replays in a CUDA graph with new selections at every step.

Partial attention (``part="hits"`` / ``"misses"`` with a ``miss`` mask) attends the resident blocks while the
missing ones are still being copied, then the copied ones; ``merge_attention`` combines the two halves through their
log-sum-exps, which equals attending all of them at once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .dispatch import kernels_on

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

LOG2E = 1.4426950408889634
PARTS = {"all": 0, "hits": 1, "misses": 2}
MODE_LISTS, MODE_DENSE, MODE_LENS = 0, 1, 2  # EntryPlan with lists, EntryPlan dense, AttentionPlan

# Defaults, the expected best on an H200 (Triton 3.6, sm_90, head dim 128, bf16): one block per iteration and three
# pipeline stages compile to cp.async 16-byte copies into two shared-memory buffers, so the next block's K/V are in
# flight while one is reduced (~70 KiB of shared memory and ~155 registers a program at four warps: three programs
# per SM, six blocks = 192 KiB in flight per SM, well past what HBM latency needs). Two blocks per iteration halve
# the iterations but need ~240 registers (two programs per SM); eight warps halve the registers a thread needs and
# add nothing a memory-bound loop uses. Four stages: three buffers, one program fewer per SM. Split-K: see
# ``choose_splits``. (Figures from compiling for sm_90 with ptxas; the benchmark times each alternative.)
TILE_BLOCKS, NUM_STAGES, NUM_WARPS = 1, 3, 4
WAVES, MIN_ENTRIES = 2.0, 2
PROGRAMS_PER_SM, ROUND_EXCESS, FP8_DOTS_IN_F16 = 3, 1.4, True

if triton is not None:

    @triton.jit
    def _entry(i, slots_row, blocks_row, lens_row, miss_row, hic, last, t_slot, t_block, t_fill, e_of, t_of,
               BS: tl.constexpr, T: tl.constexpr, MODE: tl.constexpr, PART: tl.constexpr, WITH_TAIL: tl.constexpr,
               HAS_BIAS: tl.constexpr):
        """Pool slot, block id and per-token validity of entries ``i .. i + T - 1`` of one row."""
        if T == 1:
            e = i  # scalar entry: the index loads are scalars, K/V one contiguous 16 KiB span each
        else:
            e = i + e_of
        inl = e < hic
        if MODE == 1:
            slot = e.to(tl.int64)
            blk = slot
            ok = inl
        else:
            slot = tl.load(slots_row + e, mask=inl, other=-1).to(tl.int64)
            ok = inl & (slot >= 0)
            blk = slot
            if HAS_BIAS:
                blk = tl.load(blocks_row + e, mask=inl, other=0).to(tl.int64)
        if PART == 1:
            ok = ok & (tl.load(miss_row + e, mask=inl, other=0) == 0)
        if PART == 2:
            ok = ok & (tl.load(miss_row + e, mask=inl, other=0) != 0)
        if MODE == 2:
            n = tl.load(lens_row + e, mask=inl, other=0)
        else:
            n = BS
        if WITH_TAIL:
            is_t = (e == hic) & last
            slot = tl.where(is_t, t_slot, slot)
            blk = tl.where(is_t, t_block, blk)
            n = tl.where(is_t, t_fill, n)
            ok = ok | is_t
        return tl.maximum(slot, 0), blk, ok & (t_of < n)

    @triton.jit
    def _fold(q, m_i, l_i, acc, kk, vv, b, valid, qk_scale, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
        """One tile of K/V (and bias) folded into the running softmax state ``(m_i, l_i, acc)``."""
        if IEEE:
            s = tl.dot(q, tl.trans(kk.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(kk.to(q.dtype)))  # FP8 pools: converted here, after the load
        s = s * qk_scale
        if HAS_BIAS:
            s = s + b[None, :] * 1.4426950408889634
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, vv.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(q.dtype), vv.to(q.dtype))
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def _step(i, q, m_i, l_i, acc, b, row_pool, slots_row, blocks_row, lens_row, miss_row, bias_row, hic, last,
              t_slot, t_block, t_fill, qk_scale, e_of, t_of, offs_d, D: tl.constexpr, BS: tl.constexpr,
              T: tl.constexpr, MODE: tl.constexpr, PART: tl.constexpr, WITH_TAIL: tl.constexpr,
              HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
        """Loop body: entries ``i .. i + T - 1`` folded in; returns the state and the next tile's bias."""
        slot, _, valid = _entry(i, slots_row, blocks_row, lens_row, miss_row, hic, last, t_slot, t_block, t_fill,
                                e_of, t_of, BS, T, MODE, PART, WITH_TAIL, HAS_BIAS)
        # Masked lanes issue no memory traffic: padding, other parts' entries and unfilled tail tokens cost
        # nothing, and whatever those pool bytes hold (NaN included) never reaches the sums.
        if T == 1:
            kv = row_pool + slot * (2 * BS * D) + (t_of * D)[:, None] + offs_d[None, :]
        else:
            kv = row_pool + slot[:, None] * (2 * BS * D) + (t_of * D)[:, None] + offs_d[None, :]
        kk = tl.load(kv, mask=valid[:, None], other=0.0)
        vv = tl.load(kv + BS * D, mask=valid[:, None], other=0.0)
        b_next = b
        if HAS_BIAS:
            _, blk_n, valid_n = _entry(i + T, slots_row, blocks_row, lens_row, miss_row, hic, last, t_slot, t_block,
                                       t_fill, e_of, t_of, BS, T, MODE, PART, WITH_TAIL, HAS_BIAS)
            b_next = tl.load(bias_row + blk_n * BS + t_of, mask=valid_n, other=0.0)
        m_i, l_i, acc = _fold(q, m_i, l_i, acc, kk, vv, b, valid, qk_scale, HAS_BIAS, IEEE)
        return m_i, l_i, acc, b_next

    # Counts and flags are not specialized on (Triton would compile again for a value of 1 or a multiple of 16);
    # strides are, since their divisibility is what lets the K/V and bias loads be 16-byte vectors.
    @triton.jit(do_not_specialize=["NE", "EPS", "want_lse"])
    def _attend_kernel(q_ptr, pool_ptr, slots_ptr, blocks_ptr, lens_ptr, miss_ptr, tslot_ptr, tblock_ptr, tfill_ptr,
                       bias_ptr, out_ptr, lse_ptr, po_ptr, pm_ptr, pl_ptr,
                       NE, EPS, row_stride, list_stride, miss_stride, bias_stride, qk_scale, v_scale, want_lse,
                       G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, T: tl.constexpr,
                       MODE: tl.constexpr, PART: tl.constexpr, WITH_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr,
                       IEEE: tl.constexpr, STAGES: tl.constexpr, INTERP: tl.constexpr, F16: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        sp = tl.program_id(1)
        nsp = tl.num_programs(1)
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, T * BS)
        e_of = offs_n // BS  # which of the tile's T entries a token belongs to
        t_of = offs_n % BS  # its position in the block
        gmask = offs_g < G
        q = tl.load(q_ptr + (r * G + offs_g[:, None]) * D + offs_d[None, :], mask=gmask[:, None], other=0.0)
        if IEEE:
            q = q.to(tl.float32)
        elif F16:
            # FP8 pools: the dots in fp16, whose conversion from e4m3 is cheaper than bf16's (1.3x faster
            # measured); q and the probabilities fit fp16's range, and the sums are fp32 either way.
            q = q.to(tl.float16)
        # Complete entries of this piece: [lo, hic). Dense rows stop at their own tail.
        lo = sp * EPS
        hic = tl.minimum(lo + EPS, NE)
        if MODE == 1:
            hic = tl.maximum(tl.minimum(hic, tl.load(tblock_ptr + r).to(tl.int32)), lo)
        if WITH_TAIL:
            # The last piece takes the tail as one more entry, at index hic, so it is pipelined like the others.
            last = sp == nsp - 1
            hi = hic + last.to(tl.int32)
            t_slot = tl.load(tslot_ptr + r).to(tl.int64)
            t_block = tl.load(tblock_ptr + r).to(tl.int64)
            t_fill = tl.load(tfill_ptr + r).to(tl.int32)
        else:
            last = sp < 0
            hi = hic
            t_slot = 0
            t_block = 0
            t_fill = 0
        # A finite floor instead of -inf keeps exp2(m_old - m_new) defined while only masked tokens have been seen.
        m_i = tl.full([GP], -1.0e30, tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        row_pool = pool_ptr + r * row_stride
        slots_row = slots_ptr + r * list_stride
        blocks_row = blocks_ptr + r * list_stride
        lens_row = lens_ptr + r * list_stride
        miss_row = miss_ptr + r * miss_stride
        bias_row = bias_ptr + r * bias_stride
        b = tl.zeros([T * BS], tl.float32)
        if HAS_BIAS:
            # The bias is prefetched one tile ahead by hand: left to the pipeliner, its block-id load would count
            # as a level of indirection and halve how far ahead the K/V loads are issued.
            _, blk, valid = _entry(lo, slots_row, blocks_row, lens_row, miss_row, hic, last, t_slot, t_block,
                                   t_fill, e_of, t_of, BS, T, MODE, PART, WITH_TAIL, HAS_BIAS)
            b = tl.load(bias_row + blk * BS + t_of, mask=valid, other=0.0)
        if INTERP:
            # Triton's interpreter can't take tensor loop bounds under numpy >= 2 (int() of a 1-element array).
            i = lo
            while i < hi:
                m_i, l_i, acc, b = _step(i, q, m_i, l_i, acc, b, row_pool, slots_row, blocks_row, lens_row, miss_row,
                                         bias_row, hic, last, t_slot, t_block, t_fill, qk_scale, e_of, t_of, offs_d,
                                         D, BS, T, MODE, PART, WITH_TAIL, HAS_BIAS, IEEE)
                i += T
        else:
            for i in tl.range(lo, hi, T, num_stages=STAGES):
                m_i, l_i, acc, b = _step(i, q, m_i, l_i, acc, b, row_pool, slots_row, blocks_row, lens_row, miss_row,
                                         bias_row, hic, last, t_slot, t_block, t_fill, qk_scale, e_of, t_of, offs_d,
                                         D, BS, T, MODE, PART, WITH_TAIL, HAS_BIAS, IEEE)
        acc = acc * v_scale
        # Runtime branches, not specializations: the epilogue runs once per program, and every constexpr doubles
        # the compiles a process pays for (each ~2 s).
        if nsp > 1:
            part = r * nsp + sp
            tl.store(po_ptr + (part * G + offs_g[:, None]) * D + offs_d[None, :], acc, mask=gmask[:, None])
            tl.store(pm_ptr + part * G + offs_g, m_i, mask=gmask)
            tl.store(pl_ptr + part * G + offs_g, l_i, mask=gmask)
        else:
            seen = l_i > 0
            o = acc / tl.where(seen, l_i, 1.0)[:, None]
            tl.store(out_ptr + (r * G + offs_g[:, None]) * D + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=gmask[:, None])
            if want_lse != 0:
                lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
                tl.store(lse_ptr + r * G + offs_g, lse, mask=gmask)

    @triton.jit(do_not_specialize=["NSP", "want_lse"])
    def _merge_splits_kernel(po_ptr, pm_ptr, pl_ptr, out_ptr, lse_ptr, NSP, want_lse,
                             G: tl.constexpr, D: tl.constexpr, SP2: tl.constexpr, SB: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        offs_s = tl.arange(0, SP2)
        offs_d = tl.arange(0, D)
        smask = offs_s < NSP
        # Maxima are in log2 units with the kernel's -1e30 floor, so an empty piece weighs exp2(-huge) = 0.
        m = tl.load(pm_ptr + (r * NSP + offs_s) * G + g, mask=smask, other=-1.0e30)
        mx = tl.max(m, 0)
        lsum = tl.sum(tl.load(pl_ptr + (r * NSP + offs_s) * G + g, mask=smask, other=0.0) * tl.exp2(m - mx), 0)
        acc = tl.zeros([D], tl.float32)
        for s0 in tl.static_range(0, SP2, SB):  # bounded tiles: SP2 x D at once would not fit the registers
            offs = s0 + tl.arange(0, SB)
            mk = offs < NSP
            w = tl.exp2(tl.load(pm_ptr + (r * NSP + offs) * G + g, mask=mk, other=-1.0e30) - mx)
            tile = tl.load(po_ptr + ((r * NSP + offs) * G + g)[:, None] * D + offs_d[None, :], mask=mk[:, None],
                           other=0.0)
            acc += tl.sum(tile * w[:, None], 0)
        seen = lsum > 0
        tl.store(out_ptr + (r * G + g) * D + offs_d, (acc / tl.where(seen, lsum, 1.0)).to(out_ptr.dtype.element_ty))
        if want_lse != 0:
            lse = tl.where(seen, (mx + tl.log2(tl.where(seen, lsum, 1.0))) * 0.6931471805599453, float("-inf"))
            tl.store(lse_ptr + r * G + g, lse)

    @triton.jit
    def _merge_pair_kernel(oa_ptr, la_ptr, ob_ptr, lb_ptr, out_ptr, lse_ptr, N,
                           D: tl.constexpr, DP: tl.constexpr, RB: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * RB + tl.arange(0, RB)
        offs_d = tl.arange(0, DP)
        rmask = rows < N
        m2 = rmask[:, None] & (offs_d < D)[None, :]
        la = tl.load(la_ptr + rows, mask=rmask, other=float("-inf"))
        lb = tl.load(lb_ptr + rows, mask=rmask, other=float("-inf"))
        mx = tl.maximum(la, lb)
        mx = tl.where(mx == float("-inf"), 0.0, mx)  # both sides empty: weights exp(-inf) = 0, no NaN
        wa = tl.exp(la - mx)
        wb = tl.exp(lb - mx)
        off = rows[:, None] * D + offs_d[None, :]
        oa = tl.load(oa_ptr + off, mask=m2, other=0.0).to(tl.float32)
        ob = tl.load(ob_ptr + off, mask=m2, other=0.0).to(tl.float32)
        # An empty side contributes nothing, whatever its output holds.
        num = tl.where(wa[:, None] > 0, oa * wa[:, None], 0.0) + tl.where(wb[:, None] > 0, ob * wb[:, None], 0.0)
        den = wa + wb
        seen = den > 0
        tl.store(out_ptr + off, (num / tl.where(seen, den, 1.0)[:, None]).to(out_ptr.dtype.element_ty), mask=m2)
        tl.store(lse_ptr + rows, tl.where(seen, mx + tl.log(tl.where(seen, den, 1.0)), float("-inf")), mask=rmask)


@dataclass
class AttentionPlan:
    """Entry lists of one layer, ``[R, NE]`` each; built on the GPU every step, read by the kernel."""

    slots: torch.Tensor  # int32/64 pool slot per entry (-1 padding)
    lens: torch.Tensor  # int32 valid tokens per entry (0 for padding)
    blocks: torch.Tensor  # int32/64 block id per entry (bias lookup)


@dataclass
class EntryPlan:
    """Selected complete blocks plus one tail per row, without concatenation. ``slots is None``: dense mode.

    ``slots``/``blocks`` ``[R, K]`` int32/64: pool slot and block id of each selected complete block (-1 padding;
    block ids index the bias); ``tail_slot``/``tail_block`` ``[R]``: where the row's partial last block lives and
    its id; ``tail_fill`` ``[R]``: its valid tokens (1 .. block size).
    """

    slots: torch.Tensor | None
    blocks: torch.Tensor | None
    tail_slot: torch.Tensor
    tail_block: torch.Tensor
    tail_fill: torch.Tensor

    @classmethod
    def dense(cls, tail_block: torch.Tensor, tail_fill: torch.Tensor, tail_slot: torch.Tensor | None = None):
        """Row ``r`` attends slots ``0 .. tail_block[r] - 1`` (block id = slot) and its tail (slot ``tail_slot``,
        by default ``tail_block``: the dense layout keeps block ``i`` in slot ``i``)."""
        return cls(None, None, tail_block if tail_slot is None else tail_slot, tail_block, tail_fill)

    @property
    def is_dense(self) -> bool:
        return self.slots is None


def pick_splits(rows: int, entries: int, sms: int = 132) -> int:
    """Pieces per row: enough programs for about four waves' worth of SMs, never under 4 entries a piece."""
    return max(1, min(math.ceil(4 * sms / rows), entries // 4 if entries >= 8 else 1))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sms(device) -> int:
    """SMs of ``device`` (read once per device); 132, an H200's, for CPU tensors (the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_splits(rows: int, entries: int, sms: int = 132, *, waves: float = WAVES,
                  min_entries: int = MIN_ENTRIES) -> int:
    """Pieces per row for split-K: about ``waves`` programs per SM in all, never fewer than ``min_entries`` entries
    a piece, and no empty piece. At the defaults three programs fit an SM, each with two blocks in flight, so two
    per SM already keep more bytes in flight than HBM latency needs; more pieces only add partials to write and
    merge. A small batch gets short pieces (batch 1, K = 64: 32 pieces of 2 entries, 256 programs); from
    ``rows >= waves * sms`` (batch 33 at 8 KV heads) a row is one piece, written directly, with no merge launch."""
    if rows < 1 or entries < 0:
        raise ValueError(f"choose_splits: rows must be >= 1 and entries >= 0, got rows={rows}, entries={entries}")
    want = max(1, math.ceil(waves * sms / rows))
    splits = max(1, min(want, entries // max(1, min_entries)))
    eps = max(1, math.ceil(entries / splits))
    return max(1, math.ceil(entries / eps))


@dataclass(frozen=True)
class LaunchConfig:
    splits: int
    num_stages: int
    num_warps: int
    f16: bool


def launch_config(rows: int, entries: int, sms: int = 132, *, fp8: bool = False, waves: float | None = None,
                  min_entries: int = MIN_ENTRIES) -> LaunchConfig:
    """The kernel's launch for ``rows`` rows of ``entries`` entries: pieces per row, pipeline stages, warps, and
    whether an FP8 pool's dots run in fp16. One function, so the calibration times what the decoder launches."""
    w = WAVES if waves is None else waves
    splits = choose_splits(rows, entries, sms, waves=w, min_entries=min_entries)
    stages = NUM_STAGES
    # Three default programs fit an SM. A grid a third or so past one full round of them runs as one full round
    # plus a short second one; measured on an H200 (benchmarks/bench_tune.py), both ways out are 13-20% faster:
    # fewer pieces per row where a row has several (batch 32: one piece, one round, no merge launch), else four
    # stages, two programs per SM, in two even rounds (batch 64). FP8 pools at four stages gained nothing.
    slots = PROGRAMS_PER_SM * sms
    if waves is None and slots < rows * splits < ROUND_EXCESS * slots:
        if splits > 1 and slots // rows >= 1:
            splits = min(splits - 1, slots // rows)
        elif not fp8:
            stages = 4
    # FP8 pools: the dots in fp16 measured 1.28-1.38x faster than in bf16 (its conversion is the costly part).
    return LaunchConfig(splits, stages, NUM_WARPS, FP8_DOTS_IN_F16)


def _check_pool(q: torch.Tensor, pool: torch.Tensor, fn: str) -> None:
    if q.dim() != 3:
        raise ValueError(f"{fn}: q must be [R, G, D], got {tuple(q.shape)}")
    R, G, D = q.shape
    if pool.dim() != 5 or pool.shape[0] != R or pool.shape[2] != 2 or pool.shape[4] != D:
        raise ValueError(f"{fn}: pool must be [R={R}, slots, 2, block, D={D}], got {tuple(pool.shape)}")


def _launch(q, pool, mode, slots, blocks, lens, miss, part, tails, bias, *, scale, k_scale, v_scale, return_lse,
            splits, tile_blocks, num_stages, num_warps, waves, min_entries, out, f16=None):
    """One kernel launch (plus one merge launch when a row is cut into pieces); returns ``(out, lse or None)``."""
    R, G, D = q.shape
    _, S, _, BS, _ = pool.shape
    if pool.stride()[1:] != (2 * BS * D, BS * D, D, 1):
        raise ValueError(f"pool: the last four dims must be contiguous (a row slice of a pool is fine), strides "
                         f"{pool.stride()}")
    if pool.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise ValueError(f"pool: dtype must be q's ({q.dtype}) or torch.float8_e4m3fn, got {pool.dtype}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"q: dtype must be float32, bfloat16 or float16, got {q.dtype}")
    for name, n in (("head_dim", D), ("block size", BS)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"pool: {name} must be a power of two >= 16, got {n}")
    if tile_blocks < 1 or tile_blocks & (tile_blocks - 1):
        raise ValueError(f"tile_blocks must be a power of two >= 1, got {tile_blocks}")
    NE = S if mode == MODE_DENSE else slots.shape[1]
    fp8 = pool.dtype == torch.float8_e4m3fn
    cfg = launch_config(R, NE, device_sms(q.device), fp8=fp8, waves=waves, min_entries=min_entries)
    splits = cfg.splits if splits is None else splits
    num_stages = cfg.num_stages if num_stages is None else num_stages
    num_warps = cfg.num_warps if num_warps is None else num_warps
    f16 = (cfg.f16 if f16 is None else f16) and fp8
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    eps = max(1, math.ceil(NE / splits))
    splits = max(1, math.ceil(NE / eps))  # no empty piece
    dev = q.device
    if out is None:
        out = torch.empty((R, G, D), dtype=q.dtype, device=dev)
    elif out.shape != (R, G, D) or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out: must be a contiguous {q.dtype} [{R}, {G}, {D}], got {out.dtype} {tuple(out.shape)}")
    # Unused pointers get stand-ins of the same dtype in every call (the lse buffer, allocated even when not
    # returned), so one compiled kernel serves split and unsplit launches, with and without lse.
    lse = torch.empty((R, G), dtype=torch.float32, device=dev)
    split = splits > 1
    if split:
        po = torch.empty((R, splits, G, D), dtype=torch.float32, device=dev)
        pm = torch.empty((R, splits, G), dtype=torch.float32, device=dev)
        pl = torch.empty_like(pm)
    else:
        po = pm = pl = lse
    dummy = lse
    lists = [x.contiguous() if x is not None else None for x in (slots, blocks, lens)]
    slots, blocks, lens = lists
    t_slot, t_block, t_fill = [t.contiguous() for t in tails] if tails is not None else (dummy,) * 3
    if miss is not None:
        miss = miss.contiguous()
    GP = max(16, triton.next_power_of_2(G))  # tl.dot needs 16 rows; the kernel is memory-bound, padding is free
    has_bias = bias is not None
    # fp32 inputs get fp32 dots; so do CPU tensors (Triton's interpreter multiplies bf16 tl.dot operands as raw
    # integers), which also take a while loop instead of tl.range (its interpreter needs Python ints as bounds).
    ieee = q.dtype == torch.float32 or not q.is_cuda
    _attend_kernel[(R, splits)](
        q.contiguous(), pool, slots if slots is not None else dummy, blocks if blocks is not None else dummy,
        lens if lens is not None else dummy, miss if miss is not None else dummy, t_slot, t_block, t_fill,
        bias if has_bias else dummy, out, lse, po, pm, pl,
        NE, eps, pool.stride(0), slots.stride(0) if slots is not None else 0,
        miss.stride(0) if miss is not None else 0, bias.stride(0) if has_bias else 0,
        scale * k_scale * LOG2E, v_scale, int(return_lse),
        G=G, GP=GP, D=D, BS=BS, T=tile_blocks, MODE=mode, PART=PARTS[part],
        WITH_TAIL=mode != MODE_LENS and part != "misses", HAS_BIAS=has_bias,
        IEEE=ieee, STAGES=num_stages, INTERP=not q.is_cuda, F16=bool(f16) and not ieee, num_warps=num_warps)
    if split:
        _merge_splits_kernel[(R, G)](po, pm, pl, out, lse, splits, int(return_lse),
                                     G=G, D=D, SP2=max(16, triton.next_power_of_2(splits)), SB=16, num_warps=4)
    return out, (lse if return_lse else None)


def decode_attention(q: torch.Tensor, pool: torch.Tensor, plan: EntryPlan, bias: torch.Tensor | None = None, *,
                     miss: torch.Tensor | None = None, part: str = "all", return_lse: bool = False,
                     k_scale: float = 1.0, v_scale: float = 1.0, scale: float | None = None,
                     splits: int | None = None, use_triton: bool | None = None, out: torch.Tensor | None = None,
                     tile_blocks: int = TILE_BLOCKS, num_stages: int | None = None, num_warps: int | None = None,
                     waves: float | None = None, min_entries: int = MIN_ENTRIES, f16: bool | None = None):
    """Attention of ``q [R, G, D]`` over ``plan``'s blocks of ``pool [R, S, 2, BS, D]``.

    ``bias`` float32 ``[R, NB * BS]``: NOSA's additive per-token logit bias, indexed by block id (the tail's too).
    ``miss`` bool ``[R, K]`` with ``part``: ``"hits"`` attends the entries with ``miss`` False plus the tail,
    ``"misses"`` only those with ``miss`` True (no tail), ``"all"`` everything. A ``torch.float8_e4m3fn`` pool
    is converted to ``q``'s dtype after loading, K scaled by ``k_scale`` and V by ``v_scale`` (fixed per pool).
    Returns ``[R, G, D]`` in ``q``'s dtype (into ``out`` when given), and with ``return_lse`` also the natural
    log-sum-exp ``[R, G]`` float32 of the scaled, biased logits (-inf where a row attended nothing; its output is
    then 0), for ``merge_attention``.

    Knobs (for benchmarks; left at None, ``launch_config`` picks them from the rows and entries): ``tile_blocks``
    blocks per loop iteration, ``num_stages`` software-pipeline depth over iterations, ``num_warps``, ``splits``
    pieces per row, ``waves`` the programs per SM that ``choose_splits`` aims at, ``f16`` the dots of an FP8 pool
    in fp16 rather than in q's dtype.
    """
    _check_pool(q, pool, "decode_attention")
    R = pool.shape[0]
    if part not in PARTS:
        raise ValueError(f"part must be one of {sorted(PARTS)}, got {part!r}")
    for name in ("tail_slot", "tail_block", "tail_fill"):
        t = getattr(plan, name)
        if t.shape != (R,):
            raise ValueError(f"plan.{name} must be [R={R}], got {tuple(t.shape)}")
    if plan.is_dense:
        if part != "all" or miss is not None:
            raise ValueError("miss/part: dense plans have no entry lists to split into hits and misses")
    else:
        K = plan.slots.shape[1] if plan.slots.dim() == 2 else -1
        if plan.slots.shape != (R, K):
            raise ValueError(f"plan.slots must be [R={R}, K], got {tuple(plan.slots.shape)}")
        if plan.blocks is None or plan.blocks.shape != (R, K):
            raise ValueError(f"plan.blocks must be [R={R}, K={K}], got "
                             f"{None if plan.blocks is None else tuple(plan.blocks.shape)}")
        if part != "all" and (miss is None or miss.shape != (R, K)):
            raise ValueError(f"miss must be a bool [R={R}, K={K}] with part={part!r}, got "
                             f"{None if miss is None else tuple(miss.shape)}")
    if part == "all":
        miss = None
    if bias is not None and (bias.dim() != 2 or bias.shape[0] != R or bias.stride(1) != 1):
        raise ValueError(f"bias must be [R={R}, blocks * block] with unit column stride, got {tuple(bias.shape)}")
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    if use_triton is None:
        use_triton = triton is not None and kernels_on(q)
    if not use_triton:
        o, lse = reference_decode_attention(q, pool, plan, bias, miss=miss, part=part, scale=scale, k_scale=k_scale,
                                            v_scale=v_scale)
        o = o.to(q.dtype)
        if out is not None:
            o = out.copy_(o)
        return (o, lse) if return_lse else o
    mode = MODE_DENSE if plan.is_dense else MODE_LISTS
    o, lse = _launch(q, pool, mode, plan.slots, plan.blocks, None, miss, part,
                     (plan.tail_slot, plan.tail_block, plan.tail_fill), bias, scale=scale, k_scale=k_scale,
                     v_scale=v_scale, return_lse=return_lse, splits=splits, tile_blocks=tile_blocks,
                     num_stages=num_stages, num_warps=num_warps, waves=waves, min_entries=min_entries, out=out,
                     f16=f16)
    return (o, lse) if return_lse else o


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, *,
                    use_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint token sets from each set's output ``[R, G, D]`` and log-sum-exp
    ``[R, G]`` (one launch). A side that attended nothing (lse -inf) contributes nothing; both empty: 0, -inf.
    Returns ``(out, lse)``, ``out`` in ``out_a``'s dtype."""
    if out_a.shape != out_b.shape or out_a.dim() != 3:
        raise ValueError(f"out_b must match out_a's [R, G, D] {tuple(out_a.shape)}, got {tuple(out_b.shape)}")
    if lse_a.shape != out_a.shape[:2] or lse_b.shape != out_a.shape[:2]:
        raise ValueError(f"lse_a/lse_b must be [R, G] = {tuple(out_a.shape[:2])}, got {tuple(lse_a.shape)} and "
                         f"{tuple(lse_b.shape)}")
    if use_triton is None:
        use_triton = triton is not None and kernels_on(out_a)
    if not use_triton:
        mx = torch.maximum(lse_a, lse_b).float()
        mx = torch.where(torch.isneginf(mx), 0.0, mx)
        wa, wb = torch.exp(lse_a.float() - mx), torch.exp(lse_b.float() - mx)
        num = (torch.where(wa[..., None] > 0, out_a.float() * wa[..., None], 0.0)
               + torch.where(wb[..., None] > 0, out_b.float() * wb[..., None], 0.0))
        den = wa + wb
        seen = den > 0
        o = num / torch.where(seen, den, 1.0)[..., None]
        return o.to(out_a.dtype), torch.where(seen, mx + torch.log(torch.where(seen, den, 1.0)), float("-inf"))
    R, G, D = out_a.shape
    out = torch.empty_like(out_a, memory_format=torch.contiguous_format)
    lse = torch.empty((R, G), dtype=torch.float32, device=out_a.device)
    N, RB = R * G, 16
    _merge_pair_kernel[(triton.cdiv(N, RB),)](out_a.contiguous(), lse_a.float().contiguous(), out_b.contiguous(),
                                              lse_b.float().contiguous(), out, lse, N, D=D,
                                              DP=triton.next_power_of_2(D), RB=RB, num_warps=4)
    return out, lse


def sparse_decode_attention(q: torch.Tensor, pool: torch.Tensor, plan: AttentionPlan, bias: torch.Tensor | None = None,
                            *, splits: int | None = None, scale: float | None = None,
                            use_triton: bool | None = None, num_warps: int = NUM_WARPS,
                            num_stages: int = NUM_STAGES) -> torch.Tensor:
    """Attention of ``q [R, G, D]`` over the planned blocks of ``pool [R, S, 2, BS, D]`` (the original plan form:
    the same kernel reads each entry's valid-token count instead of a tail).

    ``bias`` float32 ``[R, NB * BS]``: additive per-token logit bias (NOSA), indexed by block id. Returns
    ``[R, G, D]`` in ``q``'s dtype.
    """
    _check_pool(q, pool, "sparse_decode_attention")
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    if use_triton is None:
        use_triton = triton is not None and kernels_on(q)
    if not use_triton:
        return reference_attention(q, pool, plan, bias, scale=scale).to(q.dtype)
    out, _ = _launch(q, pool, MODE_LENS, plan.slots, plan.blocks, plan.lens, None, "all", None, bias, scale=scale,
                     k_scale=1.0, v_scale=1.0, return_lse=False, splits=splits, tile_blocks=TILE_BLOCKS,
                     num_stages=num_stages, num_warps=num_warps, waves=WAVES, min_entries=MIN_ENTRIES, out=None)
    return out


def _attend_lists(q, pool, slots, lens, blocks, bias, scale, k_scale, v_scale, dtype):
    """Gather + softmax over entry lists ``[R, NE]`` in torch, computed in ``dtype``: ``(out, lse)``. Tokens
    outside the lists are zeroed before use, so pool contents there (NaN included) can't leak; rows with no
    token give 0 and -inf."""
    R, G, D = q.shape
    BS = pool.shape[3]
    NE = slots.shape[1]
    rows = torch.arange(R, device=q.device)[:, None]
    tok = torch.arange(BS, device=q.device)
    valid = ((tok < lens.long()[..., None]) & (slots[..., None] >= 0)).reshape(R, NE * BS)
    kv = pool[rows, slots.long().clamp(min=0)].to(dtype)  # [R, NE, 2, BS, D]
    k = kv[:, :, 0].reshape(R, NE * BS, D).masked_fill(~valid[..., None], 0.0)
    v = kv[:, :, 1].reshape(R, NE * BS, D).masked_fill(~valid[..., None], 0.0)
    s = torch.einsum("rgd,rtd->rgt", q.to(dtype), k) * (scale * k_scale)
    if bias is not None:
        idx = (blocks.long().clamp(min=0)[..., None] * BS + tok).reshape(R, NE * BS)
        s = s + bias.to(dtype).gather(1, idx)[:, None, :]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)  # [R, G]
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    return torch.einsum("rgt,rtd->rgd", p, v) * v_scale, lse


def reference_attention(q, pool, plan: AttentionPlan, bias=None, *, scale: float | None = None,
                        dtype=torch.float32) -> torch.Tensor:
    """Gather + softmax attention in torch (the CPU path and the kernel's reference), computed in ``dtype``."""
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    return _attend_lists(q, pool, plan.slots, plan.lens, plan.blocks, bias, scale, 1.0, 1.0, dtype)[0]


def entry_lists(plan: EntryPlan, slots_per_row: int, block: int, miss: torch.Tensor | None = None,
                part: str = "all") -> AttentionPlan:
    """``plan`` (and a part of it) as explicit entry lists with per-entry lengths: the reference's view."""
    R = plan.tail_fill.shape[0]
    dev = plan.tail_fill.device
    if plan.is_dense:
        e = torch.arange(slots_per_row, device=dev).expand(R, -1)
        slots, blocks = e, e
        lens = torch.where(e < plan.tail_block.long()[:, None], block, 0)
    else:
        slots, blocks = plan.slots.long(), plan.blocks.long()
        lens = torch.where(slots >= 0, block, 0)
    if part == "hits":
        lens = torch.where(miss.bool(), 0, lens)
    elif part == "misses":
        lens = torch.where(miss.bool(), lens, 0)
    if part != "misses":
        slots = torch.cat([slots, plan.tail_slot.long()[:, None]], 1)
        blocks = torch.cat([blocks, plan.tail_block.long()[:, None]], 1)
        lens = torch.cat([lens, plan.tail_fill.long()[:, None]], 1)
    return AttentionPlan(slots, lens, blocks)


def reference_decode_attention(q, pool, plan: EntryPlan, bias=None, *, miss=None, part: str = "all",
                               scale: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
                               dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode_attention`` in torch (its CPU path), computed in ``dtype``: ``(out, lse)``."""
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    ap = entry_lists(plan, pool.shape[1], pool.shape[3], miss, part)
    return _attend_lists(q, pool, ap.slots, ap.lens, ap.blocks, bias, scale, k_scale, v_scale, dtype)
