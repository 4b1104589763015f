"""Batch assembly and trace retargeting: turn a trace's per-row cache results into a batch of another shape.

**Batches.** A batch of ``B`` sequences takes the trace's first ``B`` sequences. When the trace has fewer
(``S < B``), slot ``b`` replays sequence ``b % S`` delayed by ``(b // S) * shift`` steps, with
``shift = steps // (2 * copies)``: copy ``c`` of a sequence is that sequence ``c * shift`` steps further into its
decode, so it has another context length, other selections and other misses at every replayed step, and its
writebacks fall on other steps, as in a real batch whose requests arrived at different times. Copies are never
replicated in lockstep. The replay is shortened to ``steps - (copies - 1) * shift`` (at least half the trace) so
every slot has data at every step. A delayed copy starts with the cache state the policy engine computed for the
original at that step (it has been decoding for that long); undelayed slots start cold, as the trace does.

**Retargeting.** A trace recorded on a model with ``Ls`` layers and ``Hs`` KV heads drives a prediction for ``L``
layers and ``H`` heads by mapping target layer ``l`` to source layer ``l % Ls`` and target head ``h`` to ``h % Hs``
(cyclic). Block counts carry over; bytes per block are the target's (its head_dim). Mapped rows repeat source rows,
so the target's per-layer miss counts are sums of real rows, not averages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """Slot ``b`` of the batch replays source sequence ``seq[b]`` shifted by ``offset[b]`` steps, for ``steps``."""

    seq: np.ndarray
    offset: np.ndarray
    steps: int

    @property
    def batch(self) -> int:
        return len(self.seq)

    def take(self, arr: np.ndarray) -> np.ndarray:
        """Assemble ``arr`` [steps, ..., seqs] (steps first, sequences last) into [plan.steps, ..., batch]."""
        t = np.arange(self.steps)[:, None] + self.offset[None, :]  # [steps, B] source step per slot
        moved = np.moveaxis(arr, -1, 1)  # [T, S, ...]
        out = moved[t, self.seq[None, :]]  # [steps, B, ...]
        return np.moveaxis(out, 1, -1)


def plan_batch(seqs: int, steps: int, batch: int) -> BatchPlan:
    """Choose which sequence and step shift fills each batch slot (see the module docstring)."""
    if batch < 1:
        raise ValueError(f"batch: expected a positive number of sequences, got {batch}")
    if batch <= seqs:
        return BatchPlan(np.arange(batch), np.zeros(batch, dtype=np.int64), steps)
    copies = math.ceil(batch / seqs)
    shift = steps // (2 * copies)
    if shift < 1:
        raise ValueError(f"batch: {batch} sequences need {copies} step-shifted copies of the trace's {seqs} "
                         f"sequence(s), which needs at least {2 * copies} steps; the trace has {steps}")
    slot = np.arange(batch)
    offset = (slot // seqs) * shift
    return BatchPlan(slot % seqs, offset.astype(np.int64), steps - (copies - 1) * shift)


def head_multiplicity(src_heads: int, dst_heads: int) -> np.ndarray:
    """How many target heads map to each source head under ``h -> h % src_heads``."""
    return np.bincount(np.arange(dst_heads) % src_heads, minlength=src_heads)


def per_layer_seq(rows: np.ndarray, layers: int, heads: int) -> np.ndarray:
    """Per-row counts [T, Ls, Hs, S] -> counts per target layer and sequence [T, layers, S], summed over the
    target's heads after cyclic retargeting."""
    if rows.ndim != 4:
        raise ValueError(f"rows: expected [steps, layers, heads, seqs], got shape {rows.shape}")
    mult = head_multiplicity(rows.shape[2], heads)
    per_src_layer = np.einsum("tlhs,h->tls", rows.astype(np.int64), mult)
    return per_src_layer[:, np.arange(layers) % rows.shape[1], :]


def per_microbatch(arr: np.ndarray, groups: list[range]) -> np.ndarray:
    """Sum the last (batch) axis within each micro-batch (``nosasim.contract.microbatch_groups``): [..., B] ->
    [..., m]."""
    return np.stack([arr[..., g.start:g.stop].sum(axis=-1) for g in groups], axis=-1)


def assemble_trace(trace, batch: int):
    """The batch as a trace of its own: slot ``b`` is source sequence ``plan.seq[b]`` from step ``plan.offset[b]``.

    Unlike :meth:`BatchPlan.take` on a cache result, every slot of the new trace starts *cold* at its first step,
    which is what a runtime that replays the assembled selections from an empty GPU cache does; the validation
    against the GPU runtime uses it so that both sides start from the same state. Per-step score arrays are
    dropped (re-select first, then assemble).
    """
    from nosasim.trace import Trace

    plan = plan_batch(trace.seqs, trace.steps, batch)
    sel = np.moveaxis(plan.take(np.moveaxis(trace.sel, 3, -1)), -1, 3)
    agn = None if trace.agnostic_score is None else trace.agnostic_score[:, :, plan.seq]
    prov = dict(trace.header.provenance, batch_plan={"seq": plan.seq.tolist(), "offset": plan.offset.tolist()})
    return Trace.from_arrays(sel, plan.take(trace.context_len), block_size=trace.block_size, model=trace.header.model,
                             selection=trace.header.selection, provenance=prov, agnostic_score=agn, k=trace.k)
