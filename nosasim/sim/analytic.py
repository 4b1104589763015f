"""Analytic fast path: the discrete-event model's schedule as vectorized numpy over decode steps.

Each step's timeline depends only on that step's op durations, and the compute stream and each copy engine are
in-order queues, so the event model collapses to a max-plus recurrence over the program (``program()``): a copy
starts when its stream is free and its issuing op has finished, a post-phase op starts when the compute stream is
free and its micro-batch's gather has landed. Running the recurrence on arrays ``[steps]`` gives every step at once,
with the same result as :mod:`nosasim.sim.des` (tested), orders of magnitude faster; sweeps use this path.
"""

from __future__ import annotations

import numpy as np

from nosasim.cost import CLASS_INDEX
from nosasim.sim.schedule import SimResult, StepInputs, compute_end, program


def simulate(inp: StepInputs) -> SimResult:
    """Step time and per-class breakdown of every step of ``inp``."""
    steps = inp.pre.shape[0]
    slow = inp.overlap_slowdown
    t = inp.step_pre.copy()
    h2d_free = np.zeros(steps)
    d2h_free = np.zeros(steps)
    stall = np.zeros(steps)
    landed: dict[tuple[int, int], np.ndarray] = {}
    for kind, layer, mb in program(inp.layers, inp.microbatches):
        if kind == "pre":
            t = compute_end(t, inp.pre[:, mb], h2d_free, slow)
            g = inp.gather[:, layer, mb]
            end = np.maximum(t, h2d_free) + g
            # A micro-batch with no misses issues no gather: nothing to wait for, the engine stays as it was.
            h2d_free = np.where(g > 0, end, h2d_free)
            landed[layer, mb] = np.where(g > 0, end, t)
            w = inp.writeback[:, layer, mb]
            d2h_free = np.where(w > 0, np.maximum(t, d2h_free) + w, d2h_free)
        else:
            early, late = inp.split_at(layer, mb)
            t = compute_end(t, early, h2d_free, slow)  # attention over the resident blocks, before the wait
            wait = np.maximum(landed.pop((layer, mb)) - t, 0.0)
            stall += wait
            t = compute_end(t + wait, inp.post[:, mb] + late, h2d_free, slow)
    if landed:
        raise RuntimeError(f"gathers {sorted(landed)} were never consumed by the program: a bug")
    t = compute_end(t, inp.step_post, h2d_free, slow)
    drain = np.maximum(np.maximum(h2d_free, d2h_free) - t, 0.0)
    breakdown = inp.compute_breakdown()
    # Time lost to gathers: waiting for them, and compute slowed by those running beside it (what is left of the
    # compute-stream time once the ops' own seconds and the waits are taken out).
    slowed = np.maximum(t - breakdown.sum(axis=1) - stall, 0.0)
    breakdown[:, CLASS_INDEX["h2d_wait"]] += stall + slowed
    breakdown[:, CLASS_INDEX["d2h_wait"]] += drain
    return SimResult(step_s=t + drain, breakdown=breakdown)
