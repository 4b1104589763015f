"""Attention backends: where K/V live and which blocks a step attends. One interface, two implementations.

- ``DenseBackend``: the whole KV cache on the GPU (block ``i`` of a row in pool slot ``i``), attention over every
  block: the baseline.
- ``OffloadBackend``: KV in the pinned host store, ``C`` slots plus two tail slots per row on the GPU, and per
  layer: fold the new token into the pool and the scoring state, select (InfLLM-V2, NOSA, or the trace's
  selection), update the block table, plan and issue the copies (the completed tail written back and, if kept,
  moved into a regular slot; the misses gathered over PCIe), attend.

A layer's work is a handful of launches (``runtime.token_kernels.token_step``, ``select_kernels.select_fused``, the
table kernel, ``plan_kernels.copy_plan``, one ``gather.copy_chunks_lists``, ``attention.decode_attention``); on the
CPU each falls back to the torch reference it is tested against. Per-step values shared by all layers (positions,
tails, which tails completed, where the tail lives) are computed once in ``begin_step`` from device tensors, so a
captured CUDA graph replays them correctly at every step.

Tail slots alternate with the parity of the tail block (slot ``C + tail % 2``): when a block completes, the new
token goes to the other tail slot, so the completed block can be written back and moved while the step goes on,
in any order, and the new token's K/V are written with the rest of the token's work before selection.

Each layer's attention is two halves, ``prepare`` (everything up to issuing the transfers) and ``finish`` (wait for
them, attend), over a *part*: the rows of a contiguous group of sequences. ``attend`` runs both over all rows. The
decoder's micro-batch schedule (``runtime.model``) calls the halves per part, so one micro-batch's transfers run
on a copy stream while the others compute: the overlap that ``nosasim``'s schedule models. Per-row state (score
state, block table, pool) is sliced by row, as views, so a part's updates land in the shared tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from nosasim.contract import CMP_STRIDE, TAIL_SLOTS

from .attention import EntryPlan, decode_attention, merge_attention
from .blockcache import BlockTable, update_table
from .config import RuntimeConfig
from .gather import copy_chunks, copy_chunks_lists
from .kvstore import HostStore
from .plan_kernels import copy_plan, trace_selection
from . import select_kernels
from .dispatch import kernels_on
from .selection import ScoreState, init_prompt, qaware_block_scores, select_blocks_gpu
from .token_kernels import TokenBuffers, token_step


@dataclass
class StepState:
    """Device-side decode position: everything a replayed graph must read rather than bake in."""

    ctx: torch.Tensor  # int64 [B]: tokens in the cache at the current step, the new one included
    step: torch.Tensor  # int64 0-d: index of the current step (-1 before the first)


class _Base:
    def __init__(self, cfg: RuntimeConfig, device, ctx0: torch.Tensor | None = None):
        self.cfg, self.device = cfg, device
        s = cfg.shape
        self.B, self.H, self.R = cfg.batch, s.kv_heads, cfg.batch * s.kv_heads
        ctx = torch.full((cfg.batch,), cfg.context, dtype=torch.int64) if ctx0 is None else ctx0.long() - 1
        self.state = StepState(ctx.to(device), torch.full((), -1, dtype=torch.int64, device=device))
        self.rows = torch.arange(self.R, device=device)
        self.row_seq = self.rows // self.H
        self.all_rows = slice(0, self.R)
        self.pending: dict[int, tuple] = {}
        self.record: list | None = None  # tests: (layer, positions, rotated keys, values) of every new token

    def part_rows(self, b0: int, b1: int) -> slice:
        """Rows of sequences ``b0 .. b1 - 1`` (rows are sequence-major)."""
        return slice(b0 * self.H, b1 * self.H)

    def attend(self, layer, q, k, v, lw, rows: slice | None = None, inv_freq: torch.Tensor | None = None):
        """Both halves at once: attention output ``[rows, G, D]`` of the new token (``q [rows, G, D]``,
        ``k``, ``v [rows, D]``; already rotated unless ``inv_freq`` is given)."""
        rows = self.all_rows if rows is None else rows
        self.prepare(layer, rows, q, k, v, lw, inv_freq=inv_freq)
        return self.finish(layer, rows)

    def end_step(self) -> None:
        """Join side streams into the compute stream (a captured graph must end on one stream)."""

    def _part(self, state, rows: slice):
        """``state`` (a ``ScoreState`` or ``BlockTable``) restricted to ``rows``: every ``[L, R, ...]`` tensor sliced
        along R as a view, so in-place updates of the part update the whole."""
        if rows == self.all_rows:
            return state
        return replace(state, **{f.name: getattr(state, f.name)[:, rows] for f in fields(state)
                                 if isinstance(getattr(state, f.name), torch.Tensor)})

    def _token(self, layer, rows: slice, q, k, v, inv_freq, buf: TokenBuffers):
        """RoPE (with ``inv_freq``), the new token into the pool and the scoring state: one launch for the part.
        ``q``/``k``/``v`` are ``[n, heads * D]`` (column views of the QKV GEMM) or ``[n * kv_heads, G|1, D]``."""
        D = self.cfg.shape.head_dim
        n = (rows.stop - rows.start) // self.H
        q2, k2, v2 = (t.reshape(n, -1) if t.shape[0] != n else t for t in (q, k, v))
        qr, kr = token_step(q2, k2, v2, buf, head_dim=D, row0=rows.start, inv_freq=inv_freq)
        if self.record is not None:
            self.record.append((layer, buf.pos[rows].clone(), kr.clone(), v2.reshape(-1, D).clone()))
        return qr

    def begin_step(self) -> torch.Tensor:
        bs = self.cfg.block_size
        state = self.state
        state.ctx.add_(1)
        state.step.add_(1)
        ctx = state.ctx[self.row_seq]
        self.pos = ctx - 1  # [R]
        self.tail = self.pos // bs
        self.fill = self.pos % bs + 1  # valid tokens of the tail
        self.dst_tok = self.fill - 1  # where the new token goes in the tail block
        self.tail_done = (self.pos % bs == 0) & (state.step > 0)
        self.old_tail = self.tail - 1
        self.ctx_rows = ctx
        return state.ctx - 1


class DenseBackend(_Base):
    """All KV on the GPU: pool ``[L, R, NB, 2, BS, D]``; attention over every block (the kernel's dense mode)."""

    def __init__(self, cfg: RuntimeConfig, device, seed: int = 0):
        super().__init__(cfg, device)
        s = cfg.shape
        dt = getattr(torch, cfg.dtype)
        self.pool = torch.empty((s.layers, self.R, cfg.n_blocks, 2, cfg.block_size, s.head_dim), dtype=dt, device=device)
        g = torch.Generator(device=device).manual_seed(seed)
        for layer in range(s.layers):  # random prompt K/V, layer by layer to bound the temporary
            self.pool[layer].normal_(generator=g)

    def prepare(self, layer, rows: slice, q, k, v, lw, inv_freq=None) -> None:
        buf = TokenBuffers(pos=self.pos, pool=self.pool[layer], dst_slot=self.tail, dst_tok=self.dst_tok,
                           block_size=self.cfg.block_size)
        self.pending[rows.start] = (self._token(layer, rows, q, k, v, inv_freq, buf),)

    def finish(self, layer, rows: slice):
        (q,) = self.pending.pop(rows.start)
        return decode_attention(q, self.pool[layer][rows], EntryPlan.dense(self.tail[rows], self.fill[rows]))


def _fill_normal(t: torch.Tensor, g: torch.Generator, rows: int = 64) -> None:
    """``t.normal_()``, also for float8 (no normal_ of its own): drawn in bf16 a few rows at a time, so a large
    layer needs no full-size temporary."""
    if t.dtype != torch.float8_e4m3fn:
        t.normal_(generator=g)
        return
    for i in range(0, t.shape[0], rows):
        part = t[i: i + rows]
        part.copy_(torch.empty(part.shape, dtype=torch.bfloat16, device=t.device).normal_(generator=g))


class OffloadBackend(_Base):
    """Host store + GPU block cache (see the module docstring). ``trace_sel``: int [T, L, H, B, K] selections to use
    instead of (variant 'trace') or after (replay, for timing with realistic locality) the computed ones."""

    def __init__(self, cfg: RuntimeConfig, device, host: HostStore, trace_sel: torch.Tensor | None = None,
                 ctx0: torch.Tensor | None = None, copies: bool = True):
        super().__init__(cfg, device, ctx0)
        s = cfg.shape
        dt = getattr(torch, cfg.dtype)
        C = cfg.slots
        self.C, self.host, self.copies = C, host, copies
        self.pool = torch.empty((s.layers, self.R, C + TAIL_SLOTS, 2, cfg.block_size, s.head_dim),
                                dtype=cfg.kv_torch_dtype, device=device)
        self.table = BlockTable.allocate(s.layers, self.R, C, cfg.n_blocks, cfg.policy, device)
        qaware = cfg.variant in ("infllmv2", "nosa")
        agnostic = cfg.variant == "nosa"
        self.scores = ScoreState.allocate(s.layers, self.R, s.head_dim, cfg.max_tokens, cfg.n_blocks, qaware=qaware,
                                          agnostic=agnostic, dtype=cfg.ckey_torch_dtype, device=device,
                                          stride=CMP_STRIDE,
                                          block_size=cfg.block_size)
        if self.table.static is not None and agnostic and trace_sel is None:
            self.table.static = self.scores.static  # 'static' keeps blocks by NOSA's own frozen score
        # A trace-driven run with 'static' ranks blocks by the trace's agnostic score, as the simulator does: the
        # caller fills table.static from the trace (runtime.e2e.load_trace_static); the computed score would
        # rank the blocks the trace's selections never saw.
        self.trace_sel = None if trace_sel is None else trace_sel.contiguous()
        self.row_base = host.row_base(device, cfg.batch)
        self.slot_base = self.rows * (C + TAIL_SLOTS)
        self.loaded = torch.zeros((cfg.steps, s.layers, self.R), dtype=torch.int32, device=device)
        self.chunk = cfg.block.block_bytes
        # A copy stream only when transfers can overlap compute (micro-batches, or attention split around the
        # copies); otherwise everything stays in stream order.
        overlap = cfg.microbatches > 1 or cfg.split_attention
        self.copy_stream = torch.cuda.Stream(device) if overlap and torch.device(device).type == "cuda" else None

    def begin_step(self) -> torch.Tensor:
        out = super().begin_step()
        self.tail_slot = self.C + self.tail % TAIL_SLOTS  # row-relative slot of the current tail block
        return out

    def prefill(self, weights, exact: bool, seed: int = 0) -> None:
        """Scoring state of the prompt and the partial tail block into its tail slot. ``exact`` derives the scoring
        state from the host store's prompt (tests); otherwise it is random (timing: content does not matter)."""
        cfg, s = self.cfg, self.cfg.shape
        P = int(self.state.ctx.max())
        tail0 = torch.div(self.state.ctx[self.row_seq], cfg.block_size, rounding_mode="floor")
        g = torch.Generator(device=self.device).manual_seed(seed)
        for layer in range(s.layers):
            copy_chunks(self.host.layer(layer), self.pool[layer], self.row_base + tail0,
                        self.slot_base + self.C + tail0 % TAIL_SLOTS, self.chunk)
            sc = self.scores
            if exact:
                host_rows = (self.row_base // self.host.kv.shape[3]).to(self.host.kv.device)  # index where the store is
                rows_kv = self.host.layer(layer).flatten(0, 1)[host_rows].to(self.device)
                keys = rows_kv[:, :, 0].flatten(1, 2)[:, :P]
                vals = rows_kv[:, :, 1].flatten(1, 2)[:, :P]
                cis = self._cis(weights.layers[layer], vals) if sc.cis is not None else None
                init_prompt(sc, layer, keys if sc.ckeys is not None else None, cis)
            else:
                if sc.ckeys is not None:
                    _fill_normal(sc.ckeys[layer], g)
                if sc.cis is not None:
                    sc.cis[layer].normal_(generator=g)
                    sc.cscore[layer].normal_(generator=g)
                    sc.static[layer].normal_(generator=g)

    def _cis(self, lw, v: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """NOSA eviction score ``A_h * softplus(W_h . v)`` of values ``v [rows, ..., D]`` (row = seq * H + head)."""
        rows = self.all_rows if rows is None else rows
        h = self.rows[rows] % self.H
        n = h.shape[0]
        w = lw.evict_w[h].view(n, *([1] * (v.dim() - 2)), -1)
        return lw.evict_a[h].view(n, *([1] * (v.dim() - 2))) * F.softplus((v.float() * w).sum(-1))

    def select(self, layer: int, q: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """Selected complete blocks ``int64 [rows, k]`` of the part: computed (InfLLM-V2, NOSA), then replaced by
        the trace's when one is given (the compute is real, the transfers are the trace's)."""
        cfg, b = self.cfg, self.cfg.budget
        rows = self.all_rows if rows is None else rows
        sel = None
        if cfg.variant in ("infllmv2", "nosa"):
            sc = self._part(self.scores, rows)
            ctx = self.ctx_rows[rows]
            agn = sc.static[layer, :, : cfg.n_blocks] if cfg.variant == "nosa" else None
            if cfg.selection == "fused" and select_kernels.AVAILABLE and kernels_on(q):
                sel = select_kernels.select_fused(
                    sc.ckeys[layer], sc.nc, q, ctx, cfg.n_blocks, k=b.k, k_q_eff=b.k_q if agn is not None else b.k,
                    sink=b.sink, window=b.window, block_size=cfg.block_size, agnostic=agn, stride=sc.stride)
            else:
                qs = qaware_block_scores(sc, layer, q, ctx, cfg.n_blocks)
                sel = select_blocks_gpu(qs, ctx, k=b.k, k_q=b.k_q, sink=b.sink, window=b.window,
                                        block_size=cfg.block_size, agnostic=agn)
        if self.trace_sel is not None:  # trace variant, or replay of realistic selections after the real scoring
            sel = trace_selection(self.trace_sel, self.state.step, layer, rows, self.H, self.tail)
        return sel

    def prepare(self, layer, rows: slice, q, k, v, lw, inv_freq=None) -> None:
        """Score the new token, select, update the block table, and issue the part's transfers (on the copy stream
        when there is one)."""
        cfg, C = self.cfg, self.C
        nosa = {"evict_w": lw.evict_w, "evict_a": lw.evict_a, "tail_done": self.tail_done,
                "old_tail": self.old_tail} if self.scores.cis is not None else {}
        buf = TokenBuffers.from_scores(self.scores, layer, self.pos, pool=self.pool[layer], dst_slot=self.tail_slot,
                                       dst_tok=self.dst_tok, **nosa)
        qr = self._token(layer, rows, q, k, v, inv_freq, buf)
        sel = self.select(layer, qr, rows)
        plan = update_table(self._part(self.table, rows), layer, sel, self.state.step, self.tail_done[rows],
                            self.old_tail[rows])
        cp = copy_plan(sel, plan, self.tail_done, self.old_tail, self.row_base, self.slot_base, C, TAIL_SLOTS,
                       self.loaded, self.state.step, layer, rows)
        done = None
        if self.copies:
            pool, host = self.pool[layer], self.host.layer(layer)
            # One launch: the completed tail (in its own tail slot, which nothing else writes this step) goes to the
            # host and, if kept, to a regular slot; the misses go to free slots nothing else reads this step.
            lists = [(pool, host, cp.wb_src, cp.wb_dst), (pool, pool, cp.mv_src, cp.mv_dst),
                     (host, pool, cp.miss_src, cp.miss_dst)]
            if self.copy_stream is not None:
                self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
                done = torch.cuda.Event()
                with torch.cuda.stream(self.copy_stream):
                    copy_chunks_lists(lists, self.chunk, programs=cfg.gather_programs, block=cfg.gather_block)
                    done.record(self.copy_stream)
            else:
                copy_chunks_lists(lists, self.chunk, programs=cfg.gather_programs, block=cfg.gather_block)
        # The index lists stay alive in ``pending`` until ``finish`` has waited for the copies that read them.
        self.pending[rows.start] = (qr, sel, plan, cp, done)

    def finish(self, layer, rows: slice):
        """Wait for the part's transfers, attend the selected blocks and the tail. With ``split_attention`` the
        resident blocks and the tail are attended before the wait, the copied ones after it, and the two results
        merged by their log-sum-exp."""
        q, sel, plan, _, done = self.pending.pop(rows.start)
        aplan = EntryPlan(plan.sel_slot, sel, self.tail_slot[rows], self.tail[rows], self.fill[rows])
        bias = self.scores.cis[layer, rows] if self.cfg.variant == "nosa" else None
        pool = self.pool[layer][rows]
        wait = (lambda: torch.cuda.current_stream(self.device).wait_event(done)) if done is not None else None
        if not self.cfg.split_attention:
            if wait:
                wait()
            return decode_attention(q, pool, aplan, bias)
        o_hit, l_hit = decode_attention(q, pool, aplan, bias, miss=plan.miss, part="hits", return_lse=True)
        if wait:
            wait()
        o_miss, l_miss = decode_attention(q, pool, aplan, bias, miss=plan.miss, part="misses", return_lse=True)
        return merge_attention(o_hit, l_hit, o_miss, l_miss)[0]

    def end_step(self) -> None:
        # Without copies the copy stream never joins the step: waiting on it would pull a stream outside a CUDA
        # graph's capture into it, which invalidates the capture.
        if self.copy_stream is not None and self.copies:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)

    def flush(self) -> None:
        """Write every partial tail to the host store (tests: the store then holds the whole history)."""
        for layer in range(self.cfg.shape.layers):
            copy_chunks(self.pool[layer], self.host.layer(layer), self.slot_base + self.tail_slot,
                        self.row_base + self.tail, self.chunk)
