"""Trace-level entry point: replay a trace (in memory, a reader, or a file) through the block cache.

Streaming: for every policy but ``belady`` a :class:`~nosasim.trace.TraceReader` (or a path) is processed one
stored chunk of steps at a time with the cache state carried across chunks, so memory holds one chunk of
selections plus the per-row state and the counters. ``belady`` needs each block's next use, i.e. the future,
so it reads the whole trace into memory first.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from nosasim.contract import default_capacity
from nosasim.trace import Trace, TraceReader

from . import kernel
from .engine import CacheEngine, CapacityError
from .policies import policy_code
from .result import CacheResult


def _row_labeller(layers: int, heads: int, seqs: int):
    def label(r: int) -> str:
        l, h, b = np.unravel_index(r, (layers, heads, seqs))
        return f"layer {l}, KV head {h}, seq {b}"

    return label


def _chunks(source, whole: bool, progress: bool) -> tuple[Trace | TraceReader, Iterator[Trace], int]:
    """(header owner, iterator of step chunks, number of chunks)."""
    if isinstance(source, Trace):
        if whole or not progress:
            return source, iter([source]), 1
        cs = source.header.chunk_steps
        n = -(-source.steps // cs)
        parts = (
            Trace(source.header, source.sel[lo:lo + cs], source.context_len[lo:lo + cs], source.agnostic_score,
                  step0=source.step0 + lo)
            for lo in range(0, source.steps, cs)
        )
        return source, parts, n
    if isinstance(source, TraceReader):
        if whole:
            return source, iter([source.read()]), 1
        return source, source.iter_chunks(), source.header.n_chunks
    raise ValueError(f"source must be a Trace, a TraceReader or a path, got {type(source).__name__}")


def simulate_cache(source, policy: str = "lru", capacity: int | None = None, progress: bool = False,
                   record: bool = False) -> CacheResult:
    """Replay ``source`` through a GPU cache of ``capacity`` complete-block slots per (layer, KV head, seq).

    ``source``: a :class:`~nosasim.trace.Trace`, a :class:`~nosasim.trace.TraceReader` or a path to a trace
    file. ``policy``: one of :data:`~nosasim.cache.POLICIES`. ``capacity`` defaults to the contract's
    (``nosasim.contract.default_capacity``: ``k - 1`` for selections made by a budget rule, ``k`` for imported ones).
    ``progress`` shows a bar over chunks on stderr. ``record`` also returns the resident and evicted block
    sets per step (memory: steps x rows x n_blocks bytes each), for step-by-step comparison with the runtime.
    Raises ValueError for bad input: unknown policy, C < max |S_t|, ``static`` without scores, a future block.
    """
    policy_code(policy)  # unknown policy: fail before opening anything
    if isinstance(source, (str, os.PathLike)):
        with TraceReader(source) as reader:
            return simulate_cache(reader, policy, capacity, progress, record)
    whole = policy == "belady"
    owner, chunks, n_chunks = _chunks(source, whole, progress)
    h = owner.header
    L, H, B = h.model.layers, h.model.kv_heads, h.seqs
    R, T = L * H * B, h.steps if isinstance(owner, TraceReader) else owner.steps
    scores = owner.agnostic_score
    static = None if scores is None else np.asarray(scores).reshape(R, -1)
    cap = default_capacity(h.k, h.selection.method) if capacity is None else capacity
    engine = CacheEngine(policy, cap, R, h.block_size, static if policy == "static" else None, record,
                         n_blocks=h.n_blocks, row_label=_row_labeller(L, H, B),
                         first_step=owner.step0 if isinstance(owner, Trace) else 0)
    counters = [np.zeros((T, R), np.int32) for _ in range(4)]
    recs = [np.zeros((T, R, engine.n_blocks), np.bool_) for _ in range(2)] if record else None
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, total=n_chunks, desc=f"cache {policy} C={cap}", unit="chunk")
    done = 0
    try:
        for chunk in chunks:
            part = engine.feed(chunk.rows(), chunk.context_len)
            n = chunk.steps
            for dst, src in zip(counters, (part.hits, part.misses, part.writebacks, part.evictions)):
                dst[done:done + n] = src
            if record:
                recs[0][done:done + n, :, :part.resident.shape[2]] = part.resident
                recs[1][done:done + n, :, :part.evicted.shape[2]] = part.evicted
            done += n
    except CapacityError as exc:
        if isinstance(owner, Trace) or whole:
            raise
        # The failing chunk only knows its own largest selection; the message promises the trace's.
        biggest = max(kernel.max_selection_size(np.ascontiguousarray(c.rows()), c.context_len.astype(np.int32),
                                                h.block_size) for c in owner.iter_chunks())
        raise CapacityError(
            f"capacity C={exc.capacity} is smaller than the largest selection of the trace ({biggest} complete "
            f"blocks): C must be >= max |S_t| = {biggest}", biggest, exc.capacity,
        ) from None
    if done != T:
        raise RuntimeError(f"cache replay covered {done} of {T} steps: this is a bug")
    shape = (T, L, H, B)
    return CacheResult(
        policy, int(cap), h.block_size, *(c.reshape(shape) for c in counters), block_bytes=h.block_bytes(),
        resident=None if recs is None else recs[0].reshape(shape + (-1,)),
        evicted=None if recs is None else recs[1].reshape(shape + (-1,)),
    )
