"""Two small per-layer launches around the block-table update: the trace's selection in, the copy plan out.

Why kernels: in torch each is a chain of 6-12 tiny ops (indexing the trace by the device-side step, masking the
tail, building five index lists with ``torch.where``, recording the loaded-block count), 1-3 us each even replayed
from a CUDA graph. One program per row does each in a single launch.

- ``trace_selection``: the trace's selection of each row at the current step (trace-driven runs): row
  ``r = b * kv_heads + h`` of layer ``l`` reads ``trace[min(step, T - 1), l % Lt, h % Ht, b % Bt]`` (layers, heads
  and sequences mapped cyclically, as ``nosasim.batch`` retargets a trace), with the row's tail id dropped (-1).
- ``copy_plan``: from the table update's decisions, the chunk indices of the layer's three copy lists, in the
  ``runtime.gather.copy_chunks_lists`` form (-1 where nothing moves): the missed blocks host -> pool, the completed
  tail written back pool -> host, and the completed tail moved into a regular slot when the policy keeps it; and the
  row's missed-block count stored into the run's counters at ``[step, layer, row]``.

The torch functions ``*_reference`` compute the same and are the CPU path; tests hold the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dispatch import kernels_on

try:  # Triton is only on GPU machines (and interpreted in CPU tests); the torch references compute the same.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


@dataclass
class CopyPlan:
    """Chunk indices of one layer's copies (-1: nothing to move). ``miss_src`` host chunks and ``miss_dst`` pool
    chunks ``[R, K]``; ``wb_src``/``wb_dst`` pool -> host ``[R]``; ``mv_src``/``mv_dst`` pool -> pool ``[R]``."""

    miss_src: torch.Tensor
    miss_dst: torch.Tensor
    wb_src: torch.Tensor
    wb_dst: torch.Tensor
    mv_src: torch.Tensor
    mv_dst: torch.Tensor


if triton is not None:

    @triton.jit
    def _trace_sel_kernel(tr_ptr, T, Lt, Ht, Bt, step_ptr, layer, H, tail_ptr, out_ptr, r0, K,
                          KP: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        r = r0 + i
        h = r % H
        b = r // H
        t = tl.minimum(tl.load(step_ptr).to(tl.int64), T - 1)
        base = (((t * Lt + layer % Lt) * Ht + h % Ht) * Bt + b % Bt) * K
        j = tl.arange(0, KP)
        m = j < K
        ids = tl.load(tr_ptr + base + j, mask=m, other=-1).to(tl.int64)
        tail = tl.load(tail_ptr + r).to(tl.int64)
        tl.store(out_ptr + i * K + j, tl.where(ids == tail, -1, ids), mask=m)

    @triton.jit
    def _copy_plan_kernel(sel_ptr, slot_ptr, miss_ptr, tail_dst_ptr, n_miss_ptr, done_ptr, old_tail_ptr,
                          row_base_ptr, slot_base_ptr, ms_ptr, md_ptr, ws_ptr, wd_ptr, vs_ptr, vd_ptr,
                          loaded_ptr, step_ptr, loaded_step_stride, loaded_off, r0, K, C, TAILS,
                          KP: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        r = r0 + i
        j = tl.arange(0, KP)
        m = j < K
        sel = tl.load(sel_ptr + i * K + j, mask=m, other=-1).to(tl.int64)
        slot = tl.load(slot_ptr + i * K + j, mask=m, other=-1).to(tl.int64)
        miss = tl.load(miss_ptr + i * K + j, mask=m, other=0) != 0
        rb = tl.load(row_base_ptr + r).to(tl.int64)
        sb = tl.load(slot_base_ptr + r).to(tl.int64)
        tl.store(ms_ptr + i * K + j, tl.where(miss, rb + sel, -1), mask=m)
        tl.store(md_ptr + i * K + j, tl.where(miss, sb + slot, -1), mask=m)
        done = tl.load(done_ptr + r) != 0
        old = tl.load(old_tail_ptr + r).to(tl.int64)
        # The completed tail still sits in its own tail slot: tail slots alternate with the block's parity, so the
        # new token's writes go to the other one and this copy can run at any time during the step.
        old_slot = sb + C + tl.where(old >= 0, old, 0) % TAILS
        dst = tl.load(tail_dst_ptr + i).to(tl.int64)
        tl.store(ws_ptr + i, tl.where(done, old_slot, -1))
        tl.store(wd_ptr + i, tl.where(done, rb + old, -1))
        tl.store(vs_ptr + i, tl.where(dst >= 0, old_slot, -1))
        tl.store(vd_ptr + i, tl.where(dst >= 0, sb + dst, -1))
        t = tl.load(step_ptr).to(tl.int64)
        tl.store(loaded_ptr + t * loaded_step_stride + loaded_off + r, tl.load(n_miss_ptr + i).to(tl.int32))


def _want(use_triton: bool | None, t: torch.Tensor) -> bool:
    return (triton is not None and kernels_on(t)) if use_triton is None else use_triton


def trace_selection_reference(trace: torch.Tensor, step: torch.Tensor, layer: int, rows: slice, kv_heads: int,
                              tail: torch.Tensor) -> torch.Tensor:
    T, Lt, Ht, Bt, K = trace.shape
    r = torch.arange(rows.start, rows.stop, device=trace.device)
    at = trace[:, layer % Lt].index_select(0, step.clamp(max=T - 1).view(1))[0]  # [Ht, Bt, K]
    sel = at[(r % kv_heads) % Ht, (r // kv_heads) % Bt].long()
    return torch.where(sel == tail[rows, None], -1, sel)


def trace_selection(trace: torch.Tensor, step: torch.Tensor, layer: int, rows: slice, kv_heads: int,
                    tail: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """The trace's selection ``int64 [rows, K]`` of layer ``layer`` at the device-side ``step`` (0-d int64), the
    rows' tails (``tail`` [R], the layer's full row range) dropped. ``trace`` int [T, Lt, Ht, Bt, K] contiguous."""
    if not _want(use_triton, trace):
        return trace_selection_reference(trace, step, layer, rows, kv_heads, tail)
    T, Lt, Ht, Bt, K = trace.shape
    n = rows.stop - rows.start
    out = torch.empty((n, K), dtype=torch.int64, device=trace.device)
    if n:
        _trace_sel_kernel[(n,)](trace.contiguous(), T, Lt, Ht, Bt, step, layer, kv_heads, tail, out, rows.start, K,
                                KP=triton.next_power_of_2(K), num_warps=1)
    return out


def copy_plan_reference(sel, plan, tail_done, old_tail, row_base, slot_base, C: int, tails: int, loaded, step,
                        layer: int, rows: slice) -> CopyPlan:
    rb, sb = row_base[rows], slot_base[rows]
    done, old = tail_done[rows], old_tail[rows]
    old_slot = sb + C + old.clamp(min=0) % tails
    loaded[:, layer, rows].index_copy_(0, step.view(1), plan.n_miss.to(loaded.dtype)[None])
    return CopyPlan(torch.where(plan.miss, rb[:, None] + sel, -1), torch.where(plan.miss, sb[:, None] + plan.sel_slot, -1),
                    torch.where(done, old_slot, -1), torch.where(done, rb + old, -1),
                    torch.where(plan.tail_dst >= 0, old_slot, -1), torch.where(plan.tail_dst >= 0, sb + plan.tail_dst, -1))


def copy_plan(sel: torch.Tensor, plan, tail_done: torch.Tensor, old_tail: torch.Tensor, row_base: torch.Tensor,
              slot_base: torch.Tensor, C: int, tails: int, loaded: torch.Tensor, step: torch.Tensor, layer: int,
              rows: slice, use_triton: bool | None = None) -> CopyPlan:
    """The copy lists of one layer's part ``rows`` from the table update's ``plan`` (``blockcache.UpdatePlan``) and
    ``sel`` [rows, K]; ``tail_done``, ``old_tail``, ``row_base`` (host chunk of each row's block 0), ``slot_base``
    (pool chunk of each row's slot 0) are the layer's full [R] vectors; rows own ``C`` regular slots then ``tails``
    tail slots; ``loaded`` int32 [steps, layers, R] receives the rows' missed-block counts at ``step``."""
    if not _want(use_triton, sel):
        return copy_plan_reference(sel, plan, tail_done, old_tail, row_base, slot_base, C, tails, loaded, step, layer,
                                   rows)
    n, K = sel.shape
    dev = sel.device
    out = CopyPlan(*(torch.empty((n, K) if i < 2 else (n,), dtype=torch.int64, device=dev) for i in range(6)))
    if n == 0:
        return out
    if not loaded.is_contiguous() or loaded.dtype != torch.int32:
        raise ValueError("copy_plan: loaded must be a contiguous int32 [steps, layers, R] tensor")
    done = tail_done.view(torch.uint8) if tail_done.dtype == torch.bool else tail_done
    miss = plan.miss.view(torch.uint8) if plan.miss.dtype == torch.bool else plan.miss
    _copy_plan_kernel[(n,)](sel.contiguous(), plan.sel_slot.contiguous(), miss.contiguous(), plan.tail_dst,
                            plan.n_miss, done, old_tail, row_base, slot_base, out.miss_src, out.miss_dst, out.wb_src,
                            out.wb_dst, out.mv_src, out.mv_dst, loaded, step, loaded.stride(0),
                            layer * loaded.stride(1), rows.start, K, C, tails, KP=triton.next_power_of_2(K),
                            num_warps=1)
    return out
