"""Block-sparse decode attention: one query token per sequence over a list of KV blocks in the block pool.

The same kernel serves every variant. A row (sequence, KV head) comes with a fixed-width entry list: for each entry
the pool slot to read, how many of its 64 tokens are valid (64 for a complete block, the fill of the tail, 0 for
padding) and the block id (to look up NOSA's per-token logit bias). Offloaded variants list the selected slots plus
the tail slot; dense lists every block of the row, so dense is "sparse attention over all blocks" and the two
can't drift apart. The G query heads of a GQA group share each K/V load.

Split-K (``program_id(1)``) cuts a row's entry list into pieces so that small batches still fill the GPU; the
pieces' partial softmax states are merged in torch (a few small ops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:

    @triton.jit
    def _sparse_decode_kernel(q_ptr, pool_ptr, slots_ptr, lens_ptr, blocks_ptr, bias_ptr, o_ptr, m_ptr, l_ptr,
                              NE, EPS, slots_per_row, bias_stride, sm_scale,
                              G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                              HAS_BIAS: tl.constexpr, IEEE: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        sp = tl.program_id(1)
        nsp = tl.num_programs(1)
        offs_g = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        offs_t = tl.arange(0, BS)
        gmask = offs_g < G
        q = tl.load(q_ptr + (r * G + offs_g[:, None]) * D + offs_d[None, :], mask=gmask[:, None], other=0.0)
        # A finite floor instead of -inf keeps exp(m_old - m_new) defined while only padding has been seen.
        m_i = tl.full([GP], -1.0e30, tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        e0 = sp * EPS
        e1 = tl.minimum(e0 + EPS, NE)
        for e in range(e0, e1):
            slot = tl.maximum(tl.load(slots_ptr + r * NE + e), 0).to(tl.int64)
            n = tl.load(lens_ptr + r * NE + e)
            tmask = offs_t < n
            base = pool_ptr + (r * slots_per_row + slot) * (2 * BS * D)
            kk = tl.load(base + offs_t[:, None] * D + offs_d[None, :], mask=tmask[:, None], other=0.0)
            vv = tl.load(base + BS * D + offs_t[:, None] * D + offs_d[None, :], mask=tmask[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(kk), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kk))
            s = s * sm_scale
            if HAS_BIAS:
                blk = tl.maximum(tl.load(blocks_ptr + r * NE + e), 0).to(tl.int64)
                b = tl.load(bias_ptr + r * bias_stride + blk * BS + offs_t, mask=tmask, other=0.0)
                s = s + b[None, :]
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
            m_i = m_new
        part = r * nsp + sp
        tl.store(o_ptr + (part * GP + offs_g[:, None]) * D + offs_d[None, :], acc)
        tl.store(m_ptr + part * GP + offs_g, m_i)
        tl.store(l_ptr + part * GP + offs_g, l_i)


@dataclass
class AttentionPlan:
    """Entry lists of one layer, ``[R, NE]`` each; built on the GPU every step, read by the kernel."""

    slots: torch.Tensor  # int32/64 pool slot per entry (-1 padding)
    lens: torch.Tensor  # int32 valid tokens per entry (0 for padding)
    blocks: torch.Tensor  # int32/64 block id per entry (bias lookup)


def pick_splits(rows: int, entries: int, sms: int = 132) -> int:
    """Pieces per row: enough programs for about four waves' worth of SMs, never under 4 entries a piece."""
    return max(1, min(math.ceil(4 * sms / rows), entries // 4 if entries >= 8 else 1))


def sparse_decode_attention(q: torch.Tensor, pool: torch.Tensor, plan: AttentionPlan, bias: torch.Tensor | None = None,
                            *, splits: int | None = None, scale: float | None = None,
                            use_triton: bool | None = None, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Attention of ``q [R, G, D]`` over the planned blocks of ``pool [R, S, 2, BS, D]``.

    ``bias`` float32 ``[R, NB * BS]``: additive per-token logit bias (NOSA), indexed by block id. Returns
    ``[R, G, D]`` in ``q``'s dtype.
    """
    R, G, D = q.shape
    if pool.dim() != 5 or pool.shape[0] != R or pool.shape[2] != 2 or pool.shape[4] != D:
        raise ValueError(f"sparse_decode_attention: pool must be [R={R}, slots, 2, block, D={D}], got "
                         f"{tuple(pool.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if use_triton is None:
        use_triton = triton is not None and q.is_cuda
    if not use_triton:
        return reference_attention(q, pool, plan, bias, scale=scale).to(q.dtype)
    BS = pool.shape[3]
    NE = plan.slots.shape[1]
    splits = pick_splits(R, NE) if splits is None else splits
    eps = math.ceil(NE / splits)
    GP = max(16, triton.next_power_of_2(G))
    o = torch.empty((R, splits, GP, D), dtype=torch.float32, device=q.device)
    m = torch.empty((R, splits, GP), dtype=torch.float32, device=q.device)
    lsum = torch.empty_like(m)
    has_bias = bias is not None
    _sparse_decode_kernel[(R, splits)](
        q.contiguous(), pool, plan.slots, plan.lens, plan.blocks, bias if has_bias else m, o, m, lsum,
        NE, eps, pool.shape[1], bias.stride(0) if has_bias else 0, scale,
        G=G, GP=GP, D=D, BS=BS, HAS_BIAS=has_bias, IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages)
    m, lsum, o = m[:, :, :G], lsum[:, :, :G], o[:, :, :G]
    w = torch.exp(m - m.amax(1, keepdim=True))
    return ((o * w[..., None]).sum(1) / (lsum * w).sum(1)[..., None]).to(q.dtype)


def reference_attention(q, pool, plan: AttentionPlan, bias=None, *, scale: float | None = None,
                        dtype=torch.float32) -> torch.Tensor:
    """Gather + softmax attention in torch (the CPU path and the kernel's reference), computed in ``dtype``."""
    R, G, D = q.shape
    BS = pool.shape[3]
    NE = plan.slots.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    rows = torch.arange(R, device=q.device)[:, None]
    kv = pool[rows, plan.slots.long().clamp(min=0)].to(dtype)  # [R, NE, 2, BS, D]
    k = kv[:, :, 0].reshape(R, NE * BS, D)
    v = kv[:, :, 1].reshape(R, NE * BS, D)
    tok = torch.arange(BS, device=q.device)
    valid = (tok < plan.lens.long()[..., None]).reshape(R, NE * BS)
    s = torch.einsum("rgd,rtd->rgt", q.to(dtype), k) * scale
    if bias is not None:
        idx = (plan.blocks.long().clamp(min=0)[..., None] * BS + tok).reshape(R, NE * BS)
        s = s + bias.to(dtype).gather(1, idx)[:, None, :]
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("rgt,rtd->rgd", torch.softmax(s, -1), v)
