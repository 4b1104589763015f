"""The numba hot loop of the block-cache engine (see docs/cache-semantics.md for the rules it implements).

Per row (layer, KV head, sequence) the state is a handful of fixed arrays over the row's blocks:

- ``pos[r, b]``: slot index of block ``b`` in ``slots[r]`` if it is resident, else -1 (O(1) hit test);
- ``slots[r, :nres[r]]``: the resident complete blocks; during a step the selected ones are moved to the front,
  so the candidates for eviction are a contiguous range, found without a scan;
- ``last[r, b]``: lru key (last step attended, -1 never); it doubles as the "selected at step t" mark, since
  every block selected at step ``t`` gets ``last == t`` and nothing else can have it;
- ``count[r, b]``: times selected (maintained for lfu only, the one policy that reads it);
- ``prev_tail[r]``: tail block of the previous step (-1 before the first step).

Rows are processed in tiles of a few rows, step by step inside a tile: a tile's state stays in L1/L2 cache while
its selections are read as one contiguous slice per step. Errors are returned as codes in ``err`` (numba
cannot format messages); the Python side turns them into ValueErrors naming the step and row.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .policies import BELADY, LFU, NEVER, PREV, STATIC, keep_key_nb

ERR_NONE, ERR_FUTURE, ERR_DUPLICATE, ERR_CAPACITY, ERR_BUG, ERR_NEGATIVE = 0, 1, 2, 3, 4, 5
# err layout: [code, local step, row, block id or selection size, tail or capacity]
ERR_FIELDS = 5


@njit(cache=True, inline="always")
def _evicted_before(pa, sa, ia, pb, sb, ib):
    """True if candidate a (keep key pa, sa, id ia) leaves before candidate b: smaller key, then lower id."""
    if pa != pb:
        return pa < pb
    if sa != sb:
        return sa < sb
    return ia < ib


@njit(cache=True)
def _evict(r, rr, t, ns, n, capacity, policy, state, nxt, static, scratch, rec_ev):
    """Evict the surplus of row ``r``; returns the new number of resident blocks.

    On entry ``slots[r, :ns]`` are the blocks selected at this step and ``slots[r, ns:n]`` the other candidates
    (the selection loop keeps it so), so the candidates that may go are found without scanning or testing.
    ``state`` is run_chunk's per-row state tuple; ``scratch`` = (primary keys, secondary keys), buffers of
    n_blocks entries reused for every row and step. Partial selection instead of a sort: the surplus is usually
    a few blocks, so moving the few first-to-go (or, when most go, the few worth keeping) into place by repeated
    scans is cheaper than sorting, and needs no allocation.
    """
    pos, slots, _, last, count, _ = state
    kp, ks = scratch
    m = n - ns
    excess = m if policy == PREV else n - capacity
    if excess > m:
        return -1  # more selected blocks than slots: the caller checked this, so reaching here is a bug
    keep = m - excess
    if 0 < keep:
        for i in range(m):
            b = slots[r, ns + i]
            nu = nxt[rr, b] if policy == BELADY else 0
            sc = static[r, b] if policy == STATIC else 0.0
            kp[i], ks[i] = keep_key_nb(policy, last[r, b], count[r, b], nu, sc)
        # After this, slots[r, ns:ns + keep] hold the kept candidates and slots[r, ns + keep:n] the evicted.
        if excess <= keep:
            for i in range(m - 1, keep - 1, -1):  # the first to go, into the last position, and so on
                best = i
                for q in range(i):
                    if _evicted_before(kp[q], ks[q], slots[r, ns + q], kp[best], ks[best], slots[r, ns + best]):
                        best = q
                _swap(slots, kp, ks, r, ns, i, best)
        else:
            for i in range(keep):  # the most worth keeping, into the first position, and so on
                best = i
                for q in range(i + 1, m):
                    if _evicted_before(kp[best], ks[best], slots[r, ns + best], kp[q], ks[q], slots[r, ns + q]):
                        best = q
                _swap(slots, kp, ks, r, ns, i, best)
        for i in range(ns, ns + keep):
            pos[r, slots[r, i]] = i
    record = rec_ev.shape[0] > 0
    for i in range(ns + keep, n):
        pos[r, slots[r, i]] = -1
        if record:
            rec_ev[t, r, slots[r, i]] = True
    return ns + keep


@njit(cache=True, inline="always")
def _swap(slots, kp, ks, r, ns, i, j):
    """Exchange candidates i and j (offsets from ns) with their keys; positions are fixed up by the caller."""
    slots[r, ns + i], slots[r, ns + j] = slots[r, ns + j], slots[r, ns + i]
    kp[i], kp[j] = kp[j], kp[i]
    ks[i], ks[j] = ks[j], ks[i]


@njit(cache=True)
def _belady_lookahead(sel, ctx, block_size, step0, r0, r1, nxt_entry, first_use):
    """For rows r0..r1: ``nxt_entry[t, rr, j]`` = next step selecting ``sel[t, r, j]`` after ``t``, and
    ``first_use[rr, b]`` = first step selecting ``b`` (NEVER if none). One backward pass over the steps."""
    T, _, K = sel.shape
    ncols = ctx.shape[1]
    for rr in range(r1 - r0):
        r = r0 + rr
        first_use[rr, :] = NEVER
        for t in range(T - 1, -1, -1):
            tail = (ctx[t, r % ncols] - 1) // block_size
            for j in range(K):
                b = sel[t, r, j]
                if b < 0 or b >= tail:
                    nxt_entry[t, rr, j] = NEVER
                    continue
                nxt_entry[t, rr, j] = first_use[rr, b]
                first_use[rr, b] = step0 + t


@njit(cache=True, nogil=True)
def run_chunk(sel, ctx, block_size, policy, capacity, static, step0, state, out, rec, err, tile):
    """Advance every row through the steps of one chunk, updating ``state`` in place.

    ``sel`` int16 [T, R, K]; ``ctx`` int32 [T, NC], row r reads column ``r % NC``; ``static`` float32
    [R, NB] (dummy unless policy is static); ``state`` = (pos, slots, nres, last, count, prev_tail);
    ``out`` = (hits, misses, writebacks, evictions) int32 [T, R]; ``rec`` = (resident, evicted) bool
    [T, R, NB] or empty arrays when not recording. Returns nothing; ``err[0] != 0`` on bad input.
    """
    pos, slots, nres, last, count, prev_tail = state
    hits, misses, wbs, evs = out
    rec_res, rec_ev = rec
    T, R, K = sel.shape
    NB = pos.shape[1]
    ncols = ctx.shape[1]
    record = rec_res.shape[0] > 0
    belady = policy == BELADY
    lfu = policy == LFU
    nxt_entry = np.empty((T if belady else 0, tile, K), np.int32)
    first_use = np.empty((tile if belady else 0, NB), np.int32)
    nxt = np.empty((tile if belady else 1, NB), np.int32)
    scratch = (np.empty(NB, np.float64), np.empty(NB, np.float64))
    for r0 in range(0, R, tile):
        r1 = min(R, r0 + tile)
        if belady:
            _belady_lookahead(sel, ctx, block_size, step0, r0, r1, nxt_entry, first_use)
        for t in range(T):
            gt = step0 + t
            for r in range(r0, r1):
                rr = r - r0
                tail = (ctx[t, r % ncols] - 1) // block_size
                pt = prev_tail[r]
                n = nres[r]
                wb = 0
                if pt >= 0 and tail > pt:
                    # The previous tail just completed: it is on the GPU already, so it joins the candidates
                    # for free, and is written back to host memory once.
                    pos[r, pt] = n
                    slots[r, n] = pt
                    n += 1
                    last[r, pt] = gt - 1
                    if belady:
                        nxt[rr, pt] = first_use[rr, pt]
                    wb = 1
                prev_tail[r] = tail
                h = 0
                m = 0
                ns = 0
                for j in range(K):
                    b = sel[t, r, j]
                    if b < 0:
                        if b != -1:
                            err[0], err[1], err[2], err[3], err[4] = ERR_NEGATIVE, t, r, b, tail
                            return
                        continue  # padding
                    if b >= tail:
                        if b == tail:
                            continue  # the tail is always resident: never an access
                        err[0], err[1], err[2], err[3], err[4] = ERR_FUTURE, t, r, b, tail
                        return
                    if last[r, b] == gt:
                        err[0], err[1], err[2], err[3], err[4] = ERR_DUPLICATE, t, r, b, tail
                        return
                    last[r, b] = gt
                    if lfu:  # only lfu reads the count; skipping the store elsewhere keeps the loop lean
                        count[r, b] += 1
                    p = pos[r, b]
                    if p >= 0:
                        h += 1
                    else:
                        m += 1
                        p = n
                        slots[r, n] = b
                        n += 1
                    # Keep the selected blocks at the front of the slot list: slots[r, :ns] are selected.
                    if p != ns:
                        other = slots[r, ns]
                        slots[r, p] = other
                        pos[r, other] = p
                        slots[r, ns] = b
                    pos[r, b] = ns
                    ns += 1
                    if belady:
                        nxt[rr, b] = nxt_entry[t, rr, j]
                if ns > capacity:
                    err[0], err[1], err[2], err[3], err[4] = ERR_CAPACITY, t, r, ns, capacity
                    return
                n_new = n
                if (policy == PREV and n > ns) or (policy != PREV and n > capacity):
                    n_new = _evict(r, rr, t, ns, n, capacity, policy, state, nxt, static, scratch, rec_ev)
                    if n_new < 0:
                        err[0], err[1], err[2], err[3], err[4] = ERR_BUG, t, r, ns, capacity
                        return
                nres[r] = n_new
                hits[t, r] = h
                misses[t, r] = m
                wbs[t, r] = wb
                evs[t, r] = n - n_new
                if record:
                    for i in range(n_new):
                        rec_res[t, r, slots[r, i]] = True


@njit(cache=True)
def max_selection_size(sel, ctx, block_size):
    """Largest number of complete blocks any selection names (tail ids and padding not counted)."""
    T, R, K = sel.shape
    ncols = ctx.shape[1]
    best = 0
    for t in range(T):
        for r in range(R):
            tail = (ctx[t, r % ncols] - 1) // block_size
            ns = 0
            for j in range(K):
                b = sel[t, r, j]
                if b >= 0 and b != tail:
                    ns += 1
            best = max(best, ns)
    return best
