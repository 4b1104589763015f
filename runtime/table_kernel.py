"""One Triton program per row performs ``blockcache.update_table`` for that row: the same decisions, bit for bit.

Why a kernel: the torch version is a chain of ~25 small launches (an ``[R, C + 1, K]`` equality tensor, an argsort of
packed keys, a cumsum, scatters), each bound by launch latency and memory round trips, 0.12-0.23 ms per layer on an
H100. A row's whole problem fits in one program's registers: ``C + 1 <= 256`` candidates and ``K`` selections,
padded to powers of two (CP, KP); one launch costs 4.5-6.5 us per layer at 128-768 rows (benchmarks/bench_table.py).
How each torch step is recomputed:

- hits: the ``[CP, KP]`` compare of candidates and selections, on 32-bit copies of the ids (ids are below 2^16;
  32-bit halves the registers of the 2-D tensors, which is what limits the program);
- the kept unselected candidates: the selected ones always stay, and ``room = C - misses - hits`` others with the
  largest packed keys join them. Keys are unique (the block id is their last component), so the torch argsort's
  "rank < C - n_miss" is "key >= the room-th largest key of the others": one sort of CP keys, not CP^2 compares;
- free slots in index order: sorting the free slots' indices lists them in order; the kept tail takes the first,
  and a miss whose inclusive miss count is ``n`` takes entry ``n - 1`` (shifted by one when the tail was kept).

All loads happen first, then a barrier, then the stores, so no thread reads a slot or statistic that another thread
of the program has already rewritten; a second barrier orders the scatter of the misses after the rewrite of the
row's slots. The completed tail's ``last = step - 1`` is applied in registers before ranking, as the torch code does
in memory, and stored once at the end; when that address is also written for a selected block (or both are the
scratch column), only the later value, ``step``, is stored, so the two stores never race.
"""

from __future__ import annotations

import torch

from nosasim import contract

try:  # Triton is only on GPU machines (and in the CPU interpreter for tests); blockcache's torch path is the fallback.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

POLICY_CODES = {p: contract.POLICY_CODES[p] for p in contract.ONLINE_POLICIES}  # the kernel's POLICY constexpr

if triton is not None:

    @triton.jit
    def _float_key(x):
        # Order-preserving integer image of float32 (blockcache._float_key): -0.0 ties +0.0, NaN reads as -inf.
        bits = x.to(tl.int32, bitcast=True)
        bits = tl.where(x == 0.0, 0, bits)
        bits = tl.where(x != x, -8388608, bits)  # noqa: PLR0124 - NaN test; 0xFF800000 is -inf
        b = bits.to(tl.int64)
        # Negative floats order backwards in their bit pattern: flip all but the sign bit.
        return tl.where(b < 0, b ^ 0x7FFFFFFF, b)

    @triton.jit
    def _keep_key(cand, cvalid, row_last, row_count, row_static, l_c, c_c, st_c, step, done, old_tail,
                  POLICY: tl.constexpr):
        # Packed keep key of each valid candidate (larger is kept), as blockcache.keep_key reads it after the
        # completed tail's ``last`` was set to step - 1.
        idx = tl.where(cvalid, cand, 0)
        if POLICY == 3:
            score = tl.load(row_static + idx * st_c, mask=cvalid, other=0.0)
            return _float_key(score) * 65536 + cand
        last = tl.load(row_last + idx * l_c, mask=cvalid, other=0)
        last = tl.where(done & (cand == old_tail), step - 1, last)
        if POLICY == 1:
            return last * 65536 + cand
        count = tl.load(row_count + idx * c_c, mask=cvalid, other=0)
        return count * 140737488355328 + (last + 1) * 65536 + cand  # 140737488355328 = 2^47

    @triton.jit
    def _update_table_kernel(slot_ptr, s_r, s_c, last_ptr, l_r, l_c, count_ptr, c_r, c_c, static_ptr, st_r, st_c,
                             sel_ptr, se_r, se_c, done_ptr, d_r, old_ptr, o_r, step_ptr,
                             sel_slot_ptr, miss_ptr, tail_dst_ptr, n_miss_ptr, bad_ptr, C, K, NB,
                             POLICY: tl.constexpr, CP: tl.constexpr, KP: tl.constexpr, CHECK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_slot = slot_ptr + row * s_r
        row_last = last_ptr + row * l_r
        row_count = count_ptr + row * c_r
        step = tl.load(step_ptr).to(tl.int64)
        done = tl.load(done_ptr + row * d_r) != 0
        old_tail = tl.load(old_ptr + row * o_r).to(tl.int64)

        # Candidates: the C regular slots, then the completed tail (index C), then padding (-1).
        i = tl.arange(0, CP)
        reg = i < C
        cand = tl.load(row_slot + i * s_c, mask=reg, other=-1).to(tl.int64)
        cand = tl.where(i == C, tl.where(done, old_tail, -1), cand)
        cvalid = cand >= 0
        j = tl.arange(0, KP)
        in_k = j < K
        sel = tl.load(sel_ptr + row * se_r + j * se_c, mask=in_k, other=-1).to(tl.int64)
        valid = sel >= 0
        # Block ids are below 2^16, so the [CP, KP] work runs on 32-bit copies (half the registers of int64).
        cand32 = cand.to(tl.int32)
        sel32 = sel.to(tl.int32)

        eq = (cand32[:, None] == sel32[None, :]) & cvalid[:, None]  # [CP, KP]
        cand_sel = tl.max(eq.to(tl.int32), axis=1) > 0
        hit_cand = tl.min(tl.where(eq, i[:, None], CP), axis=0)  # candidates are distinct: at most one matches
        hit = hit_cand < CP
        miss = valid & (hit == 0)
        miss_i = miss.to(tl.int32)
        n_miss = tl.sum(miss_i, axis=0)

        if POLICY == 0:
            keep = cand_sel  # prev: exactly the selected candidates
        else:
            # The selected candidates stay; the ``room`` unselected ones with the largest keys fill what the misses
            # leave of the C slots. Keys are unique, so "among the room largest" is "key >= the room-th largest".
            key = _keep_key(cand, cvalid, row_last, row_count, static_ptr + row * st_r, l_c, c_c, st_c, step, done,
                            old_tail, POLICY)
            other = cvalid & (cand_sel == 0)
            room = C - n_miss - tl.sum(cand_sel.to(tl.int32), axis=0)
            ranked = tl.sort(tl.where(other, key, -4611686018427387904), descending=True)  # -2^62: below any key
            cut = tl.sum(tl.where(i == room - 1, ranked, 0), axis=0)
            keep = cand_sel | (other & (room > 0) & (key >= cut))

        # Free regular slots in index order take the kept tail first, then the misses in selection order.
        tail_keep = tl.sum((keep & (i == C)).to(tl.int32), axis=0) > 0
        free = reg & (keep == 0)
        free_slots = tl.sort(tl.where(free, i, CP))  # the free slots ascending, then CP
        turn = tl.cumsum(miss_i, axis=0) - 1 + tail_keep.to(tl.int32)
        miss_slot = tl.where(miss, tl.gather(free_slots, tl.minimum(tl.maximum(turn, 0), CP - 1), 0), -1)
        tail_dst = tl.where(tail_keep, tl.min(tl.where(free, i, CP), axis=0), -1)
        sel_slot = tl.where(hit, tl.where(hit_cand == C, tail_dst, hit_cand), miss_slot)
        # Slots keep their block, receive the tail, or empty; the misses are scattered in after a barrier.
        new = tl.where(keep & reg, cand, tl.where(i == tail_dst, old_tail, -1))
        miss_to = miss & (miss_slot < C)  # always, unless a selection outgrew C

        # Every read above is complete before any thread of the program overwrites what it read.
        tl.debug_barrier()
        out_k = row * K + j
        tl.store(row_slot + i * s_c, new, mask=reg)
        tl.debug_barrier()
        tl.store(row_slot + miss_slot * s_c, sel, mask=miss_to)
        tl.store(sel_slot_ptr + out_k, sel_slot.to(tl.int64), mask=in_k)
        tl.store(miss_ptr + out_k, miss.to(tl.uint8), mask=in_k)
        tl.store(tail_dst_ptr + row, tail_dst.to(tl.int64))
        tl.store(n_miss_ptr + row, n_miss.to(tl.int64))
        if CHECK:
            n_free = tl.sum(free.to(tl.int32), axis=0)
            tl.store(bad_ptr + row, (n_free < n_miss + tail_keep.to(tl.int32)).to(tl.uint8))

        # Statistics; masked-out entries go to the scratch column NB, as in the torch code.
        sidx = tl.where(valid, sel, NB)
        tail_idx = tl.where(done, old_tail, NB)
        clash = tl.sum(((sidx == tail_idx) & in_k).to(tl.int32), axis=0) > 0
        tl.store(row_last + tail_idx * l_c, step - 1, mask=clash == 0)
        tl.store(row_last + sidx * l_c, tl.zeros([KP], tl.int64) + step, mask=in_k)
        tl.atomic_add(row_count + sidx * c_c, tl.full([KP], 1, tl.int64), mask=valid, sem="relaxed")


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def launch_update(slot_block: torch.Tensor, last: torch.Tensor, count: torch.Tensor, static: torch.Tensor | None,
                  policy: str, sel: torch.Tensor, step: torch.Tensor, tail_done: torch.Tensor, old_tail: torch.Tensor,
                  check: bool = False, num_warps: int = 1):
    """One layer's table update in one launch; updates ``slot_block``, ``last``, ``count`` in place.

    ``slot_block`` [R, C], ``last`` / ``count`` / ``static`` [R, NB + 1]: one layer's tensors, any strides (views of
    row slices are fine). Returns ``(sel_slot, miss, tail_dst, n_miss, bad)``; ``bad`` (bool [R], rows with more
    incoming blocks than free slots) is None unless ``check``. No host sync: the launch shape depends only on shapes,
    so it replays inside a CUDA graph. ``num_warps``: one warp per row was the fastest or within 10% of it from
    128 to 768 rows on an H100 (more warps only spread the same small tensors thinner).
    """
    if triton is None:
        raise RuntimeError("table kernel: triton is not installed")
    if policy not in POLICY_CODES:
        raise ValueError(f"table kernel: policy must be one of {sorted(POLICY_CODES)}, got {policy!r}")
    R, C = slot_block.shape
    K = sel.shape[1]
    nb = last.shape[1] - 1
    if C + 1 > 256:
        raise ValueError(f"table kernel: capacity {C} above the 255 slots one program holds")
    dev = slot_block.device
    sel_slot = torch.empty((R, K), dtype=torch.int64, device=dev)
    miss = torch.empty((R, K), dtype=torch.bool, device=dev)
    tail_dst = torch.empty(R, dtype=torch.int64, device=dev)
    n_miss = torch.empty(R, dtype=torch.int64, device=dev)
    bad = torch.zeros(R, dtype=torch.bool, device=dev) if check else None
    if R == 0:
        return sel_slot, miss, tail_dst, n_miss, bad
    st = static if static is not None and policy == "static" else last  # unread unless policy 'static'
    done = tail_done.view(torch.uint8) if tail_done.dtype == torch.bool else tail_done
    _update_table_kernel[(R,)](
        slot_block, *slot_block.stride(), last, *last.stride(), count, *count.stride(), st, *st.stride(),
        sel, *sel.stride(), done, done.stride(0), old_tail, old_tail.stride(0), step,
        sel_slot, miss.view(torch.uint8), tail_dst, n_miss, bad.view(torch.uint8) if check else n_miss,
        C, K, nb, POLICY=POLICY_CODES[policy], CP=_pow2(C + 1), KP=_pow2(K), CHECK=check, num_warps=num_warps)
    return sel_slot, miss, tail_dst, n_miss, bad
