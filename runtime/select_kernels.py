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

``select_fused`` does scoring and selection in one launch (``launches=1``) or two (``launches=2``). Its logits pass
(``_fused_kernel``) gives each program ``tiles`` consecutive chunks of ``BN`` compressed keys in a software-pipelined
loop, so several key tiles are in flight per program and a program's fixed costs (query load, context, launch) are
paid once per ``tiles * BN`` keys rather than per chunk. It writes the same fp32 logits and per-chunk softmax
statistics as ``_logits_kernel``. With one launch, each program then counts itself done on a per-row counter; the
row's last program (the others' writes are visible to it: barrier, then an acquire-release atomic) merges the
statistics, pools the block scores in registers and selects from them, while other rows still stream: the pool and
selection passes cost no launch and mostly hide under the key reads. With two launches the same row tail runs in
``_pool_select_kernel``, one program per row. Both compute exactly today's arithmetic (same chunks, same merge, same
pooling order, the same ``_take_top``), so the block scores equal ``qaware_scores_triton``'s whenever the logits do,
and the ids equal ``select_blocks_triton``'s from the same block scores.
"""

from __future__ import annotations

import functools
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
    def _take_from_bound(key, allowed, budget, t):
        """Every allowed key above the bound ``t``, then those equal to it from the lowest index until ``budget``
        are taken (the stable sort's tie rule): the end of every radix search."""
        gt = allowed & (key > t)
        need = budget - tl.sum(gt.to(tl.int32), axis=0)
        tie = allowed & (key == t)
        return gt | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= need))

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
        if RADIX == 1:
            # One candidate per pass: a scalar bound and a 1-D count, with no [digits, NBP] tile (whose broadcast
            # of the keys costs a layout change per pass, the larger part of a pass at 2,048+ blocks).
            u1 = tl.zeros([], tl.int32)
            for p in tl.static_range(32):
                bit = tl.full([], 1, tl.int32) << (31 - p)
                cnt1 = tl.sum((key >= ((u1 | bit) ^ top)).to(tl.int32), axis=0)
                u1 = tl.where(cnt1 >= budget, u1 | bit, u1)
            return _take_from_bound(key, allowed, budget, u1 ^ top)
        if RADIX == 8:
            # One byte per pass from a 256-bin histogram (``tl.histogram``: warp ballots, no [256, NBP] compare
            # tile): four passes instead of 32. Every lane is counted, the disallowed ones as INT32_MIN (unsigned
            # 0), so the bound is the one the compare passes find, down to INT32_MIN when fewer are allowed.
            ku = (key ^ top).to(tl.uint32, bitcast=True)  # unsigned order = the signed key's order
            bins = tl.arange(0, 256)
            u8 = tl.zeros([], tl.uint32)
            need8 = budget + tl.zeros([], tl.int32)
            for p in tl.static_range(4):
                sh8 = 24 - 8 * p
                dig = ((ku >> sh8) & 255).to(tl.int32)
                if p == 0:
                    h = tl.histogram(dig, 256)
                else:  # only the lanes whose higher bytes equal the bound's so far
                    h = tl.histogram(dig, 256, mask=(ku >> (sh8 + 8)) == (u8 >> (sh8 + 8)))
                ge = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # lanes with this digit or a larger one
                # ``ge`` falls with the digit, so the digits that still reach ``need8`` are a prefix 0..d.
                d8 = tl.max(tl.where(ge >= need8, bins, 0), axis=0)
                need8 = need8 - tl.sum(tl.where(bins > d8, h, 0), axis=0)
                u8 = u8 | (d8.to(tl.uint32) << sh8)
            return _take_from_bound(key, allowed, budget, u8.to(tl.int32, bitcast=True) ^ top)
        u = tl.zeros([1], tl.int32)
        for p in tl.static_range(32 // RADIX):
            shift = 32 - RADIX * (p + 1)
            cand = (u | (digit << shift)) ^ top  # [NR], signed
            hit = key[None, :] >= cand[:, None]
            cnt = tl.sum(hit.to(tl.int32), axis=1)
            # Counts fall with the digit, so the digits that still reach the budget are a prefix 0..d.
            d = tl.maximum(tl.sum((cnt >= budget).to(tl.int32), axis=0) - 1, 0)
            u = u | (d << shift)
        return _take_from_bound(key, allowed, budget, u ^ top)

    @triton.jit
    def _select_row(r, qs, c, ag_ptr, ag_stride, out_ptr, nb, K, KQ, SINK, WINDOW, BS,
                    HAS_AGN: tl.constexpr, NBP: tl.constexpr, KP: tl.constexpr, RADIX: tl.constexpr):
        """The sink/window/top-k rule of one row from its fp32 block scores ``qs [NBP]`` (entries past ``nb`` are
        ignored) at context ``c``; writes the row's ``K`` sorted ids, -1 padded. One function for
        ``_select_kernel`` and the fused row tail, so the two cannot drift apart."""
        col = tl.arange(0, NBP)
        inb = col < nb
        tail = tl.where(c > 0, (c - 1) // BS, 0)  # complete blocks; ctx 0 (no tail) selects nothing either way
        complete = inb & (col < tail)
        forced = complete & ((col < SINK) | (col >= tail - (WINDOW - 1)))
        q_budget = tl.maximum(KQ - 1 - tl.sum(forced.to(tl.int32), axis=0), 0)
        qkey = _order_key(qs)
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
    def _select_kernel(qs_ptr, qs_stride, ag_ptr, ag_stride, ctx_ptr, out_ptr, nb, K, KQ, SINK, WINDOW, BS,
                       HAS_AGN: tl.constexpr, NBP: tl.constexpr, KP: tl.constexpr, RADIX: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        col = tl.arange(0, NBP)
        c = tl.load(ctx_ptr + r).to(tl.int32)
        qs = tl.load(qs_ptr + r * qs_stride + col, mask=col < nb, other=0.0).to(tl.float32)
        _select_row(r, qs, c, ag_ptr, ag_stride, out_ptr, nb, K, KQ, SINK, WINDOW, BS, HAS_AGN, NBP, KP, RADIX)

    @triton.jit
    def _nc_at(c, NC, STRIDE: tl.constexpr):
        """Complete compressed keys at context ``c``: ``(c - 2s) // s + 1`` floored, clamped to [0, NC]."""
        n = tl.where(c >= 2 * STRIDE, (c - 2 * STRIDE) // STRIDE + 1, 0)
        return tl.minimum(n, NC)

    @triton.jit
    def _n_compressed(ctx_ptr, r, NC, STRIDE: tl.constexpr):
        return _nc_at(tl.load(ctx_ptr + r).to(tl.int32), NC, STRIDE)

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
                acc = tl.dot(qq, tl.trans(kk.to(qq.dtype)))  # fp8 keys: converted here, after the load
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
                     STRIDE: tl.constexpr, PER: tl.constexpr, TP: tl.constexpr, BB: tl.constexpr,
                     BPP: tl.constexpr):
        """Block scores of ``BPP`` tiles of ``BB`` blocks of row ``program_id(0)`` (tile group ``program_id(1)``).
        Each program merges the row's chunk statistics itself (``G * NCH`` numbers, cheap), so a row's blocks are
        pooled by many programs at once instead of one program looping over them all (at 128K, 17 tiles in a row
        left the pass latency-bound at about 4x its bytes)."""
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
        for b0 in range(tl.program_id(1) * BB * BPP, tl.minimum(NB, (tl.program_id(1) + 1) * BB * BPP), BB):
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

    @triton.jit
    def _row_tail(r, c, n_c, lg_ptr, lg_sr, lg_sg, mx_ptr, se_ptr, NCH, ag_ptr, ag_sr, ids_ptr, sc_ptr, sc_sr,
                  NC, nb, K, KQ, SINK, WINDOW, BS, BN: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                  CHP: tl.constexpr, PER: tl.constexpr, NBP: tl.constexpr, KP: tl.constexpr, RADIX: tl.constexpr,
                  HAS_AGN: tl.constexpr):
        """One row after its logits exist: ``_pool_kernel``'s arithmetic over all ``NBP`` blocks at once (the block
        scores stay in registers), then ``_select_row`` on them. The scores are also stored, always: 4 bytes a
        block is ~0.4% of the keys' bytes, less than another compiled variant costs.

        Loads bypass L1 (``.cg``): the logits and statistics were written by other programs, possibly on other SMs,
        during this same launch."""
        g = tl.arange(0, GP)
        ch = tl.arange(0, CHP)
        ok = (g < G)[:, None] & (ch < NCH)[None, :] & (ch * BN < n_c)[None, :]
        at = (r * G + g[:, None]) * NCH + ch[None, :]
        cm = tl.load(mx_ptr + at, mask=ok, other=float("-inf"), cache_modifier=".cg")
        m = tl.max(cm, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)  # padding heads (and n_c == 0): keeps exp() free of NaN
        cs = tl.load(se_ptr + at, mask=ok, other=0.0, cache_modifier=".cg")
        s = tl.sum(tl.where(ok, cs * tl.exp(cm - m[:, None]), 0.0), axis=1)
        s = tl.where(s > 0, s, 1.0)
        # Block i max-pools the keys j = PER*i - 1 .. PER*i + PER - 1 that exist (j < NC), as _pool_kernel does: the
        # block's own PER keys, then ``tl.maximum`` with the one before. One [G, NBP] tile per tap instead of a
        # [blocks, taps] tile per head keeps registers flat at 2,049 blocks; max is exact, so the grouping changes
        # nothing, and the group sum adds the heads in order, as _pool_kernel's loop does.
        i = tl.arange(0, NBP)
        inb = i < nb
        hm = g < G
        own = tl.full([NBP], float("-inf"), tl.float32)
        prev = tl.full([NBP], float("-inf"), tl.float32)
        for t in tl.static_range(PER + 1):
            j = i * PER + (t - 1)  # t == 0: the key before the block
            tap = inb & (j >= 0) & (j < NC)
            live = hm[:, None] & (tap & (j < n_c))[None, :]
            x = tl.load(lg_ptr + r * lg_sr + g[:, None] * lg_sg + j[None, :], mask=live, other=float("-inf"),
                        cache_modifier=".cg")
            p = tl.sum(tl.where(live, tl.exp(x - m[:, None]) / s[:, None], 0.0), axis=0)
            v = tl.where(tap, p, float("-inf"))
            if t == 0:
                prev = v
            elif t == 1:
                own = v
            else:  # NaN-ignoring, as the reduction _pool_kernel takes over these taps (GPU and interpreter alike)
                own = tl.where((v > own) | (own != own), v, own)  # noqa: PLR0124 - the NaN test
        blk = tl.maximum(own, prev)
        tl.store(sc_ptr + r * sc_sr + i, blk, mask=inb)
        _select_row(r, tl.where(inb, blk, 0.0), c, ag_ptr, ag_sr, ids_ptr, nb, K, KQ, SINK, WINDOW, BS,
                    HAS_AGN, NBP, KP, RADIX)

    @triton.jit
    def _fused_kernel(q_ptr, q_sr, q_sg, ck_ptr, ck_sr, ck_sj, ctx_ptr, ctx_s, lg_ptr, lg_sr, lg_sg, mx_ptr, se_ptr,
                      cnt_ptr, ag_ptr, ag_sr, ids_ptr, sc_ptr, sc_sr, NC, NCH, SPLITS, nb, K, KQ, SINK, WINDOW, BS,
                      sqrt_d, G: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                      DP: tl.constexpr, BN: tl.constexpr, TILES: tl.constexpr, STAGES: tl.constexpr,
                      STRIDE: tl.constexpr, IEEE: tl.constexpr, TAIL: tl.constexpr, CHP: tl.constexpr,
                      PER: tl.constexpr, NBP: tl.constexpr, KP: tl.constexpr, RADIX: tl.constexpr,
                      HAS_AGN: tl.constexpr):
        """Program ``(row, split)``: the logits and per-chunk statistics of ``TILES`` chunks of ``BN`` keys, exactly
        as ``_logits_kernel`` computes each chunk; with ``TAIL`` the row's last program to finish then runs
        ``_row_tail``. A 1-D grid with the split fastest, so a row's programs run side by side and its logits are
        still in L2 when the tail reads them back."""
        pid = tl.program_id(0)
        sp = pid % SPLITS
        r = (pid // SPLITS).to(tl.int64)
        c = tl.load(ctx_ptr + r * ctx_s).to(tl.int32)
        n_c = _nc_at(c, NC, STRIDE)
        lo = sp * (TILES * BN)
        if lo < n_c:  # splits past the complete keys read and write nothing (the tail masks their chunks)
            g = tl.arange(0, GQ)
            d = tl.arange(0, DP)
            gm = g < G
            qq = tl.load(q_ptr + r * q_sr + g[:, None] * q_sg + d[None, :], mask=gm[:, None] & (d < D)[None, :],
                         other=0.0)
            if IEEE:
                qq = qq.to(tl.float32)
            # A static trip count: the pipeliner keeps STAGES - 1 tiles in flight; chunks past n_c in the row's last
            # split are predicated off (no bytes move).
            for t in tl.range(0, TILES, num_stages=STAGES):
                j0 = lo + t * BN
                j = j0 + tl.arange(0, BN)
                jm = j < n_c
                if DP == D:  # no mask along the contiguous dimension: full-width vector loads
                    km = jm[:, None]
                else:
                    km = jm[:, None] & (d < D)[None, :]
                # Keys are read once: evict them first, so the row's logits stay in L2 until its tail reads them (at
                # ~4 TB/s the keys turn the whole L2 over in about one program's lifetime).
                kk = tl.load(ck_ptr + r * ck_sr + j[:, None].to(tl.int64) * ck_sj + d[None, :], mask=km, other=0.0,
                             eviction_policy="evict_first")
                if IEEE:
                    acc = tl.dot(qq, tl.trans(kk.to(tl.float32)), input_precision="ieee")
                else:
                    acc = tl.dot(qq, tl.trans(kk))
                logit = acc / sqrt_d  # [GQ, BN]
                tl.store(lg_ptr + r * lg_sr + g[:, None] * lg_sg + j[None, :], logit, mask=gm[:, None] & jm[None, :])
                x = tl.where(jm[None, :], logit, float("-inf"))
                mt = tl.max(x, axis=1)
                at = (r * G + g) * NCH + j0 // BN
                live = gm & (j0 < n_c)  # a chunk with no complete key keeps no statistics (as _logits_kernel)
                tl.store(mx_ptr + at, mt, mask=live)
                mt = tl.where(j0 < n_c, mt, 0.0)  # a dead chunk's max is -inf: keep its (unstored) sum free of NaN
                tl.store(se_ptr + at, tl.sum(tl.exp(x - mt[:, None]), axis=1), mask=live)
        if TAIL:
            # Every thread's stores above come before the count (barrier), and the count releases them at GPU scope;
            # the last program's acquire makes all of the row's stores visible to it. The last one also re-arms the
            # counter for the next launch, so a replayed CUDA graph needs no reset of its own.
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + r, 1, sem="acq_rel", scope="gpu")
            if done == SPLITS - 1:
                tl.store(cnt_ptr + r, 0)
                _row_tail(r, c, n_c, lg_ptr, lg_sr, lg_sg, mx_ptr, se_ptr, NCH, ag_ptr, ag_sr, ids_ptr, sc_ptr,
                          sc_sr, NC, nb, K, KQ, SINK, WINDOW, BS, BN, G, GP, CHP, PER, NBP, KP, RADIX, HAS_AGN)

    @triton.jit
    def _pool_select_kernel(ctx_ptr, ctx_s, lg_ptr, lg_sr, lg_sg, mx_ptr, se_ptr, ag_ptr, ag_sr, ids_ptr, sc_ptr,
                            sc_sr, NC, NCH, nb, K, KQ, SINK, WINDOW, BS, BN: tl.constexpr, G: tl.constexpr,
                            GP: tl.constexpr, CHP: tl.constexpr, STRIDE: tl.constexpr, PER: tl.constexpr,
                            NBP: tl.constexpr, KP: tl.constexpr, RADIX: tl.constexpr, HAS_AGN: tl.constexpr):
        """The row tail as its own launch, one program per row (``select_fused(launches=2)``)."""
        r = tl.program_id(0).to(tl.int64)
        c = tl.load(ctx_ptr + r * ctx_s).to(tl.int32)
        _row_tail(r, c, _nc_at(c, NC, STRIDE), lg_ptr, lg_sr, lg_sg, mx_ptr, se_ptr, NCH, ag_ptr, ag_sr, ids_ptr,
                  sc_ptr, sc_sr, NC, nb, K, KQ, SINK, WINDOW, BS, BN, G, GP, CHP, PER, NBP, KP, RADIX, HAS_AGN)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# The GPU's radix below and from 2,048 padded blocks (select_blocks_triton's docstring says why).
RADIX_SHORT, RADIX_LONG = 1, 1


def select_blocks_triton(qaware: torch.Tensor, ctx: torch.Tensor, *, k: int, k_q_eff: int, sink: int, window: int,
                         block_size: int, agnostic: torch.Tensor | None, radix: int | None = None,
                         num_warps: int | None = None) -> torch.Tensor:
    """The kernel behind ``selection.select_blocks_gpu`` (``k_q_eff`` already resolved): ``int64 [R, k]``.

    ``radix``: key bits settled per search pass (1, 2, 4 or 8). Default on the GPU: 1 (``RADIX_SHORT`` and
    ``RADIX_LONG``), one bit per pass on a scalar bound and a 1-D count, with one warp per 512 padded blocks: on an
    H200 it beat radix 2 by 1.27-1.35x at 130 blocks and 1.5x at 1,026 (9.9 against 13.4 us and 61.8 against 94.8 us
    at 1,024 rows), and radix 2 and 4 (whose ``[2**radix, NBP]`` compares cost a layout change per pass) at 2,050;
    radix 8's byte histograms (``tl.histogram``, four passes) were 1.6-2.4x slower than radix 1 at every size there
    (benchmarks/results/bench_tune-h200-select-r8.json). 8 in the interpreter, where each pass's fixed cost
    dominates."""
    if radix is None:
        radix = (RADIX_LONG if _pow2(qaware.shape[1]) >= 2048 else RADIX_SHORT) if qaware.is_cuda else 8
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
    if num_warps is None:  # H200, radix 1: one warp per 512 padded blocks was fastest (fewer barriers per pass)
        num_warps = max(1, min(8, nbp // 512))
    _select_kernel[(R,)](qaware, qaware.stride(0), ag, ag.stride(0), ctx, out, nb, k, k_q_eff, sink, window,
                         block_size, HAS_AGN=has_agn, NBP=nbp, KP=_pow2(k), RADIX=radix, num_warps=num_warps)
    return out


# Tiles of 128 blocks per pool program: the pool grid is rows x ceil(blocks / (128 * POOL_TILES)). One tile per
# program made H200 decode steps at 128K 2.6-4.7% faster than one program per row looping over its tiles (side by
# side, benchmarks/results/bench_select_e2e-h200.json); timed alone, the scoring pair changed by 1% or less.
POOL_TILES = 1

# Scoring fp8 keys with fp16 dots: on an H200, 394 against 459 us (bf16 dots) and 603 us (bf16 keys) at batch 128,
# 128K (benchmarks/results/bench_ckey8-h200.json); a bf16 query is exact in fp16 down to 2^-14 in magnitude.
FP8_KEY_DOTS_IN_F16 = True


def fp8_query(q: torch.Tensor) -> torch.Tensor:
    """The query as fp8 compressed keys are scored against: fp16 for a bf16 query (``FP8_KEY_DOTS_IN_F16``)."""
    return q.to(torch.float16) if FP8_KEY_DOTS_IN_F16 and q.dtype == torch.bfloat16 else q


def qaware_scores_triton(ckeys: torch.Tensor, nc: int, q: torch.Tensor, ctx: torch.Tensor, n_blocks: int, *,
                         stride: int, block_size: int, bn: int | None = None, num_warps: int = 4, bb: int = 128,
                         pool_warps: int = 4, pool_tiles: int | None = None) -> torch.Tensor:
    """The kernels behind ``selection.qaware_block_scores``: ``ckeys [R, >= NC, D]`` (one layer), ``q [R, G, D]``,
    context lengths ``ctx [R]``; returns float32 ``[R, n_blocks]``.

    ``bn``: compressed keys per logits program; default 64, and 128 past 4,096 keys (64K-token contexts), which
    halves the chunk statistics the pool pass merges (4% faster at 128K on an H200, benchmarks/bench_tune.py).
    ``pool_tiles``: tiles of ``bb`` blocks per pool program (default ``POOL_TILES`` on the GPU)."""
    if bn is None:
        bn = 128 if nc > 4096 else 64
    R, G, D = q.shape
    out = torch.empty((R, n_blocks), dtype=torch.float32, device=q.device)
    if R == 0 or n_blocks == 0:
        return out
    if ckeys.stride(2) != 1 or q.stride(2) != 1:
        raise ValueError("qaware_scores_triton: keys and queries must be contiguous along the head dimension")
    if ckeys.dtype not in SCORE_DTYPES + (torch.float8_e4m3fn,):
        raise ValueError(f"qaware_scores_triton: ckeys dtype must be one of {SCORE_DTYPES} or torch.float8_e4m3fn, "
                         f"got {ckeys.dtype}")
    if ckeys.dtype == torch.float8_e4m3fn:
        # fp8 keys are converted in the kernel, exactly, to q's type; a bf16 q is rounded to fp16 first (fp8_query),
        # since e4m3 -> fp16 is the cheaper conversion (benchmarks/bench_ckey8.py). fp32 runs the ieee dot.
        if q.dtype not in SCORE_DTYPES:
            raise ValueError(f"qaware_scores_triton: q dtype must be one of {SCORE_DTYPES}, got {q.dtype}")
        q = fp8_query(q)
    elif q.dtype != ckeys.dtype:  # torch's rounding, done by torch (the interpreter's own fp32 -> bf16 truncates)
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
            IEEE=q.dtype == torch.float32 or not ckeys.is_cuda, num_warps=num_warps)
    bb = min(bb, _pow2(n_blocks))
    if pool_tiles is None:
        pool_tiles = POOL_TILES if q.is_cuda else triton.cdiv(n_blocks, bb)  # interpreter: one program per row
    _pool_kernel[(R, triton.cdiv(n_blocks, bb * pool_tiles))](
        logits, logits.stride(0), logits.stride(1), cmax, csum, ctx, out, out.stride(0), nch, bn,
        NC=nc, NB=n_blocks, G=G, GP=_pow2(G), CHP=_pow2(nch), STRIDE=stride, PER=per, TP=_pow2(per), BB=bb,
        BPP=pool_tiles, num_warps=pool_warps)
    return out


# Scratch buffers are plain ``torch.empty``: the kernels never read what they did not write in the same call (the
# tests poison them through this alias to prove it).
_scratch_empty = torch.empty
# Per-device row counters of the one-launch path, all zero between launches (each launch's last program per row
# re-arms its counter). Grown, never shrunk or freed: a captured CUDA graph keeps the address it was captured with.
_COUNTERS: dict = {}
_RETIRED: list = []


def _counters(device: torch.device, rows: int) -> torch.Tensor:
    index = device.index if device.index is not None or device.type != "cuda" else torch.cuda.current_device()
    key = (device.type, index)
    have = _COUNTERS.get(key)
    if have is not None and have.numel() >= rows:
        return have
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # A buffer zeroed during capture would be zeroed only when the graph replays, so a larger one cannot be
        # cached here; this call gets its own (one memset node in the graph). Warm up outside the capture to avoid.
        return torch.zeros(rows, dtype=torch.int32, device=device)
    if have is not None:
        _RETIRED.append(have)
    _COUNTERS[key] = torch.zeros(max(rows, 1 << 14), dtype=torch.int32, device=device)
    return _COUNTERS[key]


@functools.lru_cache(maxsize=None)
def _sm_count(device_type: str, index: int | None) -> int:
    if device_type != "cuda":
        return 4  # the interpreter: few programs, and tests pick ``tiles`` themselves
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                            ).multi_processor_count


def _auto_tiles(rows: int, nch: int, sms: int) -> int:
    """Key chunks per program: up to 8 (a 64-key chunk is 16 KiB of bf16 keys, so up to 128 KiB per program
    amortises its fixed costs), halved while the grid would give fewer than two programs per SM (small batches and
    contexts need the splits to fill the GPU). Between half that and that, the count that leaves the fewest
    iterations past the last chunk (the loop's trip count is static): 65 chunks run as 13 programs of 5, not 9 of 8
    whose last one idles through 7."""
    most = 8
    while most > 1 and rows * triton.cdiv(nch, most) < 2 * sms:
        most //= 2
    most = min(most, nch)
    return min(range(max(1, most // 2), most + 1), key=lambda t: (triton.cdiv(nch, t) * t - nch, -t))


def _check_fused(ckeys, nc, q, ctx, n_blocks, k, k_q_eff, sink, window, block_size, agnostic, stride, launches, bn,
                 tiles, num_stages, num_warps, tail_warps, radix, out_ids, out_scores):
    def bad(field, msg):
        raise ValueError(f"select_fused: {field} {msg}")

    if q.dim() != 3:
        bad("q", f"must be [rows, group, head_dim], got shape {tuple(q.shape)}")
    R, G, D = q.shape
    if ckeys.dim() != 3 or ckeys.shape[0] != R or ckeys.shape[2] != D:
        bad("ckeys", f"must be [rows={R}, >= nc, head_dim={D}], got shape {tuple(ckeys.shape)}")
    if ckeys.stride(2) != 1 or q.stride(2) != 1:
        bad("ckeys/q", "must be contiguous along the head dimension")
    if ckeys.dtype not in SCORE_DTYPES:
        bad("ckeys", f"dtype must be one of {SCORE_DTYPES}, got {ckeys.dtype}")
    if not 0 <= nc <= ckeys.shape[1]:
        bad("nc", f"must lie in [0, ckeys.shape[1]={ckeys.shape[1]}], got {nc}")
    if ctx.dim() != 1 or ctx.shape[0] != R or ctx.dtype.is_floating_point or ctx.dtype == torch.bool:
        bad("ctx", f"must be an integer tensor [rows={R}], got {ctx.dtype} {tuple(ctx.shape)}")
    if len({t.device for t in (ckeys, q, ctx)}) != 1:
        bad("ckeys/q/ctx", "must be on one device")
    if n_blocks < 0:
        bad("n_blocks", f"must be >= 0, got {n_blocks}")
    if k < 1:
        bad("k", f"must be >= 1, got {k}")
    if not 1 <= k_q_eff <= k:
        bad("k_q_eff", f"must lie in [1, k={k}], got {k_q_eff}")
    if sink < 0 or window < 1:
        bad("sink/window", f"must be >= 0 and >= 1, got {sink}, {window}")
    if stride < 1 or block_size < stride or block_size % stride:
        bad("block_size", f"must be a positive multiple of stride={stride}, got {block_size}")
    if agnostic is not None:
        if agnostic.shape not in ((R, n_blocks), (n_blocks,)):
            bad("agnostic", f"must be [rows={R}, n_blocks={n_blocks}] or [n_blocks], got {tuple(agnostic.shape)}")
        if agnostic.dtype not in SCORE_DTYPES or agnostic.stride(-1) != 1 or agnostic.device != q.device:
            bad("agnostic", f"must be a {SCORE_DTYPES} tensor on {q.device}, contiguous along the block axis")
    if launches not in (1, 2):
        bad("launches", f"must be 1 or 2, got {launches}")
    if bn < 16 or bn & (bn - 1):
        bad("bn", f"must be a power of two >= 16, got {bn}")
    if tiles is not None and tiles < 1:
        bad("tiles", f"must be >= 1, got {tiles}")
    if num_stages < 1:
        bad("num_stages", f"must be >= 1, got {num_stages}")
    for field, w in (("num_warps", num_warps), ("tail_warps", tail_warps)):
        if w is not None and w not in (1, 2, 4, 8, 16):
            bad(field, f"must be 1, 2, 4, 8 or 16, got {w}")
    if radix is not None and radix not in (1, 2, 4, 8):
        bad("radix", f"must be 1, 2, 4 or 8, got {radix}")
    if out_ids is not None and (out_ids.shape != (R, k) or out_ids.dtype != torch.int64
                                or not out_ids.is_contiguous() or out_ids.device != q.device):
        bad("out_ids", f"must be a contiguous int64 [{R}, {k}] tensor on {q.device}")
    if out_scores is not None and (out_scores.shape != (R, n_blocks) or out_scores.dtype != torch.float32
                                   or (n_blocks and out_scores.stride(1) != 1) or out_scores.device != q.device):
        bad("out_scores", f"must be a float32 [{R}, {n_blocks}] tensor on {q.device}, contiguous along blocks")


def select_fused(ckeys: torch.Tensor, nc: int, q: torch.Tensor, ctx: torch.Tensor, n_blocks: int, *, k: int,
                 k_q_eff: int, sink: int, window: int, block_size: int, agnostic: torch.Tensor | None, stride: int,
                 return_scores: bool = False, launches: int = 1, bn: int = 64, tiles: int | None = None,
                 num_stages: int = 3, num_warps: int | None = None, tail_warps: int | None = None,
                 radix: int | None = None, out_ids: torch.Tensor | None = None,
                 out_scores: torch.Tensor | None = None):
    """InfLLM-V2 / NOSA selection from compressed keys in one launch: ``qaware_scores_triton`` followed by
    ``select_blocks_triton``, same arguments, same results: ids ``int64 [R, k]`` sorted and -1 padded, and with
    ``return_scores`` also the fp32 block scores ``[R, n_blocks]`` they were selected from.

    ``ckeys [R, >= nc, D]``, ``q [R, G, D]`` and ``ctx [R]`` may be row slices of larger tensors (any row stride);
    ``agnostic`` is ``[R, n_blocks]`` (any row stride), ``[n_blocks]`` for all rows, or None (InfLLM-V2); it is used
    only when ``k_q_eff < k``. ``out_ids`` / ``out_scores``: buffers to write instead of new ones (every element is
    written).

    Knobs (the defaults are the expected best on an H100/H200; ``benchmarks/bench_select.py`` sweeps them):
    ``launches`` 1 (the row tail inside the logits launch) or 2 (a separate pool+select launch); ``bn`` keys per
    chunk (64: the chunking of ``qaware_scores_triton``, whose statistics these then equal); ``tiles`` chunks per
    program (None: 4 to 8, fewer when the grid would not fill the GPU, as evenly as the static loop allows);
    ``num_stages`` software-pipeline depth of the key loads (3: two 16 KiB tiles in flight per program);
    ``num_warps`` of the logits launch (None: 4, 8 from 4,096 padded blocks, where the tail's registers need them);
    ``tail_warps`` of the two-launch path's pool+select kernel (None: one per 256 padded blocks, 2 to 8); ``radix``
    of the top-k search (None: 2 on the GPU, 8 in the interpreter).

    One-launch calls share a per-device counter buffer: two of them must not run at once on different streams."""
    _check_fused(ckeys, nc, q, ctx, n_blocks, k, k_q_eff, sink, window, block_size, agnostic, stride, launches, bn,
                 tiles, num_stages, num_warps, tail_warps, radix, out_ids, out_scores)
    R, G, D = q.shape
    dev = q.device
    ids = out_ids if out_ids is not None else torch.empty((R, k), dtype=torch.int64, device=dev)
    scores = out_scores if out_scores is not None else torch.empty((R, n_blocks), dtype=torch.float32, device=dev)
    if R == 0:
        return (ids, scores) if return_scores else ids
    if q.dtype != ckeys.dtype:  # torch's rounding, done by torch (the interpreter's own fp32 -> bf16 truncates)
        q = q.to(ckeys.dtype)
    if radix is None:
        radix = 2 if ckeys.is_cuda else 8
    has_agn = agnostic is not None and k_q_eff < k
    ag, ag_sr = (agnostic, (agnostic.stride(0) if agnostic.dim() == 2 else 0)) if has_agn else (scores, 0)
    per = block_size // stride
    nch = triton.cdiv(max(nc, 1), bn)
    tiles = _auto_tiles(R, nch, _sm_count(dev.type, dev.index)) if tiles is None else min(tiles, nch)
    splits = triton.cdiv(nch, tiles)
    nbp = _pow2(max(n_blocks, 1))
    f32 = {"dtype": torch.float32, "device": dev}
    logits = _scratch_empty((R, G, max(nc, 1)), **f32)
    cmax = _scratch_empty((R, G, nch), **f32)
    csum = _scratch_empty((R, G, nch), **f32)
    # fp32 keys, and CPU tensors (Triton's interpreter multiplies bf16 operands of tl.dot as raw integers): an fp32
    # ieee dot, exact for 16-bit inputs as well.
    ieee = ckeys.dtype == torch.float32 or not ckeys.is_cuda
    sel = {"NBP": nbp, "KP": _pow2(k), "RADIX": radix, "HAS_AGN": has_agn}
    row = {"G": G, "GP": _pow2(G), "CHP": _pow2(nch), "PER": per}
    tail = launches == 1
    if num_warps is None:
        num_warps = 8 if tail and nbp >= 4096 else 4
    # The two-launch logits pass compiles once for all block counts: its tail constants are placeholders.
    consts = dict(sel, **row) if tail else {"NBP": 1, "KP": 1, "RADIX": 8, "HAS_AGN": False, "G": G, "GP": _pow2(G),
                                            "CHP": 1, "PER": 1}
    cnt = _counters(dev, R) if tail else ids
    _fused_kernel[(R * splits,)](
        q, q.stride(0), q.stride(1), ckeys, ckeys.stride(0), ckeys.stride(1), ctx, ctx.stride(0), logits,
        logits.stride(0), logits.stride(1), cmax, csum, cnt, ag, ag_sr, ids, scores, scores.stride(0), nc, nch,
        splits, n_blocks, k, k_q_eff, sink, window, block_size, math.sqrt(D), GQ=max(16, _pow2(G)), D=D,
        DP=max(16, _pow2(D)), BN=bn, TILES=tiles, STAGES=num_stages, STRIDE=stride, IEEE=ieee, TAIL=tail,
        num_warps=num_warps, **consts)
    if not tail:
        if tail_warps is None:
            tail_warps = max(2, min(8, nbp // 256))
        _pool_select_kernel[(R,)](
            ctx, ctx.stride(0), logits, logits.stride(0), logits.stride(1), cmax, csum, ag, ag_sr, ids, scores,
            scores.stride(0), nc, nch, n_blocks, k, k_q_eff, sink, window, block_size, BN=bn, STRIDE=stride,
            num_warps=tail_warps, **sel, **row)
    return (ids, scores) if return_scores else ids
