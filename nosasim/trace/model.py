"""The in-memory selection trace and the checks every trace passes before anyone uses it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..contract import Budget
from .header import ModelShape, SelectionParams, TraceError, TraceHeader


def tails_of(context_len: np.ndarray, block_size: int) -> np.ndarray:
    """Index of the partial tail block for each context length (tokens incl. the new one)."""
    return (np.asarray(context_len, dtype=np.int64) - 1) // block_size


def check_context_len(context_len: np.ndarray, where: str = "context_len") -> None:
    if context_len.ndim != 2:
        raise TraceError(f"field '{where}' must have shape [steps, seqs], got {context_len.shape}")
    if (context_len < 1).any():
        raise TraceError(f"field '{where}' must be >= 1 (the new token is always in the cache)")
    if context_len.shape[0] > 1:
        diff = np.diff(context_len, axis=0)
        if (diff != 1).any():
            t, b = np.argwhere(diff != 1)[0]
            raise TraceError(
                f"field '{where}' must increase by exactly one per step; seq {b} goes from "
                f"{context_len[t, b]} at step {t} to {context_len[t + 1, b]} at step {t + 1}"
            )


def check_selection(sel: np.ndarray, context_len: np.ndarray, block_size: int, k: int, step0: int = 0) -> None:
    """Ids must be -1 padding or existing complete blocks, sorted, unique, at most ``k`` per selection."""
    if sel.ndim != 5:
        raise TraceError(f"field 'sel' must have shape [steps, layers, heads, seqs, k], got {sel.shape}")
    if sel.shape[-1] > k:
        raise TraceError(f"field 'sel' holds {sel.shape[-1]} ids per selection, more than k={k}")
    tail = tails_of(context_len, block_size)[:, None, None, :, None]
    bad = sel >= tail
    if bad.any():
        t, l, h, b, j = np.argwhere(bad)[0]
        raise TraceError(
            f"field 'sel': block id {sel[t, l, h, b, j]} at step {t + step0}, layer {l}, head {h}, seq {b} is "
            f"beyond the last complete block ({tail[t, 0, 0, b, 0] - 1}) at context_len {context_len[t, b]}"
        )
    if (sel < -1).any():
        raise TraceError("field 'sel': ids must be >= 0, or -1 for padding")
    valid = sel >= 0
    # Sorted with padding last means: each valid id is greater than the one before it, and no
    # valid id follows a pad. Equal neighbours are duplicates.
    if sel.shape[-1] > 1:
        prev, cur = sel[..., :-1], sel[..., 1:]
        if (valid[..., 1:] & ~valid[..., :-1]).any():
            raise TraceError("field 'sel': -1 padding must come after every id of a selection")
        dup = valid[..., 1:] & (cur == prev)
        if dup.any():
            t, l, h, b, j = np.argwhere(dup)[0]
            raise TraceError(
                f"field 'sel': duplicate block id {cur[t, l, h, b, j]} in the selection of step {t + step0}, "
                f"layer {l}, head {h}, seq {b}"
            )
        if (valid[..., 1:] & (cur < prev)).any():
            raise TraceError("field 'sel': ids of a selection must be sorted ascending")


def check_forced(sel: np.ndarray, context_len: np.ndarray, block_size: int, sink: int, window: int,
                 step0: int = 0) -> None:
    """Every selection holds the blocks its budget forces: the first ``sink`` complete blocks and the last
    ``window - 1`` complete ones (the tail, always resident, is the window's last block), as
    :func:`nosasim.select.select_mask` forces them. ``sel`` must already pass :func:`check_selection` (ids unique
    and below the tail), so counting the ids in each forced range is enough: a range is whole when the count equals
    its length."""
    if sink == 0 and window <= 1:
        return
    tail = tails_of(context_len, block_size)[:, None, None, :]  # [steps, 1, 1, seqs]: complete blocks
    n_sink = np.minimum(sink, tail)
    lo = np.maximum(tail - max(window - 1, 0), n_sink)  # the window's first block past the sink
    have_sink = ((sel >= 0) & (sel < n_sink[..., None])).sum(axis=-1, dtype=np.int32) if sink else 0  # not pads
    have_win = (sel >= lo[..., None]).sum(axis=-1, dtype=np.int32) if window > 1 else 0
    bad = (have_sink != n_sink) | (have_win != tail - lo)
    if np.any(bad):
        t, l, h, b = np.argwhere(bad)[0]
        raise TraceError(
            f"field 'sel': the selection of step {t + step0}, layer {l}, head {h}, seq {b} lacks a block its budget "
            f"forces (selection.sink_blocks={sink}: blocks 0..{int(n_sink[t, 0, 0, b]) - 1}; "
            f"selection.window_blocks={window}: blocks {int(lo[t, 0, 0, b])}..{int(tail[t, 0, 0, b]) - 1} before "
            f"the tail at context_len {int(context_len[t, b])})")


def normalize_selection(sel: np.ndarray, context_len: np.ndarray, block_size: int, k: int) -> np.ndarray:
    """Sort each selection, drop tail ids (the tail is always resident) and pad to width ``k``.

    Duplicates and future blocks are *not* repaired: they are errors in the source and are
    reported by :func:`check_selection`.
    """
    sel = np.asarray(sel)
    if not np.issubdtype(sel.dtype, np.integer):
        raise TraceError(f"field 'sel' must be an integer array, got dtype {sel.dtype}")
    if sel.shape[-1] > k:
        raise TraceError(f"field 'sel' holds {sel.shape[-1]} ids per selection, more than k={k}")
    sel = sel.astype(np.int64)
    tail = tails_of(context_len, block_size)[:, None, None, :, None]
    sel = np.where(sel == tail, -1, sel)
    big = np.iinfo(np.int64).max
    sel = np.sort(np.where(sel < 0, big, sel), axis=-1)
    sel = np.where(sel == big, -1, sel)
    if sel.shape[-1] < k:
        pad = np.full(sel.shape[:-1] + (k - sel.shape[-1],), -1, dtype=np.int64)
        sel = np.concatenate([sel, pad], axis=-1)
    if sel.max(initial=-1) > np.iinfo(np.int16).max:
        raise TraceError(f"field 'sel': block id {sel.max()} does not fit the format's int16 ids")
    return sel.astype(np.int16)


@dataclass
class Trace:
    """A selection trace (or a step range of one: ``step0`` is the index of its first step).

    ``sel`` int16 [steps, layers, kv_heads, seqs, k]: selected complete blocks, sorted, -1 padded.
    ``context_len`` int32 [steps, seqs]. Optional: ``agnostic_score`` float32 [layers, heads, seqs,
    n_blocks] (static query-agnostic score), ``qaware_score`` and ``attn_mass`` float16 [steps,
    layers, heads, seqs, n_blocks] (NaN where a block does not exist yet).
    """

    header: TraceHeader
    sel: np.ndarray
    context_len: np.ndarray
    agnostic_score: np.ndarray | None = None
    qaware_score: np.ndarray | None = None
    attn_mass: np.ndarray | None = None
    step0: int = 0

    steps = property(lambda self: self.sel.shape[0])
    layers = property(lambda self: self.sel.shape[1])
    heads = property(lambda self: self.sel.shape[2])
    seqs = property(lambda self: self.sel.shape[3])
    k = property(lambda self: self.header.k)
    n_blocks = property(lambda self: self.header.n_blocks)
    block_size = property(lambda self: self.header.block_size)

    @classmethod
    def from_arrays(
        cls,
        sel,
        context_len,
        block_size: int = 64,
        model: ModelShape | None = None,
        selection: SelectionParams | None = None,
        provenance: dict | None = None,
        agnostic_score=None,
        qaware_score=None,
        attn_mass=None,
        k: int | None = None,
        chunk_steps: int = 128,
    ) -> "Trace":
        """Build a validated trace from arrays; selections are sorted and tail ids dropped."""
        context_len = np.asarray(context_len)
        if not np.issubdtype(context_len.dtype, np.integer):
            raise TraceError(f"field 'context_len' must be an integer array, got dtype {context_len.dtype}")
        context_len = context_len.astype(np.int32)
        sel = np.asarray(sel)
        if sel.ndim != 5:
            raise TraceError(f"field 'sel' must have shape [steps, layers, heads, seqs, k], got {sel.shape}")
        steps, layers, heads, seqs, width = sel.shape
        if context_len.shape != (steps, seqs):
            raise TraceError(f"field 'context_len' has shape {context_len.shape}, expected {(steps, seqs)}")
        check_context_len(context_len)
        if selection is None:
            selection = SelectionParams(method="import", budget=Budget(k or width, None, 0, 0))
        if k is not None and k != selection.k:
            raise TraceError(f"field 'k' ({k}) must equal the selection's k ({selection.k})")
        k = selection.k
        if model is None:
            model = ModelShape(layers=layers, kv_heads=heads, head_dim=128)
        if (model.layers, model.kv_heads) != (layers, heads):
            raise TraceError(
                f"field 'model': layers/kv_heads {(model.layers, model.kv_heads)} do not match the selection "
                f"array's {(layers, heads)}"
            )
        sel = normalize_selection(sel, context_len, block_size, k)
        check_selection(sel, context_len, block_size, k)
        check_forced(sel, context_len, block_size, selection.budget.sink, selection.budget.window)
        n_blocks = int(tails_of(context_len.max(), block_size)) + 1
        present = tuple(
            name for name, arr in (("agnostic_score", agnostic_score), ("qaware_score", qaware_score),
                                   ("attn_mass", attn_mass)) if arr is not None
        )
        header = TraceHeader(
            block_size=block_size, model=model, selection=selection, steps=steps, seqs=seqs, k=k,
            n_blocks=n_blocks, chunk_steps=chunk_steps, arrays=present, provenance=dict(provenance or {}),
        )
        trace = cls(header, sel, context_len)
        trace.agnostic_score = _check_scores(agnostic_score, "agnostic_score", (layers, heads, seqs, n_blocks), np.float32)
        trace.qaware_score = _check_scores(qaware_score, "qaware_score", (steps, layers, heads, seqs, n_blocks), np.float16)
        trace.attn_mass = _check_scores(attn_mass, "attn_mass", (steps, layers, heads, seqs, n_blocks), np.float16)
        return trace

    def rows(self) -> np.ndarray:
        """Selections as ``[steps, rows, k]`` with rows ordered (layer, head, seq)."""
        return self.sel.reshape(self.steps, -1, self.sel.shape[-1])

    def block_bytes(self) -> int:
        return self.header.block_bytes()

    def raw_nbytes(self) -> int:
        """Size of the plain int16 selection array this trace stands for (the compression baseline)."""
        return int(self.sel.size) * 2


def _check_scores(arr, name: str, shape: tuple, dtype) -> np.ndarray | None:
    if arr is None:
        return None
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TraceError(f"field '{name}' must be a float array, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise TraceError(f"field '{name}' has shape {arr.shape}, expected {shape}")
    return arr.astype(dtype, copy=False)
