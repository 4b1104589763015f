"""Quality proxy for a selection: attention-mass recall against the same-size oracle.

For one row (step, layer, KV head, sequence) with true dense attention mass per block ``m_b``
(the decode query's softmax summed over each block's tokens, averaged over the group's query
heads), a selection ``S`` of complete blocks captures ``sum(m_b for b in S)``. The oracle picks
the ``|S|`` complete blocks with the most mass. Recall is the ratio, in ``[0, 1]``.

The partial tail block is left out of both sides: every method attends it, so counting it would
only add the same constant to numerator and denominator and hide the differences being measured.
A row whose oracle captures no mass (no complete block selected, or all mass on the tail) has
nothing to miss and scores 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .trace.model import Trace, tails_of


def recall(trace_or_sel, attn_mass: np.ndarray | None = None, context_len: np.ndarray | None = None, *,
           block_size: int | None = None) -> np.ndarray:
    """Per-row attention-mass recall, float64 ``[steps, layers, heads, seqs]``.

    Call it with a :class:`~nosasim.trace.Trace` that carries ``attn_mass`` (its own selection is
    scored), with a trace plus another ``attn_mass``, or with plain arrays: ``sel`` int
    ``[..., k]`` (complete block ids, -1 padded), ``attn_mass`` float ``[..., n_blocks]`` (NaN
    where a block does not exist) and ``context_len`` broadcastable to ``sel.shape[:-1]``
    (``[steps, 1, 1, seqs]`` for trace-shaped arrays; a trace's ``[steps, seqs]`` is reshaped).
    """
    if isinstance(trace_or_sel, Trace):
        tr = trace_or_sel
        sel = tr.sel
        attn_mass = tr.attn_mass if attn_mass is None else attn_mass
        context_len = tr.context_len if context_len is None else context_len
        block_size = tr.block_size if block_size is None else block_size
        if attn_mass is None:
            raise ValueError("recall needs the true attention mass: field 'attn_mass' is missing from this trace")
    else:
        sel = np.asarray(trace_or_sel)
        if attn_mass is None or context_len is None:
            raise ValueError("recall on arrays needs 'attn_mass' and 'context_len' as well as 'sel'")
    block_size = 64 if block_size is None else block_size
    sel = np.asarray(sel)
    mass = np.asarray(attn_mass, dtype=np.float64)
    if mass.shape[:-1] != sel.shape[:-1]:
        raise ValueError(f"field 'attn_mass' has shape {mass.shape}, expected {sel.shape[:-1]} + (n_blocks,) to "
                         f"match 'sel' {sel.shape}")
    ctx = np.asarray(context_len)
    if sel.ndim == 5 and ctx.ndim == 2:
        ctx = ctx[:, None, None, :]
    n_complete = np.broadcast_to(tails_of(ctx, block_size), sel.shape[:-1])
    if (n_complete > mass.shape[-1]).any():
        raise ValueError(f"field 'attn_mass' holds {mass.shape[-1]} blocks but context_len needs "
                         f"{int(n_complete.max())} complete blocks")
    valid = sel >= 0
    if (valid & (sel >= n_complete[..., None])).any():
        raise ValueError("field 'sel' holds a block id that is not a complete block at its step (a tail or future id)")
    complete = np.arange(mass.shape[-1]) < n_complete[..., None]
    m = np.where(complete, np.nan_to_num(mass, nan=0.0), 0.0)
    got = np.where(valid, np.take_along_axis(m, np.where(valid, sel, 0).astype(np.intp), axis=-1), 0.0).sum(-1)
    n_sel = valid.sum(-1)
    ranked = -np.sort(-m, axis=-1)  # descending; masses are >= 0 so masked blocks sort last
    best = np.concatenate([np.zeros(m.shape[:-1] + (1,)), np.cumsum(ranked, axis=-1)], axis=-1)
    oracle = np.take_along_axis(best, n_sel[..., None], axis=-1)[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(oracle > 0, got / np.where(oracle > 0, oracle, 1.0), 1.0)
    # float16 masses can make the selected sum exceed the oracle's by a rounding step.
    return np.minimum(r, 1.0)


@dataclass(frozen=True)
class RecallSummary:
    """Recall statistics of one configuration: mean, 10th percentile, and mean per layer."""

    mean: float
    p10: float
    per_layer: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"mean": self.mean, "p10": self.p10, "per_layer": list(self.per_layer)}


def summarize(r: np.ndarray) -> RecallSummary:
    """Summarise per-row recall ``[steps, layers, heads, seqs]`` (from :func:`recall`)."""
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 4 or r.size == 0:
        raise ValueError(f"recall array must have shape [steps, layers, heads, seqs] and not be empty, got {r.shape}")
    per_layer = r.transpose(1, 0, 2, 3).reshape(r.shape[1], -1).mean(axis=1)
    return RecallSummary(mean=float(r.mean()), p10=float(np.percentile(r, 10)),
                         per_layer=tuple(float(x) for x in per_layer))


def recall_summary(trace_or_sel, attn_mass=None, context_len=None, *, block_size=None) -> RecallSummary:
    """:func:`recall` followed by :func:`summarize`: the numbers a sweep reports per configuration."""
    return summarize(recall(trace_or_sel, attn_mass, context_len, block_size=block_size))
