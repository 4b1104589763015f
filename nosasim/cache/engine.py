"""The array-level cache engine: plain numpy arrays in, per-step counters out, state carried across chunks.

:class:`CacheEngine` owns the per-row state and feeds step chunks to the numba kernel, so a trace larger than
memory is simulated chunk by chunk with results identical to one pass. :func:`simulate_arrays` is the one-call
form for hand-made arrays (tests, the runtime's step-by-step comparison). Trace files and :class:`~nosasim.trace.
Trace` objects go through :func:`nosasim.cache.simulate_cache`, which builds on this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from nosasim.contract import default_capacity

from . import kernel
from .policies import BELADY, STATIC, policy_code

# Rows per tile of the kernel: enough to read each step's selections as one contiguous slice, few enough that
# the tile's per-block state stays in the CPU's L1/L2 cache.
TILE_ROWS = 16


@dataclass
class StepCounters:
    """Per step and row counters of one fed chunk (int32 [steps, rows]); with ``record``, the resident set
    after each step and the blocks evicted at it, as bool [steps, rows, n_blocks]."""

    hits: np.ndarray
    misses: np.ndarray
    writebacks: np.ndarray
    evictions: np.ndarray
    resident: np.ndarray | None = None
    evicted: np.ndarray | None = None

    def resident_ids(self, step: int, row: int) -> list[int]:
        """Complete blocks resident after ``step`` (ascending); needs ``record=True``."""
        return np.flatnonzero(self._recorded("resident")[step, row]).tolist()

    def evicted_ids(self, step: int, row: int) -> list[int]:
        """Blocks evicted at ``step`` (ascending); needs ``record=True``."""
        return np.flatnonzero(self._recorded("evicted")[step, row]).tolist()

    def _recorded(self, name: str) -> np.ndarray:
        arr = getattr(self, name)
        if arr is None:
            raise ValueError(f"'{name}' was not recorded: simulate with record=True")
        return arr


def _row_label(r: int) -> str:
    return f"row {r}"


class CacheEngine:
    """Per-row block-cache state and the policy, advanced one chunk of steps at a time.

    ``rows``: number of independent rows; ``static_score``: float [rows, n_blocks] (``static`` only);
    ``n_blocks``: blocks per row to size the state for (it grows when a chunk needs more); ``row_label``: turns
    a row index into words for error messages (e.g. "layer 3, KV head 1, seq 0"); ``first_step``: the step
    number errors name for the first step fed (a trace's ``step0``).
    ``belady`` reads the future of each row, so it accepts exactly one chunk: the whole trace.
    After a ValueError from :meth:`feed` the state is half-updated, so the engine refuses further chunks.
    """

    def __init__(self, policy: str, capacity: int, rows: int, block_size: int = 64, static_score=None,
                 record: bool = False, n_blocks: int = 1, row_label: Callable[[int], str] = _row_label,
                 first_step: int = 0):
        self.policy_name = policy
        self.policy = policy_code(policy)
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 0:
            raise ValueError(f"capacity must be an integer >= 0 (complete-block slots), got {capacity!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        if not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ValueError(f"rows must be an integer >= 1, got {rows!r}")
        self.capacity, self.block_size, self.rows = int(capacity), int(block_size), int(rows)
        self.record, self.row_label, self.first_step = bool(record), row_label, int(first_step)
        self.failed = False
        if self.policy == STATIC:
            if static_score is None:
                raise ValueError(
                    "policy 'static' needs the query-agnostic block scores (the trace's 'agnostic_score' array); "
                    "this trace has none"
                )
            static_score = np.ascontiguousarray(static_score, dtype=np.float32)
            if static_score.ndim != 2 or static_score.shape[0] != self.rows:
                raise ValueError(
                    f"field 'static_score' must have shape [rows={self.rows}, n_blocks], got {static_score.shape}"
                )
            self.static = static_score
        else:
            self.static = np.zeros((1, 1), np.float32)
        self.steps_done = 0
        self._last_ctx: np.ndarray | None = None
        self._alloc(max(1, int(n_blocks)))

    def _alloc(self, n_blocks: int) -> None:
        """(Re)size the per-block state to ``n_blocks``, keeping what earlier chunks left in it."""
        old = getattr(self, "state", None)
        R = self.rows
        new = (
            np.full((R, n_blocks), -1, np.int32),  # pos
            np.zeros((R, n_blocks), np.int32),  # slots
            np.zeros(R, np.int32),  # nres
            np.full((R, n_blocks), -1, np.int32),  # last
            np.zeros((R, n_blocks), np.int32),  # count
            np.full(R, -1, np.int32),  # prev_tail
        )
        if old is not None:
            nb = old[0].shape[1]
            for dst, src in zip(new, old):
                if dst.ndim == 2:
                    dst[:, :nb] = src
                else:
                    dst[:] = src
        self.state, self.n_blocks = new, n_blocks

    def _check_context(self, ctx: np.ndarray) -> np.ndarray:
        ctx = np.asarray(ctx)
        if not np.issubdtype(ctx.dtype, np.integer):
            raise ValueError(f"field 'context_len' must be an integer array, got dtype {ctx.dtype}")
        if ctx.ndim == 1:
            ctx = ctx[:, None]
        if ctx.ndim != 2 or self.rows % ctx.shape[1] != 0:
            raise ValueError(
                f"field 'context_len' must be [steps] or [steps, n] with n dividing rows={self.rows} "
                f"(row r reads column r % n), got shape {ctx.shape}"
            )
        if (ctx < 1).any():
            raise ValueError("field 'context_len' must be >= 1 (the new token is always in the cache)")
        joined = ctx if self._last_ctx is None else np.concatenate([self._last_ctx, ctx])
        if self._last_ctx is not None and self._last_ctx.shape[1] != ctx.shape[1]:
            raise ValueError(f"field 'context_len': chunk has {ctx.shape[1]} columns, earlier chunks "
                             f"{self._last_ctx.shape[1]}")
        bad = np.argwhere(np.diff(joined, axis=0) != 1)
        if len(bad):
            t, c = bad[0]
            t0 = self.first_step + self.steps_done - (0 if self._last_ctx is None else 1)
            raise ValueError(
                f"field 'context_len' must increase by exactly one per step; column {c} goes from "
                f"{joined[t, c]} at step {t0 + t} to {joined[t + 1, c]} at step {t0 + t + 1}"
            )
        return np.ascontiguousarray(ctx, dtype=np.int32)

    def feed(self, sel, context_len) -> StepCounters:
        """Advance every row through the next chunk of steps: ``sel`` int [steps, rows, width] of complete
        block ids (-1 padding; an id equal to the tail is ignored), ``context_len`` [steps] or [steps, n]."""
        if self.failed:
            raise ValueError("this CacheEngine stopped at an error in an earlier chunk; start a new one")
        sel = np.asarray(sel)
        if not np.issubdtype(sel.dtype, np.integer):
            raise ValueError(f"field 'sel' must be an integer array, got dtype {sel.dtype}")
        if sel.ndim != 3 or sel.shape[1] != self.rows:
            raise ValueError(f"field 'sel' must have shape [steps, rows={self.rows}, width], got {sel.shape}")
        if sel.dtype != np.int16:
            if sel.size and (sel.min() < -1 or sel.max() > np.iinfo(np.int16).max):
                raise ValueError(f"field 'sel': ids must be -1 or in 0..32767, got {sel.min()}..{sel.max()}")
            sel = sel.astype(np.int16)
        sel = np.ascontiguousarray(sel)
        ctx = self._check_context(context_len)
        if ctx.shape[0] != sel.shape[0]:
            raise ValueError(f"field 'context_len' has {ctx.shape[0]} steps, 'sel' has {sel.shape[0]}")
        if self.policy == BELADY and self.steps_done:
            raise ValueError("policy 'belady' reads the future: feed the whole trace as one chunk")
        T = sel.shape[0]
        need = int((ctx.max() - 1) // self.block_size) + 1 if T else 1
        if need > self.n_blocks:
            self._alloc(need)
        if self.policy == STATIC and self.static.shape[1] < need - 1:
            raise ValueError(f"field 'static_score' covers {self.static.shape[1]} blocks, the trace needs "
                             f"{need - 1} (every complete block)")
        static = self.static
        if self.policy == STATIC and static.shape[1] < self.n_blocks:  # pad: the kernel indexes up to n_blocks
            static = np.pad(static, ((0, 0), (0, self.n_blocks - static.shape[1])), constant_values=np.nan)
        out = tuple(np.zeros((T, self.rows), np.int32) for _ in range(4))
        shape = (T, self.rows, self.n_blocks) if self.record else (0, 0, 0)
        rec = (np.zeros(shape, np.bool_), np.zeros(shape, np.bool_))
        err = np.zeros(kernel.ERR_FIELDS, np.int64)
        kernel.run_chunk(sel, ctx, self.block_size, self.policy, self.capacity, static, self.steps_done,
                         self.state, out, rec, err, TILE_ROWS)
        if err[0] != kernel.ERR_NONE:
            self.failed = True
            self._raise(err, sel, ctx)
        self.steps_done += T
        if T:
            self._last_ctx = ctx[-1:].copy()
        return StepCounters(*out, *(rec if self.record else (None, None)))

    def _raise(self, err: np.ndarray, sel: np.ndarray, ctx: np.ndarray):
        code, t, r, value, extra = (int(x) for x in err)
        where = f"step {self.first_step + self.steps_done + t}, {self.row_label(r)}"
        if code == kernel.ERR_FUTURE:
            raise ValueError(
                f"field 'sel': block id {value} at {where} is beyond the last complete block ({extra - 1}) "
                f"at context_len {ctx[t, r % ctx.shape[1]]}: a selection cannot name a future block"
            )
        if code == kernel.ERR_NEGATIVE:
            raise ValueError(f"field 'sel': id {value} at {where}; ids must be >= 0, or -1 for padding")
        if code == kernel.ERR_DUPLICATE:
            raise ValueError(f"field 'sel': block id {value} appears twice in the selection of {where}")
        if code == kernel.ERR_CAPACITY:
            biggest = kernel.max_selection_size(sel, ctx, self.block_size)
            raise CapacityError(
                f"capacity C={extra} is smaller than the largest selection ({biggest} complete blocks; first "
                f"exceeded at {where} with {value}): C must be >= max |S_t| = {biggest}",
                biggest, extra,
            )
        raise RuntimeError(f"cache engine error code {code} at {where}: this is a bug in nosasim.cache")


class CapacityError(ValueError):
    """C < max |S_t|: ``max_selection`` is the largest selection seen (in the chunk that failed)."""

    def __init__(self, message: str, max_selection: int, capacity: int):
        super().__init__(message)
        self.max_selection, self.capacity = max_selection, capacity


def simulate_arrays(sel, context_len, policy: str = "lru", capacity: int | None = None, *, block_size: int = 64,
                    static_score=None, record: bool = False) -> StepCounters:
    """Simulate hand-made arrays in one call: ``sel`` int [steps, rows, width] (-1 padded), ``context_len``
    [steps] (shared by all rows) or [steps, rows], ``static_score`` [rows, n_blocks] for ``static``.

    ``capacity`` defaults to the contract's for arrays of unknown origin, the selection width (an imported
    trace's ``k``: ``nosasim.contract.default_capacity``). With ``record=True`` the result also holds
    the resident set after every step and the blocks evicted at it.
    """
    sel = np.asarray(sel)
    if sel.ndim != 3:
        raise ValueError(f"field 'sel' must have shape [steps, rows, width], got {sel.shape}")
    cap = default_capacity(sel.shape[2], "import") if capacity is None else capacity
    engine = CacheEngine(policy, cap, sel.shape[1], block_size,
                         static_score, record)
    return engine.feed(sel, context_len)
