"""Attention backends: where K/V live and which blocks a step attends. One interface, two implementations.

- ``DenseBackend``: the whole KV cache on the GPU (block ``i`` of a row in pool slot ``i``), attention over every
  block: the baseline.
- ``OffloadBackend``: KV in the pinned host store, ``C`` slots plus a tail slot per row on the GPU, and per layer:
  fold the new token into the scoring state, select (InfLLM-V2, NOSA, or the trace's selection), update the block
  table, write back a completed tail, move it into a regular slot if kept, gather the misses over PCIe, write the
  new token into the tail slot, attend.

Per-step values shared by all layers (positions, tails, which tails completed) are computed once in
``begin_step`` from device tensors, so a captured CUDA graph replays them correctly at every step.

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

from nosasim.contract import CMP_STRIDE

from .attention import AttentionPlan, sparse_decode_attention
from .blockcache import BlockTable, update_table
from .config import RuntimeConfig
from .gather import copy_chunks
from .kvstore import HostStore
from .selection import ScoreState, append_token, init_prompt, qaware_block_scores, select_blocks_gpu


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
        self.tok = torch.arange(cfg.block_size, device=device)
        self.all_rows = slice(0, self.R)
        self.pending: dict[int, tuple] = {}

    def part_rows(self, b0: int, b1: int) -> slice:
        """Rows of sequences ``b0 .. b1 - 1`` (rows are sequence-major)."""
        return slice(b0 * self.H, b1 * self.H)

    def attend(self, layer, q, k, v, lw, rows: slice | None = None):
        """Both halves at once: attention output ``[rows, G, D]`` of the new token."""
        rows = self.all_rows if rows is None else rows
        self.prepare(layer, rows, q, k, v, lw)
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

    def begin_step(self) -> torch.Tensor:
        st, bs = self.state, self.cfg.block_size
        st.ctx.add_(1)
        st.step.add_(1)
        ctx = st.ctx[self.row_seq]
        self.pos = ctx - 1  # [R]
        self.tail = self.pos // bs
        self.fill = self.pos % bs + 1  # valid tokens of the tail
        self.tail_done = (self.pos % bs == 0) & (st.step > 0)
        self.ctx_rows = ctx
        return st.ctx - 1


class DenseBackend(_Base):
    """All KV on the GPU: pool ``[L, R, NB, 2, BS, D]``; attention lists every block."""

    def __init__(self, cfg: RuntimeConfig, device, seed: int = 0):
        super().__init__(cfg, device)
        s = cfg.shape
        dt = getattr(torch, cfg.dtype)
        self.pool = torch.empty((s.layers, self.R, cfg.n_blocks, 2, cfg.block_size, s.head_dim), dtype=dt, device=device)
        g = torch.Generator(device=device).manual_seed(seed)
        for layer in range(s.layers):  # random prompt K/V, layer by layer to bound the temporary
            self.pool[layer].normal_(generator=g)
        self.slots = torch.arange(cfg.n_blocks, device=device).expand(self.R, -1).contiguous()

    def prepare(self, layer, rows: slice, q, k, v, lw) -> None:
        pool, tail, fill = self.pool[layer], self.tail[rows], self.fill[rows]
        pool[self.rows[rows], tail, 0, fill - 1] = k
        pool[self.rows[rows], tail, 1, fill - 1] = v
        self.pending[rows.start] = (q,)

    def finish(self, layer, rows: slice):
        (q,) = self.pending.pop(rows.start)
        slots, tail, fill = self.slots[rows], self.tail[rows], self.fill[rows]
        lens = torch.where(slots < tail[:, None], self.cfg.block_size,
                           torch.where(slots == tail[:, None], fill[:, None], 0)).int()
        return sparse_decode_attention(q, self.pool[layer][rows], AttentionPlan(slots, lens, slots))


class OffloadBackend(_Base):
    """Host store + GPU block cache (see the module docstring). ``trace_sel``: int [T, L, H, B] selections to use
    instead of (variant 'trace') or after (replay, for timing with realistic locality) the computed ones."""

    def __init__(self, cfg: RuntimeConfig, device, host: HostStore, trace_sel: torch.Tensor | None = None,
                 ctx0: torch.Tensor | None = None, copies: bool = True):
        super().__init__(cfg, device, ctx0)
        s = cfg.shape
        dt = getattr(torch, cfg.dtype)
        C = cfg.slots
        self.C, self.host, self.copies = C, host, copies
        self.pool = torch.empty((s.layers, self.R, C + 1, 2, cfg.block_size, s.head_dim), dtype=dt, device=device)
        self.table = BlockTable.allocate(s.layers, self.R, C, cfg.n_blocks, cfg.policy, device)
        qaware = cfg.variant in ("infllmv2", "nosa")
        agnostic = cfg.variant == "nosa"
        self.scores = ScoreState.allocate(s.layers, self.R, s.head_dim, cfg.max_tokens, cfg.n_blocks, qaware=qaware,
                                          agnostic=agnostic, dtype=dt, device=device, stride=CMP_STRIDE,
                                          block_size=cfg.block_size)
        if self.table.static is not None and agnostic:
            self.table.static = self.scores.static  # 'static' keeps blocks by NOSA's own frozen score
        # (variant 'trace' with 'static': the caller fills table.static from the trace's agnostic scores)
        self.trace_sel = trace_sel
        self.row_base = host.row_base(device, cfg.batch)
        self.slot_base = self.rows * (C + 1)
        self.loaded = torch.zeros((cfg.steps, s.layers, self.R), dtype=torch.int32, device=device)
        self.chunk = cfg.block.block_bytes
        self.record: list | None = None
        # A copy stream only when micro-batches can overlap; with one part everything stays in stream order.
        self.copy_stream = (torch.cuda.Stream(device) if cfg.microbatches > 1 and torch.device(device).type == "cuda"
                            else None)

    def prefill(self, weights, exact: bool, seed: int = 0) -> None:
        """Scoring state of the prompt and the partial tail block into the tail slot. ``exact`` derives the scoring
        state from the host store's prompt (tests); otherwise it is random (timing: content does not matter)."""
        cfg, s = self.cfg, self.cfg.shape
        P = int(self.state.ctx.max())
        tail0 = torch.div(self.state.ctx[self.row_seq], cfg.block_size, rounding_mode="floor")
        g = torch.Generator(device=self.device).manual_seed(seed)
        for layer in range(s.layers):
            copy_chunks(self.host.layer(layer), self.pool[layer], self.row_base + tail0, self.slot_base + self.C,
                        self.chunk)
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
                    sc.ckeys[layer].normal_(generator=g)
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
        cfg = self.cfg
        rows = self.all_rows if rows is None else rows
        sel = None
        if cfg.variant in ("infllmv2", "nosa"):
            sc = self._part(self.scores, rows)
            qs = qaware_block_scores(sc, layer, q, self.ctx_rows[rows], cfg.n_blocks)
            agn = sc.static[layer, :, : cfg.n_blocks] if cfg.variant == "nosa" else None
            b = cfg.budget
            sel = select_blocks_gpu(qs, self.ctx_rows[rows], k=b.k, k_q=b.k_q, sink=b.sink, window=b.window,
                                    block_size=cfg.block_size, agnostic=agn)
        if self.trace_sel is not None:  # trace variant, or replay of realistic selections after the real scoring
            T, Lt, Ht, Bt, K = self.trace_sel.shape
            step_sel = self.trace_sel[:, layer % Lt].index_select(0, self.state.step.clamp(max=T - 1).view(1))[0]
            sel = step_sel[(self.rows[rows] % self.H) % Ht, self.row_seq[rows] % Bt].long()
        return torch.where(sel == self.tail[rows, None], -1, sel)

    def prepare(self, layer, rows: slice, q, k, v, lw) -> None:
        """Score the new token, select, update the block table, and issue the part's transfers (on the copy stream
        when there is one)."""
        cfg, C = self.cfg, self.C
        sc = self._part(self.scores, rows)
        pos, tail, tail_done = self.pos[rows], self.tail[rows], self.tail_done[rows]
        cis = self._cis(lw, v, rows) if sc.cis is not None else None
        old_tail = tail - 1
        append_token(sc, layer, pos, k if sc.ckeys is not None else None, cis, tail_done, old_tail)
        sel = self.select(layer, q, rows)
        plan = update_table(self._part(self.table, rows), layer, sel, self.state.step, tail_done, old_tail)
        self.loaded[:, layer, rows].index_copy_(0, self.state.step.view(1), plan.n_miss.int()[None])
        row_base, slot_base = self.row_base[rows], self.slot_base[rows]
        tail_slot = slot_base + C
        # Index lists are made here, on the compute stream, and kept alive in ``pending`` until ``finish`` has
        # waited for the copies: the allocator can't hand their memory to other work while a copy still reads it.
        idx = (tail_slot, torch.where(tail_done, row_base + old_tail, -1),
               torch.where(plan.tail_dst >= 0, slot_base + plan.tail_dst, -1),
               torch.where(plan.miss, row_base[:, None] + sel, -1), slot_base[:, None] + plan.sel_slot)
        done = None
        if self.copies:
            pool, host = self.pool[layer], self.host.layer(layer)
            if self.copy_stream is not None:
                self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
                done = torch.cuda.Event()
                with torch.cuda.stream(self.copy_stream):
                    self._issue_copies(pool, host, idx)
                    done.record(self.copy_stream)
            else:
                self._issue_copies(pool, host, idx)
        self.pending[rows.start] = (q, k, v, sel, plan, idx, done)

    def _issue_copies(self, pool, host, idx) -> None:
        # Order matters: the completed tail leaves the tail slot (to the host, and to a regular slot if kept)
        # before the new token overwrites it (in ``finish``); misses go to slots nothing else reads this step.
        tail_slot, wb_dst, move_dst, miss_src, miss_dst = idx
        kw = {"programs": self.cfg.gather_programs}
        copy_chunks(pool, host, tail_slot, wb_dst, self.chunk, **kw)
        copy_chunks(pool, pool, tail_slot, move_dst, self.chunk, **kw)
        copy_chunks(host, pool, miss_src, miss_dst, self.chunk, **kw)

    def finish(self, layer, rows: slice):
        """Wait for the part's transfers, write the new token into the tail slot, attend."""
        cfg, C = self.cfg, self.C
        q, k, v, sel, plan, _, done = self.pending.pop(rows.start)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        pool = self.pool[layer]
        r, tail, fill, pos = self.rows[rows], self.tail[rows], self.fill[rows], self.pos[rows]
        pool[r, C, 0, fill - 1] = k
        pool[r, C, 1, fill - 1] = v
        if self.record is not None:
            self.record.append((layer, pos.clone(), k.clone(), v.clone()))
        bs = cfg.block_size
        aplan = AttentionPlan(
            torch.cat([plan.sel_slot, torch.full_like(tail, C)[:, None]], 1),
            torch.cat([torch.where(sel >= 0, bs, 0), fill[:, None]], 1).int(),
            torch.cat([sel, tail[:, None]], 1))
        bias = self.scores.cis[layer, rows] if cfg.variant == "nosa" else None
        return sparse_decode_attention(q, pool[rows], aplan, bias)

    def end_step(self) -> None:
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)

    def flush(self) -> None:
        """Write every partial tail to the host store (tests: the store then holds the whole history)."""
        for layer in range(self.cfg.shape.layers):
            copy_chunks(self.pool[layer], self.host.layer(layer), self.slot_base + self.C,
                        self.row_base + self.tail, self.chunk)

