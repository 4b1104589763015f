"""InfLLM-V2 and NOSA block selection on the GPU, in torch ops, with no host sync.

Scoring (per layer, all rows at once):

- compressed keys: mean of 32 consecutive keys every 16 tokens; kept incrementally, since a compressed key is
  final once its 32 tokens exist: a 16-token running sum per row (``acc[:, 1]``) and the previous 16-token chunk
  sum (``acc[:, 0]``) give each new compressed key as ``(acc0 + acc1) / 32``, so no evicted key is re-read;
- query-aware block score: softmax of ``q . c_j / sqrt(D)`` over the complete compressed keys, per query head,
  summed over the GQA group, max-pooled onto 64-token blocks over every compressed key that overlaps the block
  (``j`` in ``[4i - 1, 4i + 3]`` at stride 16, InfLLM-V2's pooling);
- NOSA's query-agnostic score: per token ``cis = A_h * softplus(W_h . v)`` (also the attention's logit bias),
  average-pooled the same 32/16 way, then max-pooled onto the block with the compressed scores complete when the
  block completes (``j`` in ``[4i - 1, 4i + 2]``) and frozen from then on.

Selection from block scores mirrors ``nosasim.select.select_mask`` rule for rule (sink, window with the tail,
query-aware top, agnostic top, everything when few blocks exist; ties to the lower id, NaN last), so the GPU
selection can be compared with it exactly.

On CUDA tensors (with triton importable) ``qaware_block_scores`` and ``select_blocks_gpu`` run the Triton kernels of
``runtime.select_kernels`` instead of the torch ops below, which stay the CPU path and the kernels' reference
(``use_triton`` forces either).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import select_kernels
from .dispatch import kernels_on


@dataclass
class ScoreState:
    """Per-layer scoring state of all rows; ``NC`` compressed slots plus one scratch slot for masked writes."""

    ckeys: torch.Tensor | None  # [L, R, NC + 1, D] compressed keys
    kacc: torch.Tensor | None  # float32 [L, R, 2, D]
    cis: torch.Tensor | None  # float32 [L, R, NB * BS] per-token eviction score (NOSA logit bias)
    cscore: torch.Tensor | None  # float32 [L, R, NC + 1]
    sacc: torch.Tensor | None  # float32 [L, R, 2]
    static: torch.Tensor | None  # float32 [L, R, NB + 1] frozen per-block agnostic score
    stride: int = 16
    block_size: int = 64

    @classmethod
    def allocate(cls, layers, rows, head_dim, max_tokens, n_blocks, *, qaware, agnostic, dtype, device,
                 stride=16, block_size=64) -> ScoreState:
        nc = max_tokens // stride
        f32 = {"dtype": torch.float32, "device": device}
        ck = torch.zeros((layers, rows, nc + 1, head_dim), dtype=dtype, device=device) if qaware else None
        ka = torch.zeros((layers, rows, 2, head_dim), **f32) if qaware else None
        cis = torch.zeros((layers, rows, n_blocks * block_size), **f32) if agnostic else None
        cs = torch.zeros((layers, rows, nc + 1), **f32) if agnostic else None
        sa = torch.zeros((layers, rows, 2), **f32) if agnostic else None
        st = torch.full((layers, rows, n_blocks + 1), float("nan"), **f32) if agnostic else None
        return cls(ck, ka, cis, cs, sa, st, stride, block_size)

    @property
    def nc(self) -> int:
        t = self.ckeys if self.ckeys is not None else self.cscore
        return t.shape[2] - 1


def pool_compressed(x: torch.Tensor, stride: int = 16) -> torch.Tensor:
    """Mean over windows of ``2 * stride`` tokens every ``stride`` tokens along dim 1 (``[R, P, ...]``)."""
    n = (x.shape[1] - 2 * stride) // stride + 1
    if n <= 0:
        return x[:, :0]
    c = x[:, : (n + 1) * stride].float().unflatten(1, (n + 1, stride)).sum(2)
    return (c[:, :-1] + c[:, 1:]) / (2 * stride)


def init_prompt(state: ScoreState, layer: int, keys: torch.Tensor | None, cis: torch.Tensor | None) -> None:
    """Scoring state after a prompt of ``P`` tokens (same for all rows): ``keys [R, P, D]``, ``cis [R, P]``."""
    s = state.stride
    P = (keys if keys is not None else cis).shape[1]
    n_chunks = P // s
    if keys is not None:
        ck = pool_compressed(keys, s)
        state.ckeys[layer, :, : ck.shape[1]] = ck.to(state.ckeys.dtype)
        kf = keys.float()
        state.kacc[layer, :, 1] = kf[:, n_chunks * s:].sum(1)
        state.kacc[layer, :, 0] = kf[:, (n_chunks - 1) * s: n_chunks * s].sum(1) if n_chunks else 0
    if cis is not None:
        state.cis[layer, :, :P] = cis
        cs = pool_compressed(cis[..., None], s)[..., 0]
        state.cscore[layer, :, : cs.shape[1]] = cs
        state.sacc[layer, :, 1] = cis[:, n_chunks * s:].sum(1)
        state.sacc[layer, :, 0] = cis[:, (n_chunks - 1) * s: n_chunks * s].sum(1) if n_chunks else 0
        nb_done = P // state.block_size  # blocks complete before the first decode step
        for i in range(nb_done):
            state.static[layer, :, i] = _frozen_block_score(state, layer, torch.full_like(cis[:, 0], i, dtype=torch.long))


def _frozen_block_score(state: ScoreState, layer: int, block: torch.Tensor) -> torch.Tensor:
    per = state.block_size // state.stride
    j = block[:, None] * per + torch.arange(-1, per - 1, device=block.device)  # [R, per]
    ok = (j >= 0) & (j < state.nc)
    v = state.cscore[layer].gather(1, torch.where(ok, j, state.nc))
    return torch.where(ok, v, float("-inf")).amax(1)


def append_token(state: ScoreState, layer: int, pos: torch.Tensor, k: torch.Tensor | None, cis: torch.Tensor | None,
                 tail_done: torch.Tensor, old_tail: torch.Tensor) -> None:
    """Fold the new token (position ``pos [R]``, key ``k [R, D]``, eviction score ``cis [R]``) into the state, and
    freeze the agnostic score of the block that just completed (rows with ``tail_done``)."""
    if k is None and cis is None:
        return
    s = state.stride
    done = (pos + 1) % s == 0
    j = pos // s - 1
    slot = torch.where(done & (j >= 0), j, state.nc)[:, None]
    if k is not None:
        acc = state.kacc[layer]
        acc[:, 1] += k.float()
        c = (acc[:, 0] + acc[:, 1]) / (2 * s)
        ck = state.ckeys[layer]
        src = c[:, None].to(ck.dtype)
        if ck.dtype == torch.float8_e4m3fn:  # no scatter for float8 on every device: its bits, through uint8
            ck, src = ck.view(torch.uint8), src.view(torch.uint8)
        ck.scatter_(1, slot[:, :, None].expand(-1, 1, k.shape[-1]), src)
        acc[:, 0] = torch.where(done[:, None], acc[:, 1], acc[:, 0])
        acc[:, 1] = torch.where(done[:, None], 0.0, acc[:, 1])
    if cis is not None:
        state.cis[layer].scatter_(1, pos[:, None], cis[:, None].float())
        acc = state.sacc[layer]
        acc[:, 1] += cis.float()
        state.cscore[layer].scatter_(1, slot, ((acc[:, 0] + acc[:, 1]) / (2 * s))[:, None])
        acc[:, 0] = torch.where(done, acc[:, 1], acc[:, 0])
        acc[:, 1] = torch.where(done, 0.0, acc[:, 1])
        nb = state.static.shape[2] - 1
        frozen = _frozen_block_score(state, layer, old_tail.clamp(min=0))
        state.static[layer].scatter_(1, torch.where(tail_done, old_tail, nb)[:, None], frozen[:, None])


def _want_triton(use_triton: bool | None, t: torch.Tensor) -> bool:
    """``None``: the Triton kernels when triton is importable and the tensors are on CUDA, else the torch code."""
    return select_kernels.AVAILABLE and kernels_on(t) if use_triton is None else use_triton


def qaware_block_scores(state: ScoreState, layer: int, q: torch.Tensor, ctx: torch.Tensor, n_blocks: int, *,
                        use_triton: bool | None = None) -> torch.Tensor:
    """InfLLM-V2 block scores ``float32 [R, n_blocks]`` of queries ``q [R, G, D]`` at context lengths ``ctx [R]``.

    The Triton path accumulates the logits in fp32 from the keys' dtype; the torch path rounds them to that dtype
    (a bf16 matmul's output), so with bf16 keys the two differ by that rounding (fp32: ~1e-6 relative)."""
    if _want_triton(use_triton, q):
        return select_kernels.qaware_scores_triton(state.ckeys[layer], state.nc, q, ctx, n_blocks,
                                                   stride=state.stride, block_size=state.block_size)
    s = state.stride
    ck = state.ckeys[layer, :, : state.nc]
    if ck.dtype == torch.float8_e4m3fn:
        q = select_kernels.fp8_query(q)  # the kernel's query type for fp8 keys (fp16 for a bf16 query)
        ck = ck.to(q.dtype)  # e4m3 values are exact in fp16/bf16/fp32: the dot runs in q's type
    logits = torch.matmul(q.to(ck.dtype), ck.transpose(1, 2)).float() / math.sqrt(q.shape[-1])  # [R, G, NC]
    n_c = torch.clamp((ctx - 2 * s) // s + 1, min=0)
    valid = torch.arange(state.nc, device=q.device)[None, :] < n_c[:, None]
    p = torch.softmax(logits.masked_fill(~valid[:, None, :], float("-inf")), -1).nan_to_num_(0.0).sum(1)
    per = state.block_size // s
    width = per * n_blocks
    p = F.pad(p, (1, max(0, width - p.shape[1])), value=float("-inf"))[:, : width + 1]
    return p.unfold(1, per + 1, per).amax(-1)


def _take_top(score: torch.Tensor, allowed: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    key = torch.where(allowed, torch.nan_to_num(score.double(), nan=float("-inf")), float("nan"))
    order = torch.sort(-key, dim=1, stable=True).indices  # NaN last, equal scores keep ascending ids
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return allowed & (rank < budget[:, None])


def select_blocks_gpu(qaware: torch.Tensor, ctx: torch.Tensor, *, k: int, k_q: int | None = None, sink: int = 1,
                      window: int = 16, block_size: int = 64, agnostic: torch.Tensor | None = None,
                      use_triton: bool | None = None) -> torch.Tensor:
    """``nosasim.select.select_blocks`` on the device: ids ``int64 [R, k]`` sorted, -1 padded."""
    nb = qaware.shape[1]
    k_q_eff = k if (k_q is None or agnostic is None) else k_q
    if _want_triton(use_triton, qaware) and qaware.dtype in select_kernels.SCORE_DTYPES and (
            agnostic is None or agnostic.dtype in select_kernels.SCORE_DTYPES):  # float64 would lose order in fp32
        return select_kernels.select_blocks_triton(qaware, ctx, k=k, k_q_eff=k_q_eff, sink=sink, window=window,
                                                   block_size=block_size, agnostic=agnostic)
    tail = (ctx.long() - 1) // block_size
    col = torch.arange(nb, device=qaware.device)[None, :]
    complete = col < tail[:, None]
    forced = complete & ((col < sink) | (col >= (tail - (window - 1))[:, None]))
    q_budget = torch.clamp(k_q_eff - 1 - forced.sum(1), min=0)
    chosen = forced | _take_top(qaware, complete & ~forced, q_budget)
    if agnostic is not None and k_q_eff < k:
        e_budget = torch.clamp(k - 1 - chosen.sum(1), min=0)
        chosen = chosen | _take_top(agnostic, complete & ~chosen, e_budget)
    chosen = chosen | (complete & (tail <= k - 1)[:, None])
    ids = torch.where(chosen, col, nb).sort(dim=1).values[:, :k]
    if ids.shape[1] < k:
        ids = F.pad(ids, (0, k - ids.shape[1]), value=nb)
    return torch.where(ids == nb, -1, ids)
