"""Block selection from block scores: InfLLM-V2 (query-aware) and NOSA (query-aware + query-agnostic).

This is the one CPU definition of selection. The synthetic generators, offline re-selection,
the recorder and the GPU runtime's tests all call it, so they cannot drift apart.

Budget rules (docs/architecture.md): ``k`` counts every selected block including the partial
tail; ``k_q`` counts the query-aware ones (sink, window with the tail, then top blocks by the
query-aware score); the remaining ``k - k_q`` go to the highest query-agnostic scores. Only
complete blocks are returned (the tail is always resident). Ties go to the lower block id; NaN
scores rank last.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .trace.header import SelectionParams
from .trace.model import Trace, tails_of


def check_budget(k: int, k_q: int | None, sink: int, window: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if sink < 0 or window < 1:
        raise ValueError(f"sink must be >= 0 and window >= 1 (the window holds the tail), got {sink}, {window}")
    if k < sink + window:
        raise ValueError(f"k ({k}) must be >= sink + window ({sink} + {window})")
    if k_q is not None and not sink + window <= k_q <= k:
        raise ValueError(f"k_q ({k_q}) must lie between sink + window ({sink + window}) and k ({k})")


def _take_top(score: np.ndarray, allowed: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Per row, mark the ``budget[r]`` highest-scoring allowed blocks (lower id wins ties)."""
    key = np.where(allowed, np.nan_to_num(score.astype(np.float64), nan=-np.inf), np.nan)
    # argsort of -key is stable, so equal scores keep ascending block order: lower id first.
    # Disallowed entries are NaN and sort after everything, -inf (NaN scores) included.
    order = np.argsort(-key, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :], axis=1)
    return allowed & (rank < budget[:, None])


def select_mask(qaware, context_len, *, k, k_q=None, sink=1, window=16, block_size=64, agnostic=None) -> np.ndarray:
    """Selection as a boolean mask over blocks, shape of ``qaware`` (``[..., n_blocks]``)."""
    check_budget(k, k_q, sink, window)
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


def reselect(trace: Trace, k: int, k_q: int | None = None, sink: int = 1, window: int = 16,
             agnostic: np.ndarray | None = None, provenance: dict | None = None) -> Trace:
    """A new selection trace from a score trace's ``qaware_score`` (and agnostic scores), no model run.

    ``agnostic`` overrides the trace's own ``agnostic_score`` (``[layers, heads, seqs, n_blocks]``).
    With ``k_q`` None or equal to ``k`` the result is InfLLM-V2 selection.
    """
    if trace.qaware_score is None:
        raise ValueError("reselect needs a score trace: field 'qaware_score' is missing from this trace")
    agn = trace.agnostic_score if agnostic is None else np.asarray(agnostic, dtype=np.float32)
    nosa = k_q is not None and k_q < k
    if nosa and agn is None:
        raise ValueError("NOSA re-selection (k_q < k) needs query-agnostic scores: field 'agnostic_score' is missing")
    ctx = trace.context_len[:, None, None, :]
    sel = select_blocks(trace.qaware_score, ctx, k=k, k_q=k_q if nosa else None, sink=sink, window=window,
                        block_size=trace.block_size, agnostic=agn[None] if nosa else None)
    params = SelectionParams(method="nosa" if nosa else "infllmv2", k=k, k_q=k_q if nosa else None,
                             sink_blocks=sink, window_blocks=window)
    prov = dict(trace.header.provenance)
    prov["reselected"] = dict(dataclasses.asdict(params), **(provenance or {}))
    return Trace.from_arrays(
        sel, trace.context_len, block_size=trace.block_size, model=trace.header.model, selection=params,
        provenance=prov, agnostic_score=agn, qaware_score=trace.qaware_score, attn_mass=trace.attn_mass,
        chunk_steps=trace.header.chunk_steps,
    )


def for_budgets(trace: Trace, k: int, k_q: int, sink: int = 1, window: int = 16) -> Trace:
    """The trace whose selections match budgets ``(k, k_q)`` (``k_q == k``: InfLLM-V2): the trace itself when it was
    recorded with them, else a re-selection from its scores (a ValueError when it has none)."""
    p = trace.header.selection
    have = (p.k, p.k if p.k_q is None else p.k_q)
    if have == (k, k_q):
        return trace
    if trace.qaware_score is None:
        raise ValueError(f"--k/--kq: the trace holds selections for k={have[0]}, k_q={have[1]} and no scores to "
                         f"re-select from, so it cannot replay k={k}, k_q={k_q}; use a score trace or matching budgets")
    return reselect(trace, k, k_q if k_q < k else None, sink=sink, window=window)
