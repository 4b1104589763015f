"""Seeded synthetic selection traces: ``random``, ``infllmv2`` and ``nosa``.

The generators do not fake selections directly: they evolve *block scores* and pass them through
:func:`nosasim.select.select_blocks`, so every synthetic trace is also a score trace that
offline re-selection reproduces exactly.

- ``random``: each step picks ``k - 1`` complete blocks uniformly; no locality at all.
- ``infllmv2``: sink + window + a "top" set of query-aware blocks that churns, tuned so that the mean
  adjacent overlap (see :mod:`nosasim.trace.stats`) is about ``overlap``: generator 1 swaps a binomial
  number of top blocks each step, generator 2 redraws a share of persistent block scores (``GENERATORS``).
- ``nosa``: the same query-aware part with ``k_q`` blocks, plus ``k - k_q`` blocks ranked by a
  static per-block query-agnostic score that is stored in the trace. Because the agnostic top
  set only changes when a newly completed block outranks an old one, adjacent overlap is at least
  ``(k - k_q) / k`` by construction.
"""

from __future__ import annotations

import numpy as np

from .header import ModelShape, SelectionParams
from .model import Trace, tails_of

KINDS = ("random", "infllmv2", "nosa")
# Generator versions. 1: each step a binomial share of the query-aware top set is swapped for random blocks and
# every score is drawn anew, top blocks above the rest; re-selecting at a smaller k then draws a new subset of the
# top set every step, so the locality is lost (k 64 -> 46: adjacent overlap 0.889 -> 0.694). 2: each block keeps
# its score across steps and a share of the scores is redrawn each step, so the top set of any size turns over
# at the target rate, and re-selection keeps the locality of a trace synthesised at that k.
GENERATORS = {1: "swap the top set, scores drawn anew", 2: "persistent scores, a share redrawn per step"}


def _pick_random(mask: np.ndarray, count: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per row, a uniformly random subset of ``count[r]`` of the True entries of ``mask``."""
    u = np.where(mask, rng.random(mask.shape), -1.0)
    order = np.argsort(-u, axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(mask.shape[1])[None, :], axis=1)
    return mask & (rank < count[:, None])


def synthesize(kind: str, layers: int, heads: int, seqs: int, steps: int, k: int, context: int,
               kq: int | None = None, overlap: float | None = None, seed: int = 0, block_size: int = 64,
               head_dim: int = 64, sink: int = 1, window: int = 16, context_spread: int = 0,
               chunk_steps: int = 128, command: str = "", progress: bool = False, generator: int = 1) -> Trace:
    """Generate a trace. ``context`` is the prompt length in tokens; with ``context_spread`` > 0 each
    sequence's prompt is drawn uniformly from ``[context - context_spread, context]``. ``progress``: a bar per
    step on a terminal. ``generator``: 1 (the default here, so every recorded experiment's trace regenerates
    bit for bit) or 2 (``nosasim trace synth``'s default): see ``GENERATORS``."""
    from ..contract import Budget
    from ..select import mask_to_ids, select_mask

    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {KINDS}, got {kind!r}")
    if generator not in GENERATORS:
        raise ValueError(f"--generator must be one of {sorted(GENERATORS)}, got {generator!r}")
    for name, v in (("layers", layers), ("heads", heads), ("seqs", seqs), ("steps", steps), ("context", context)):
        if v < 1:
            raise ValueError(f"--{name} must be >= 1, got {v}")
    if not 0 <= context_spread < context:
        raise ValueError(f"--context-spread must be in [0, context), got {context_spread}")
    overlap = 0.889 if overlap is None else float(overlap)
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"--overlap must be in [0, 1], got {overlap}")
    if kind == "nosa":
        budget = Budget(k, 33 if kq is None else kq, sink, window)
        if not budget.agnostic:
            raise ValueError(f"--kq must be < k for kind nosa (k_e = k - k_q blocks are query-agnostic), got {kq}")
        kq = budget.k_q
    elif kind == "infllmv2":
        budget = Budget(k, None, sink, window)
        kq = None
    else:
        budget = Budget(k, None, 0, 0)  # uniformly random picks force no sink or window
        kq = None
    rng = np.random.default_rng(seed)
    prompt = context - rng.integers(0, context_spread + 1, size=seqs) if context_spread else np.full(seqs, context)
    ctx = (prompt[None, :] + 1 + np.arange(steps)[:, None]).astype(np.int32)
    nb = int(tails_of(ctx.max(), block_size)) + 1
    rows = layers * heads * seqs
    row_ctx = np.broadcast_to(ctx[:, None, None, :], (steps, layers, heads, seqs)).reshape(steps, rows)

    agnostic = None
    if kind == "nosa":
        # Heavy-tailed static scores: a few blocks matter a lot, as learned eviction scores do.
        agnostic = rng.lognormal(0.0, 1.0, size=(layers, heads, seqs, nb)).astype(np.float32)
    col = np.arange(nb)[None, :]
    top = np.zeros((rows, nb), dtype=bool)
    sel = np.empty((steps, rows, k), dtype=np.int16)
    qscore = np.empty((steps, rows, nb), dtype=np.float16) if kind != "random" else None
    n_q = (kq if kind == "nosa" else k) - 1 - sink - (window - 1)  # query-aware top blocks
    # Sink and window rarely change, so the churning top part carries all of the non-overlap.
    forced_share = (sink + window - 1) / (k - 1)
    top_keep = np.clip((overlap - forced_share) / max(1e-9, 1 - forced_share), 0.0, 1.0)
    from tqdm import tqdm

    persistent = generator == 2 and kind != "random"
    if persistent:  # generator 2: every block's query-aware score lives across steps
        # Normal scores: float16 keeps them apart over several binades (few ties among the top ones).
        level = rng.standard_normal((rows, nb), dtype=np.float32).astype(np.float16)
        # With a finite top set its boundary also jitters (the n_q-th score moves as scores are redrawn), adding
        # about 0.5 * sqrt(c / n_q) to a turnover c (fitted by simulating the process at n_q = 29-47 and
        # c = 0.05-0.3), so the redraw rate aims at the c that leaves 1 - top_keep.
        a = 0.5 / np.sqrt(max(n_q, 1))
        turnover = ((np.sqrt(a * a + 4.0 * (1.0 - top_keep)) - a) / 2.0) ** 2
    for t in tqdm(range(steps), desc=f"synth {kind}", unit="step", disable=None if progress else True):
        tail = tails_of(row_ctx[t], block_size)
        complete = col < tail[:, None]
        if kind == "random":
            mask = _pick_random(complete, np.full(rows, k - 1), rng)
            sel[t] = mask_to_ids(mask, k)
            continue
        forced = complete & ((col < sink) | (col >= (tail - (window - 1))[:, None]))
        eligible = complete & ~forced
        if persistent:
            if t > 0:
                # A block redrawn with probability p leaves the top n_q (of N eligible) with probability
                # 1 - n_q / N, and as many enter, so the top set turns over 1 - top_keep per step when
                # p = (1 - top_keep) / (1 - n_q / N); any smaller top set (re-selection at a smaller k) turns
                # over at nearly the same rate, as a real model's persistent scores do. ``turnover`` (set before
                # the loop) is that rate less the top set's boundary jitter.
                n_el = np.maximum(eligible.sum(axis=1), 1)
                p = np.clip(turnover / np.maximum(1.0 - n_q / n_el, 1e-6), 0.0, 1.0)
                redraw = rng.random((rows, nb), dtype=np.float32) < p[:, None].astype(np.float32)
                level[redraw] = rng.standard_normal(int(np.count_nonzero(redraw)), dtype=np.float32)
            score = qscore[t]
            np.copyto(score, level)
            score[col >= tail[:, None] + 1] = np.nan
            mask = select_mask(score, row_ctx[t], k=k, k_q=kq, sink=sink, window=window, block_size=block_size,
                               agnostic=None if agnostic is None else agnostic.reshape(rows, nb))
            sel[t] = mask_to_ids(mask, k)
            continue
        top &= eligible
        if t > 0:
            drop = _pick_random(top, rng.binomial(top.sum(axis=1), 1.0 - top_keep), rng)
            top &= ~drop
            refill = _pick_random(eligible & ~top & ~drop, drop.sum(axis=1), rng)
            top |= refill
        need = np.maximum(n_q - top.sum(axis=1), 0)
        top |= _pick_random(eligible & ~top, need, rng)
        # Scores that rank the top set first; the selection below recovers it exactly.
        u = rng.random((rows, nb))
        # Separated ranges, so float16 rounding can never tie a top block with another one.
        score = np.where(top, 1.1 + 0.8 * u, 0.9 * u)
        score = np.where(col < tail[:, None] + 1, score, np.nan).astype(np.float16)
        qscore[t] = score
        mask = select_mask(score, row_ctx[t], k=k, k_q=kq, sink=sink, window=window, block_size=block_size,
                           agnostic=None if agnostic is None else agnostic.reshape(rows, nb))
        sel[t] = mask_to_ids(mask, k)

    shape5 = (steps, layers, heads, seqs)
    params = SelectionParams(method=kind, budget=budget)
    prov = {
        "source": "synthetic", "kind": kind, "seed": seed, "context": context, "context_spread": context_spread,
        "overlap_target": overlap if kind != "random" else None,
        "recorder": f"nosasim.trace.synth v{generator}",
        "command": command,
    }
    return Trace.from_arrays(
        sel.reshape(shape5 + (k,)), ctx, block_size=block_size,
        model=ModelShape(layers=layers, kv_heads=heads, head_dim=head_dim, name="synthetic"),
        selection=params, provenance=prov, agnostic_score=agnostic,
        qaware_score=None if qscore is None else qscore.reshape(shape5 + (nb,)), chunk_steps=chunk_steps,
    )
