"""Discrete-event model of decode steps (SimPy): the reference the analytic path is checked against.

Resources follow the hardware: the compute stream is one in-order process (a CUDA stream runs its kernels in issue
order), and each copy direction (H2D gathers, D2H writebacks) is a ``simpy.Resource`` of capacity one, since a
direction's copies serialize on the link. A post-phase op (attention onward) waits for its micro-batch's gather to
land; a step ends when compute is done and both copy engines are drained. Ops between two waits are one timeout
(their split into classes is known in advance), which keeps a 1,024-step, 32-layer replay to about 10 events per
layer and step.
"""

from __future__ import annotations

import numpy as np
import simpy

from nosasim.cost import CLASS_INDEX
from nosasim.sim.schedule import SimResult, StepInputs, compute_end, program


def _copy(env: simpy.Environment, engine: simpy.Resource, seconds: float):
    with engine.request() as req:
        yield req
        yield env.timeout(seconds)


def simulate(inp: StepInputs) -> SimResult:
    """Run every step of ``inp`` through the event model, one step after another."""
    env = simpy.Environment()
    h2d = simpy.Resource(env, capacity=1)
    d2h = simpy.Resource(env, capacity=1)
    steps = inp.pre.shape[0]
    order = program(inp.layers, inp.microbatches)
    # Python floats: indexing numpy scalars in the event loop would dominate the run time.
    pre, post = inp.pre.tolist(), inp.post.tolist()
    split = inp.early is not None
    early = inp.early.tolist() if split else None
    late = inp.late.tolist() if split else None
    gather, writeback = inp.gather.tolist(), inp.writeback.tolist()
    step_pre, step_post = inp.step_pre.tolist(), inp.step_post.tolist()
    step_s = np.zeros(steps)
    stall = np.zeros(steps)
    drain = np.zeros(steps)
    slowed = np.zeros(steps)
    slow = inp.overlap_slowdown
    h2d_free = [0.0]  # when the H2D engine's queued gathers end (the engine is FIFO; only this process issues)

    def stretch(d: float) -> float:
        """Seconds a compute-stream op of ``d`` seconds takes from now: longer while a gather runs beside it."""
        return float(compute_end(env.now, d, h2d_free[0], slow)) - env.now if slow else d

    def run():
        for s in range(steps):
            start = env.now
            waited = extra = 0.0
            dur = stretch(step_pre[s])
            extra += dur - step_pre[s]
            yield env.timeout(dur)
            pending = {}
            copies = []
            for kind, layer, mb in order:
                if kind == "pre":
                    dur = stretch(pre[s][mb])
                    extra += dur - pre[s][mb]
                    yield env.timeout(dur)
                    g = gather[s][layer][mb]
                    if g > 0:
                        h2d_free[0] = max(env.now, h2d_free[0]) + g
                        pending[layer, mb] = proc = env.process(_copy(env, h2d, g))
                        copies.append(proc)
                    w = writeback[s][layer][mb]
                    if w > 0:
                        copies.append(env.process(_copy(env, d2h, w)))
                else:
                    if split:  # attention over the resident blocks runs before the wait
                        e = early[s][layer][mb]
                        dur = stretch(e)
                        extra += dur - e
                        yield env.timeout(dur)
                    landed = pending.pop((layer, mb), None)
                    if landed is not None and not landed.processed:
                        t0 = env.now
                        yield landed
                        waited += env.now - t0
                    rest = post[s][mb] + (late[s][layer][mb] if split else 0.0)
                    dur = stretch(rest)
                    extra += dur - rest
                    yield env.timeout(dur)
            if pending:
                raise RuntimeError(f"gathers {sorted(pending)} were never awaited: a bug")
            dur = stretch(step_post[s])
            extra += dur - step_post[s]
            yield env.timeout(dur)
            done = env.now
            left = [c for c in copies if not c.processed]
            if left:
                yield env.all_of(left)
            drain[s] = env.now - done
            stall[s] = waited
            slowed[s] = extra
            step_s[s] = env.now - start

    env.process(run())
    env.run()
    breakdown = inp.compute_breakdown()
    breakdown[:, CLASS_INDEX["h2d_wait"]] += stall + slowed  # gathers: waited for, and slowing compute beside them
    breakdown[:, CLASS_INDEX["d2h_wait"]] += drain
    return SimResult(step_s=step_s, breakdown=breakdown)
