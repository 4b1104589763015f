"""Block selection from block scores: InfLLM-V2 (query-aware) and NOSA (query-aware + query-agnostic).

This is the one CPU definition of selection. The synthetic generators, offline re-selection,
the recorder and the GPU runtime's tests all call it, so they cannot drift apart.

Budgets are :class:`nosasim.contract.Budget` (docs/contract.md): ``k`` counts every selected
block including the partial tail; ``k_q`` counts the query-aware ones (sink, window with the
tail, then top blocks by the query-aware score); the remaining ``k - k_q`` go to the highest
query-agnostic scores. Only complete blocks are returned (the tail is always resident). Ties go
to the lower block id; NaN scores rank last.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .contract import Budget
from .trace.header import SelectionParams
from .trace.model import Trace, tails_of


@njit(cache=True, parallel=True)
def _take_top_rows(score, allowed, budget, out):
    """Per row: the ``budget[r]`` largest ``key`` among ``allowed`` (all of them if fewer), ties to the lower id.
    The bound is the ``budget``-th largest allowed key (a partition, linear time), every allowed key above it is
    taken, then the ones equal to it in ascending id order until the budget is spent."""
    rows, nb = score.shape
    big = np.finfo(np.float64).max
    for r in prange(rows):  # rows are independent: one scratch pair per row
        key = np.empty(nb, np.float64)
        vals = np.empty(nb, np.float64)
        n = 0
        for j in range(nb):
            x = np.float64(score[r, j])
            # NaN below -inf: -inf and +inf become the extreme finite numbers, NaN -inf (as nan_to_num does).
            key[j] = -np.inf if np.isnan(x) else (-big if x == -np.inf else (big if x == np.inf else x))
            if allowed[r, j]:
                vals[n] = key[j]
                n += 1
        b = budget[r]
        if b <= 0:
            continue
        if b >= n:
            for j in range(nb):
                out[r, j] = allowed[r, j]
            continue
        t = np.partition(vals[:n], n - b)[n - b]
        left = b
        for j in range(nb):
            if allowed[r, j] and key[j] > t:
                out[r, j] = True
                left -= 1
        for j in range(nb):
            if left == 0:
                break
            if allowed[r, j] and key[j] == t:
                out[r, j] = True
                left -= 1


def _take_top(score: np.ndarray, allowed: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Per row, mark the ``budget[r]`` highest-scoring allowed blocks (lower id wins ties). NaN ranks below every
    number (-inf included, which ``nan_to_num`` makes the most negative finite number, as +inf the largest)."""
    score = np.asarray(score)
    if score.dtype not in (np.float32, np.float64):  # numba reads these two; float16 and ints widen exactly
        score = score.astype(np.float64 if score.dtype.itemsize > 4 or score.dtype.kind in "iu" else np.float32)
    out = np.zeros(score.shape, dtype=np.bool_)
    _take_top_rows(np.ascontiguousarray(score), np.ascontiguousarray(allowed, dtype=np.bool_),
                   np.ascontiguousarray(budget, dtype=np.int64), out)
    return out


def select_mask(qaware, context_len, *, k, k_q=None, sink=1, window=16, block_size=64, agnostic=None) -> np.ndarray:
    """Selection as a boolean mask over blocks, shape of ``qaware`` (``[..., n_blocks]``)."""
    Budget(k, k_q, sink, window)  # the one validation of the budget's fields
    qaware = np.asarray(qaware)
    lead, nb = qaware.shape[:-1], qaware.shape[-1]
    q2 = qaware.reshape(-1, nb)
    ctx = np.broadcast_to(np.asarray(context_len), lead).reshape(-1)
    tail = tails_of(ctx, block_size)  # == number of complete blocks
    if (tail > nb).any():
        raise ValueError(f"context_len needs {int(tail.max())} complete blocks but scores hold only {nb}")
    col = np.arange(nb)[None, :]
    complete = col < tail[:, None]
    forced = complete & ((col < sink) | (col >= (tail - (window - 1))[:, None]))
    n_forced = forced.sum(axis=1)
    k_q_eff = k if (k_q is None or agnostic is None) else k_q
    q_budget = np.maximum(k_q_eff - 1 - n_forced, 0)
    chosen = forced | _take_top(q2, complete & ~forced, q_budget)
    if agnostic is not None and k_q_eff < k:
        a2 = np.broadcast_to(np.asarray(agnostic), qaware.shape).reshape(-1, nb)
        e_budget = np.maximum(k - 1 - chosen.sum(axis=1), 0)
        chosen |= _take_top(a2, complete & ~chosen, e_budget)
    # With few complete blocks, everything complete fits the budget (k - 1 plus the tail).
    chosen |= complete & (tail <= k - 1)[:, None]
    return chosen.reshape(qaware.shape)


def mask_to_ids(mask: np.ndarray, k: int) -> np.ndarray:
    """``bool [..., n_blocks]`` -> ``int16 [..., k]`` sorted ids, -1 padded."""
    from .trace.codec import from_bitmap

    lead = mask.shape[:-1]
    return from_bitmap(mask.reshape(-1, mask.shape[-1]), k).reshape(lead + (k,))


def select_blocks(qaware, context_len, *, k, k_q=None, sink=1, window=16, block_size=64, agnostic=None) -> np.ndarray:
    """Selected complete block ids, ``int16 [..., k]``, sorted and -1 padded.

    ``qaware`` float ``[..., n_blocks]``: query-aware block scores (higher is better).
    ``context_len`` broadcastable to ``qaware.shape[:-1]``.
    ``agnostic`` float ``[..., n_blocks]`` (broadcastable): query-agnostic scores; with it and
    ``k_q < k`` this is NOSA selection, without it InfLLM-V2 (all ``k`` query-aware).
    """
    mask = select_mask(qaware, context_len, k=k, k_q=k_q, sink=sink, window=window,
                       block_size=block_size, agnostic=agnostic)
    return mask_to_ids(mask, k)


def reselect(trace: Trace, budget: Budget, agnostic: np.ndarray | None = None,
             provenance: dict | None = None) -> Trace:
    """A new selection trace from a score trace's ``qaware_score`` (and agnostic scores), no model run.

    ``agnostic`` overrides the trace's own ``agnostic_score`` (``[layers, heads, seqs, n_blocks]``).
    A budget with ``k_q == k`` is InfLLM-V2 selection, one with ``k_q < k`` NOSA's.
    """
    if trace.qaware_score is None:
        raise ValueError("reselect needs a score trace: field 'qaware_score' is missing from this trace")
    if budget.k > trace.n_blocks:
        # Every block is already selected at k = n_blocks; more only sizes caches for blocks that never exist.
        raise ValueError(f"--k: {budget.k} blocks is more than the trace's longest context holds ({trace.n_blocks} "
                         f"blocks of {trace.block_size} tokens, the tail included); use k <= {trace.n_blocks}")
    agn = trace.agnostic_score if agnostic is None else np.asarray(agnostic, dtype=np.float32)
    nosa = budget.agnostic
    if nosa and agn is None:
        raise ValueError("NOSA re-selection (k_q < k) needs query-agnostic scores: field 'agnostic_score' is missing")
    ctx = trace.context_len[:, None, None, :]
    sel = select_blocks(trace.qaware_score, ctx, k=budget.k, k_q=budget.k_q if nosa else None, sink=budget.sink,
                        window=budget.window, block_size=trace.block_size, agnostic=agn[None] if nosa else None)
    params = SelectionParams(method="nosa" if nosa else "infllmv2", budget=budget)
    prov = dict(trace.header.provenance)
    prov["reselected"] = dict(params.to_dict(), **(provenance or {}))
    return Trace.from_arrays(
        sel, trace.context_len, block_size=trace.block_size, model=trace.header.model, selection=params,
        provenance=prov, agnostic_score=agn, qaware_score=trace.qaware_score, attn_mass=trace.attn_mass,
        chunk_steps=trace.header.chunk_steps,
    )


def for_budget(trace: Trace, budget: Budget) -> Trace:
    """The trace whose selections are ``budget``'s: the trace itself when it was recorded with the same selection
    budget, else a re-selection from its scores (a ValueError when it has none)."""
    have = trace.header.selection.budget
    if have.same_selection(budget):
        return trace
    if trace.qaware_score is None:
        raise ValueError(f"--k/--kq: the trace holds selections for k={have.k}, k_q={have.k_q}, sink={have.sink}, "
                         f"window={have.window} and no scores to re-select from, so it cannot replay k={budget.k}, "
                         f"k_q={budget.k_q}, sink={budget.sink}, window={budget.window}; use a score trace or "
                         f"matching budgets")
    return reselect(trace, budget)
