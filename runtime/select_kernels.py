"""Triton kernels for block selection: query-aware block scores and the sink/window/top-k rule.

They compute the same functions as the torch code in ``runtime.selection`` (which stays the CPU path and the
reference), in three launches of fixed shape, with no host sync, so a decode step that uses them can be captured in
a CUDA graph.

Scoring is two kernels. ``_logits_kernel`` runs on a ``rows x chunks`` grid, so even a few rows fill the GPU while
it streams the compressed keys (the one large read: ``NC * D`` elements per row; ~2.5 TB/s on an H100); it writes
fp32 logits, 16 bytes per compressed key instead of the key's 256, to a scratch buffer, plus each chunk's softmax
max and sum per head. ``_pool_kernel`` (one program per row) merges those statistics, reads the logits back once,
sums the group's probabilities and max-pools them onto blocks. Chunks past a row's complete compressed keys are
neither read nor written.

Selection (``_select_kernel``, one program per row) picks each top-``budget`` set exactly, without sorting: scores
map to order-preserving 32-bit keys (NaN lowest, then -inf, and -0.0 equal to +0.0, as the torch rule ranks them),
a radix search finds the ``budget``-th largest key among the allowed blocks, every allowed block above it is taken,
and an inclusive prefix count over the blocks equal to it takes the lowest ids first, which is the stable sort's tie
rule.
"""

from __future__ import annotations

import math

import torch

try:  # Triton is only on GPU machines (and in CPU tests, interpreted); the torch path computes the same functions.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

AVAILABLE = triton is not None
SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if triton is not None:

    @triton.jit
    def _order_key(x):
        """float32 -> int32 whose signed order is the torch rule's: NaN (INT32_MIN + 1) < -inf < finite < +inf.
        INT32_MIN itself is left free for blocks that may not be taken."""
        x = tl.where(x == 0.0, 0.0, x)  # -0.0 and +0.0 compare equal, so they must tie (lower id first)
        b = x.to(tl.int32, bitcast=True)
        # Non-negative floats order like their bits; negative ones in reverse, so flip their magnitude bits. Only
        # NaN patterns (0xFFFFFFFF, 0xFFFFFFFE) would map to INT32_MIN or INT32_MIN + 1, so every non-NaN key is
        # above NaN's.
        key = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
        return tl.where(x != x, -2147483647, key)  # noqa: PLR0124 - the NaN test

    @triton.jit
    def _take_top(key, allowed, budget, RADIX: tl.constexpr):
        """Mask of the ``budget`` largest ``key`` among ``allowed`` (all of them if fewer), ties to the lower index.

        Radix search, most significant digit first, for ``t`` = the largest value with
        ``count(allowed & key >= t) >= budget``: each pass tries all ``2**RADIX`` digits at once (one reduction per
        pass instead of one per bit). The search runs on the key's bits read as unsigned (``u``), the comparisons
        on the signed key: flipping the top bit maps one order onto the other, and bit operations never overflow."""
        NR: tl.constexpr = 1 << RADIX
        digit = tl.arange(0, NR)
        top = -2147483648  # the sign bit
        # Blocks that may not be taken get INT32_MIN, below every key, so the passes need not test ``allowed``: while
        # the budget is within the allowed count, ``t`` stays above INT32_MIN; past it, ``t`` ends at INT32_MIN and
        # the final masks below drop those blocks.
        key = tl.where(allowed, key, top)
        u = tl.zeros([1], tl.int32)
        for p in tl.static_range(32 // RADIX):
            shift = 32 - RADIX * (p + 1)
            cand = (u | (digit << shift)) ^ top  # [NR], signed
            hit = key[None, :] >= cand[:, None]
            cnt = tl.sum(hit.to(tl.int32), axis=1)
            # Counts fall with the digit, so the digits that still reach the budget are a prefix 0..d.
            d = tl.maximum(tl.sum((cnt >= budget).to(tl.int32), axis=0) - 1, 0)
            u = u | (d << shift)
        t = u ^ top
        gt = allowed & (key > t)
        need = budget - tl.sum(gt.to(tl.int32), axis=0)
        tie = allowed & (key == t)
        return gt | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))

    @triton.jit
    def _select_kernel(qs_ptr, qs_stride, ag_ptr, ag_stride, ctx_ptr, out_ptr, nb, K, KQ, SINK, WINDOW, BS,
                       HAS_AGN: tl.constexpr, NBP: tl.constexpr, KP: tl.constexpr, RADIX: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        col = tl.arange(0, NBP)
        inb = col < nb
        c = tl.load(ctx_ptr + r).to(tl.int32)
        tail = tl.where(c > 0, (c - 1) // BS, 0)  # complete blocks; ctx 0 (no tail) selects nothing either way
        complete = inb & (col < tail)
        forced = complete & ((col < SINK) | (col >= tail - (WINDOW - 1)))
        q_budget = tl.maximum(KQ - 1 - tl.sum(forced.to(tl.int32), axis=0), 0)
        qkey = _order_key(tl.load(qs_ptr + r * qs_stride + col, mask=inb, other=0.0).to(tl.float32))
        chosen = forced | _take_top(qkey, complete & ~forced, q_budget, RADIX)
        if HAS_AGN:
            e_budget = tl.maximum(K - 1 - tl.sum(chosen.to(tl.int32), axis=0), 0)
            akey = _order_key(tl.load(ag_ptr + r * ag_stride + col, mask=inb, other=0.0).to(tl.float32))
            chosen = chosen | _take_top(akey, complete & ~chosen, e_budget, RADIX)
        chosen = chosen | (complete & (tail <= K - 1))  # few blocks: everything complete fits
        # Sorted ids are the chosen columns at their prefix-count positions; the rest of the K slots get -1.
        # The two stores touch disjoint slots, so no ordering between them is needed.
        pos = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        n = tl.sum(chosen.to(tl.int32), axis=0)
        tl.store(out_ptr + r * K + pos, col.to(tl.int64), mask=chosen & (pos < K))
        slot = tl.arange(0, KP)
        tl.store(out_ptr + r * K + slot, tl.full([KP], -1, tl.int64), mask=(slot >= n) & (slot < K))

    @triton.jit
    def _n_compressed(ctx_ptr, r, NC, STRIDE: tl.constexpr):
        """Complete compressed keys at context ``ctx[r]``: ``(ctx - 2s) // s + 1`` floored, clamped to [0, NC]."""
        c = tl.load(ctx_ptr + r).to(tl.int32)
        n = tl.where(c >= 2 * STRIDE, (c - 2 * STRIDE) // STRIDE + 1, 0)
        return tl.minimum(n, NC)

    @triton.jit
    def _logits_kernel(q_ptr, q_sr, q_sg, ck_ptr, ck_sr, ck_sj, ctx_ptr, lg_ptr, lg_sr, lg_sg, mx_ptr, se_ptr,
                       NC, NCH, D, sqrt_d, G: tl.constexpr, GQ: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr,
                       STRIDE: tl.constexpr, IEEE: tl.constexpr):
        """Logits of one chunk of ``BN`` compressed keys for the G heads, plus the chunk's softmax statistics per
        head (max, and sum of exp(x - max)), so the pooling pass need not re-read every logit twice.

        The group is padded to GQ >= 16 rows for ``tl.dot``: on tensor cores the products of 16-bit inputs are exact
        and accumulate in fp32 (fp32 keys: ``ieee``, no tf32); done with elementwise products and row sums on the
        CUDA cores instead, this kernel was ALU-bound and ~1.5x slower on an H100."""
        r = tl.program_id(0).to(tl.int64)
        ch = tl.program_id(1)
        j0 = ch * BN
        n_c = _n_compressed(ctx_ptr, r, NC, STRIDE)
        if j0 < n_c:  # chunks past the complete keys: nothing read, nothing written (the pool masks them)
            g = tl.arange(0, GQ)
            j = j0 + tl.arange(0, BN)
            d = tl.arange(0, DP)
            gm = g < G
            jm = j < n_c
            dm = d < D
            qq = tl.load(q_ptr + r * q_sr + g[:, None] * q_sg + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
            kk = tl.load(ck_ptr + r * ck_sr + j[:, None].to(tl.int64) * ck_sj + d[None, :],
                         mask=jm[:, None] & dm[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(qq.to(tl.float32), tl.trans(kk.to(tl.float32)), input_precision="ieee")
            else:
                acc = tl.dot(qq, tl.trans(kk))
            logit = acc / sqrt_d  # [GQ, BN]
            ok = gm[:, None] & jm[None, :]
            tl.store(lg_ptr + r * lg_sr + g[:, None] * lg_sg + j[None, :], logit, mask=ok)
            x = tl.where(jm[None, :], logit, float("-inf"))
            m = tl.max(x, axis=1)
            at = (r * G + g) * NCH + ch
            tl.store(mx_ptr + at, m, mask=gm)
            tl.store(se_ptr + at, tl.sum(tl.exp(x - m[:, None]), axis=1), mask=gm)

    @triton.jit
    def _pool_kernel(lg_ptr, lg_sr, lg_sg, mx_ptr, se_ptr, ctx_ptr, out_ptr, out_sr, NCH, BN,
                     NC: tl.constexpr, NB: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, CHP: tl.constexpr,
                     STRIDE: tl.constexpr, PER: tl.constexpr, TP: tl.constexpr, BB: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        n_c = _n_compressed(ctx_ptr, r, NC, STRIDE)
        # Softmax statistics per head from the chunks' (torch takes one max and one sum; the same up to rounding).
        g = tl.arange(0, GP)
        ch = tl.arange(0, CHP)
        ok = (g < G)[:, None] & (ch < NCH)[None, :] & (ch * BN < n_c)[None, :]
        at = (r * G + g[:, None]) * NCH + ch[None, :]
        cm = tl.load(mx_ptr + at, mask=ok, other=float("-inf"))
        m = tl.max(cm, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)  # padding heads (and n_c == 0): keeps exp() free of NaN
        s = tl.sum(tl.where(ok, tl.load(se_ptr + at, mask=ok, other=0.0) * tl.exp(cm - m[:, None]), 0.0), axis=1)
        s = tl.where(s > 0, s, 1.0)
        # Block i max-pools compressed keys j in [PER*i - 1, PER*i + PER - 1] that exist (j < NC): the block's own
        # PER keys plus the one before. Keys that exist but are not complete (j >= n_c) have probability 0; a block
        # with no existing key scores -inf.
        t = tl.arange(0, TP)
        for b0 in range(0, NB, BB):
            i = b0 + tl.arange(0, BB)
            j = i[:, None] * PER + t[None, :]  # [BB, TP]
            tap = (t < PER)[None, :] & (j < NC)
            live = tap & (j < n_c)
            jp = i * PER - 1  # [BB]
            tap_p = (jp >= 0) & (jp < NC)
            live_p = tap_p & (jp < n_c)
            p = tl.zeros([BB, TP], tl.float32)
            pp = tl.zeros([BB], tl.float32)
            # One head at a time on 2-D tiles: a [G, BB, TP] tile summed over G crashed Triton 3.6's
            # thread-locality pass for some shapes.
            for h in tl.static_range(G):
                m_h = tl.sum(tl.where(g == h, m, 0.0), axis=0)
                s_h = tl.sum(tl.where(g == h, s, 0.0), axis=0)
                base = lg_ptr + r * lg_sr + h * lg_sg
                x = tl.load(base + j, mask=live, other=float("-inf"))
                p += tl.where(live, tl.exp(x - m_h) / s_h, 0.0)
                xp = tl.load(base + jp, mask=live_p, other=float("-inf"))
                pp += tl.where(live_p, tl.exp(xp - m_h) / s_h, 0.0)
            blk = tl.maximum(tl.max(tl.where(tap, p, float("-inf")), axis=1), tl.where(tap_p, pp, float("-inf")))
            tl.store(out_ptr + r * out_sr + i, blk, mask=i < NB)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def select_blocks_triton(qaware: torch.Tensor, ctx: torch.Tensor, *, k: int, k_q_eff: int, sink: int, window: int,
                         block_size: int, agnostic: torch.Tensor | None, radix: int | None = None,
                         num_warps: int | None = None) -> torch.Tensor:
    """The kernel behind ``selection.select_blocks_gpu`` (``k_q_eff`` already resolved): ``int64 [R, k]``.

    ``radix``: key bits settled per search pass (1, 2, 4 or 8). Default: 2 on the GPU (a ``[4, NBP]`` compare per
    pass keeps registers low); 8 in the interpreter, where each pass's fixed cost dominates."""
    if radix is None:
        radix = 2 if qaware.is_cuda else 8
    if radix not in (1, 2, 4, 8):
        raise ValueError(f"select_blocks_triton: radix must be 1, 2, 4 or 8, got {radix}")
    R, nb = qaware.shape
    out = torch.empty((R, k), dtype=torch.int64, device=qaware.device)
    if R == 0:
        return out
    has_agn = agnostic is not None and k_q_eff < k
    ag = agnostic.expand(R, nb) if has_agn else qaware
    if qaware.stride(1) != 1 or ag.stride(1) != 1:
        raise ValueError("select_blocks_triton: block scores must be contiguous along the block axis")
    nbp = _pow2(nb)
    if num_warps is None:  # H100, 768 rows: one warp per 256 blocks was fastest (fewer barriers per pass)
        num_warps = max(1, min(8, nbp // 256))
    _select_kernel[(R,)](qaware, qaware.stride(0), ag, ag.stride(0), ctx, out, nb, k, k_q_eff, sink, window,
                         block_size, HAS_AGN=has_agn, NBP=nbp, KP=_pow2(k), RADIX=radix, num_warps=num_warps)
    return out


def qaware_scores_triton(ckeys: torch.Tensor, nc: int, q: torch.Tensor, ctx: torch.Tensor, n_blocks: int, *,
                         stride: int, block_size: int, bn: int = 64, num_warps: int = 4, bb: int = 128,
                         pool_warps: int = 4) -> torch.Tensor:
    """The kernels behind ``selection.qaware_block_scores``: ``ckeys [R, >= NC, D]`` (one layer), ``q [R, G, D]``,
    context lengths ``ctx [R]``; returns float32 ``[R, n_blocks]``."""
    R, G, D = q.shape
    out = torch.empty((R, n_blocks), dtype=torch.float32, device=q.device)
    if R == 0 or n_blocks == 0:
        return out
    if ckeys.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError("qaware_scores_triton: keys and queries must be contiguous along the head dimension")
    if q.dtype != ckeys.dtype:  # torch's rounding, done by torch (the interpreter's own fp32 -> bf16 truncates)
        q = q.to(ckeys.dtype)
    per = block_size // stride
    nch = triton.cdiv(max(nc, 1), bn)
    f32 = {"dtype": torch.float32, "device": q.device}
    logits = torch.empty((R, G, max(nc, 1)), **f32)
    cmax = torch.empty((R, G, nch), **f32)
    csum = torch.empty((R, G, nch), **f32)
    if nc:
        _logits_kernel[(R, nch)](
            q, q.stride(0), q.stride(1), ckeys, ckeys.stride(0), ckeys.stride(1), ctx, logits,
            logits.stride(0), logits.stride(1), cmax, csum, nc, nch, D, math.sqrt(D),
            G=G, GQ=max(16, _pow2(G)), DP=max(16, _pow2(D)), BN=bn, STRIDE=stride,
            # fp32 keys, and CPU tensors (Triton's interpreter multiplies bf16 operands of tl.dot as raw integers):
            # an fp32 ieee dot, exact for 16-bit inputs as well.
            IEEE=ckeys.dtype == torch.float32 or not ckeys.is_cuda, num_warps=num_warps)
    _pool_kernel[(R,)](logits, logits.stride(0), logits.stride(1), cmax, csum, ctx, out, out.stride(0), nch, bn,
                       NC=nc, NB=n_blocks, G=G, GP=_pow2(G), CHP=_pow2(nch), STRIDE=stride, PER=per,
                       TP=_pow2(per), BB=min(bb, _pow2(n_blocks)), num_warps=pool_warps)
    return out
