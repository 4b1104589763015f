"""The GPU block table and its per-step update: the cache semantics (docs/cache-semantics.md) in torch ops, with no
host sync.

Per layer, every row (one sequence and KV head, ``row = seq * kv_heads + head``) owns ``C`` regular slots plus one
tail slot (index ``C``) in the block pool. ``update_table`` takes the step's selection and decides, for all rows at
once, which selected blocks hit, which miss and into which slot each miss goes, which resident block is evicted,
and where the just-completed tail goes. The keep-priority rule of each policy is ``nosasim.cache.policies``'s:
the candidate with the smallest key ``(primary, secondary, id)`` is evicted first. Here the key is packed into one
int64 so that one sort per row ranks all candidates:

- lru: ``last * 2^16 + id``; lfu: ``count * 2^47 + (last + 1) * 2^16 + id``;
- static: order-preserving integer image of the float32 score (NaN as -inf) ``* 2^16 + id``.

Block ids are below 2^16 (the trace format stores int16 ids), steps below 2^31 and counts below 2^16.
Per-block statistics (``last``, ``count``) live in ``[rows, n_blocks + 1]`` tensors whose extra column is a
scratch target for masked-out scatters: writing "nowhere" without a branch or a boolean index.

On CUDA, ``update_table`` runs all of this as one Triton launch, one program per row (``runtime/table_kernel.py``);
the torch ops below stay as the reference and the CPU path, and the tests hold the two to identical results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import table_kernel
from .dispatch import kernels_on

INT64_MAX = torch.iinfo(torch.int64).max
INT64_MIN = torch.iinfo(torch.int64).min


@dataclass
class BlockTable:
    """State of all layers. ``slot_block[l, r, s]``: block id held by slot ``s`` (-1 empty)."""

    slot_block: torch.Tensor  # int64 [L, R, C]
    last: torch.Tensor  # int64 [L, R, NB + 1]: last step attended (selected, or as the tail), -1 never
    count: torch.Tensor  # int64 [L, R, NB + 1]: times selected
    static: torch.Tensor | None  # float32 [L, R, NB + 1]: query-agnostic keep score (policy 'static')
    policy: str

    @classmethod
    def allocate(cls, layers: int, rows: int, capacity: int, n_blocks: int, policy: str, device) -> BlockTable:
        if n_blocks >= 1 << 16:
            raise ValueError(f"block table: {n_blocks} blocks per row do not fit 16-bit block ids")
        z = {"dtype": torch.int64, "device": device}
        static = torch.full((layers, rows, n_blocks + 1), float("nan"), device=device) if policy == "static" else None
        return cls(torch.full((layers, rows, capacity), -1, **z), torch.full((layers, rows, n_blocks + 1), -1, **z),
                   torch.zeros((layers, rows, n_blocks + 1), **z), static, policy)

    @property
    def capacity(self) -> int:
        return self.slot_block.shape[-1]


@dataclass
class UpdatePlan:
    """What one layer's table update decided; the copy and attention plans are built from it."""

    sel_slot: torch.Tensor  # int64 [R, K]: slot of each selected block (-1 for padding)
    miss: torch.Tensor  # bool [R, K]: this selected block must be loaded from the host
    tail_dst: torch.Tensor  # int64 [R]: regular slot receiving the just-completed tail, -1 if none
    n_miss: torch.Tensor  # int64 [R]


def _float_key(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving int64 image of float32 values (NaN reads as -inf, as in nosasim.cache)."""
    x = x.float() + 0.0  # -0.0 + 0.0 == +0.0: the two zeros compare equal in numpy, so they must tie here
    x = torch.where(torch.isnan(x), float("-inf"), x)
    i = x.view(torch.int32).to(torch.int64)
    # Negative floats order backwards in their bit pattern: flip all but the sign bit.
    return torch.where(i < 0, i ^ 0x7FFFFFFF, i)


def keep_key(table: BlockTable, layer: int, cand: torch.Tensor) -> torch.Tensor:
    """Packed keep key of each candidate block id (``cand`` >= 0); larger is kept."""
    idx = cand.clamp(min=0)
    if table.policy == "lru":
        return table.last[layer].gather(1, idx) * 65536 + cand
    if table.policy == "lfu":
        last = table.last[layer].gather(1, idx)
        return table.count[layer].gather(1, idx) * (1 << 47) + (last + 1) * 65536 + cand
    if table.policy == "static":
        return _float_key(table.static[layer].gather(1, idx)) * 65536 + cand
    return torch.zeros_like(cand)  # prev: never ranks


def update_table(table: BlockTable, layer: int, sel: torch.Tensor, step: torch.Tensor, tail_done: torch.Tensor,
                 old_tail: torch.Tensor, check: bool = False, use_triton: bool | None = None) -> UpdatePlan:
    """Advance one layer's table by one decode step.

    ``sel`` int [R, K]: selected complete blocks (-1 padded, distinct; tail ids must already be dropped). ``step``:
    0-d int64 tensor, the step index. ``tail_done`` bool [R]: the previous step's tail completed at this step (it is
    then a free candidate, already in the tail slot). ``old_tail`` int64 [R]: that block's id. ``check`` syncs with
    the host to verify invariants (tests only). ``use_triton``: one kernel launch (``runtime.table_kernel``) instead
    of the torch ops below; None picks it when triton is importable and the table is on CUDA. Both give the same
    state and plan bit for bit as long as every selection fits (``|S_t| <= C``). The table's tensors may be views
    of a row slice (``t[:, r0:r1]``) on either path.
    """
    if use_triton is None:
        use_triton = table_kernel.triton is not None and kernels_on(table.slot_block)
    if use_triton:
        return _update_table_triton(table, layer, sel, step, tail_done, old_tail, check)
    slot_block = table.slot_block[layer]
    R, C = slot_block.shape
    nb = table.last.shape[-1] - 1
    sel = sel.long()
    valid = sel >= 0
    scratch = torch.full_like(old_tail, nb)
    # The completed tail was attended, as the tail, at the previous step.
    table.last[layer].scatter_(1, torch.where(tail_done, old_tail, scratch)[:, None], (step - 1).expand(R, 1))

    cand = torch.cat([slot_block, torch.where(tail_done, old_tail, -1)[:, None]], 1)  # [R, C + 1]
    cvalid = cand >= 0
    eq = (cand[:, :, None] == sel[:, None, :]) & cvalid[:, :, None]  # [R, C + 1, K]
    cand_sel = eq.any(2)
    hit = eq.any(1)
    miss = valid & ~hit
    n_miss = miss.sum(1)

    if table.policy == "prev":
        keep = cand_sel
    else:
        prio = torch.where(cand_sel, INT64_MAX, torch.where(cvalid, keep_key(table, layer, cand), INT64_MIN))
        order = torch.argsort(prio, dim=1, descending=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(C + 1, device=sel.device).expand(R, C + 1))
        # Selected blocks rank first; after them the best others fill what the misses leave of the C slots.
        keep = cvalid & (rank < (C - n_miss)[:, None])
    keep_reg, tail_keep = keep[:, :C], keep[:, C]

    # Incoming blocks, the kept tail first, then the misses in selection order, take the free slots in index order.
    free_order = torch.argsort(keep_reg.to(torch.int8), dim=1, stable=True)
    incoming_rank = torch.cumsum(miss, 1) - 1 + tail_keep[:, None].long()
    miss_slot = torch.where(miss, free_order.gather(1, incoming_rank.clamp(0, C - 1)), -1)
    tail_dst = torch.where(tail_keep, free_order[:, 0], -1)
    hit_cand = eq.to(torch.int8).argmax(1)
    sel_slot = torch.where(hit, torch.where(hit_cand == C, tail_dst[:, None], hit_cand), miss_slot)

    if check:
        n_free = (~keep_reg).sum(1)
        if bool((n_free < n_miss + tail_keep.long()).any()):
            raise RuntimeError("block table: more incoming blocks than free slots, a bug (or C < |S_t|)")

    new = torch.cat([torch.where(keep_reg, slot_block, -1), torch.full_like(old_tail, -1)[:, None]], 1)
    new.scatter_(1, torch.where(miss, miss_slot, C), torch.where(miss, sel, -1))
    new.scatter_(1, torch.where(tail_keep, tail_dst, C)[:, None], torch.where(tail_keep, old_tail, -1)[:, None])
    slot_block.copy_(new[:, :C])

    sidx = torch.where(valid, sel, nb)
    table.last[layer].scatter_(1, sidx, step.expand(R, sel.shape[1]))
    table.count[layer].scatter_add_(1, sidx, valid.long())
    return UpdatePlan(sel_slot, miss, tail_dst, n_miss)


def _update_table_triton(table: BlockTable, layer: int, sel: torch.Tensor, step: torch.Tensor,
                         tail_done: torch.Tensor, old_tail: torch.Tensor, check: bool) -> UpdatePlan:
    static = table.static[layer] if table.static is not None else None
    sel_slot, miss, tail_dst, n_miss, bad = table_kernel.launch_update(
        table.slot_block[layer], table.last[layer], table.count[layer], static, table.policy, sel, step, tail_done,
        old_tail, check=check)
    if check and bool(bad.any()):
        raise RuntimeError("block table: more incoming blocks than free slots, a bug (or C < |S_t|)")
    return UpdatePlan(sel_slot, miss, tail_dst, n_miss)


def replay_misses(sel: torch.Tensor, context_len: torch.Tensor, policy: str, capacity: int, block_size: int = 64,
                  static: torch.Tensor | None = None, check: bool = False,
                  use_triton: bool | None = None) -> torch.Tensor:
    """Drive the table alone through a selection trace: misses per step, ``int64 [T, L, H, B]``.

    ``sel`` int [T, L, H, B, K] and ``context_len`` int [T, B] as in a nosasim trace (on the device to run on);
    ``static`` float [L, H, B, NB] for policy 'static'. This is the comparison against ``nosasim.cache`` without
    the model; the decoder's trace variant makes the same calls with real copies.
    """
    T, L, H, B, K = sel.shape
    dev = sel.device
    nb = int((context_len.max() - 1) // block_size) + 1
    table = BlockTable.allocate(L, B * H, capacity, nb, policy, dev)
    if policy == "static":
        if static is None:
            raise ValueError("replay_misses: policy 'static' needs static scores")
        table.static[:, :, :nb] = static.permute(0, 2, 1, 3).reshape(L, B * H, -1)[..., :nb].float()
    out = torch.zeros((T, L, H, B), dtype=torch.int64, device=dev)
    rows_seq = torch.arange(B * H, device=dev) // H
    for t in range(T):
        ctx = context_len[t].to(dev).long()[rows_seq]
        tail = (ctx - 1) // block_size
        tail_done = (ctx - 1) % block_size == 0 if t > 0 else torch.zeros_like(ctx, dtype=torch.bool)
        step = torch.tensor(t, device=dev)
        for layer in range(L):
            s = sel[t, layer].permute(1, 0, 2).reshape(B * H, K).long()  # rows = seq * H + head
            s = torch.where(s == tail[:, None], -1, s)
            plan = update_table(table, layer, s, step, tail_done, tail - 1, check=check, use_triton=use_triton)
            out[t, layer] = plan.n_miss.view(B, H).T
    return out
