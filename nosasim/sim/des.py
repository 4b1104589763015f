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
from nosasim.sim.schedule import SimResult, StepInputs, program


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
    gather, writeback = inp.gather.tolist(), inp.writeback.tolist()
    step_pre, step_post = inp.step_pre.tolist(), inp.step_post.tolist()
    step_s = np.zeros(steps)
    stall = np.zeros(steps)
    drain = np.zeros(steps)

    def run():
        for s in range(steps):
            start = env.now
            waited = 0.0
            yield env.timeout(step_pre[s])
            pending = {}
            copies = []
            for kind, layer, mb in order:
                if kind == "pre":
                    yield env.timeout(pre[s][mb])
                    g = gather[s][layer][mb]
                    if g > 0:
                        pending[layer, mb] = proc = env.process(_copy(env, h2d, g))
                        copies.append(proc)
                    w = writeback[s][layer][mb]
                    if w > 0:
                        copies.append(env.process(_copy(env, d2h, w)))
                else:
                    landed = pending.pop((layer, mb), None)
                    if landed is not None and not landed.processed:
                        t0 = env.now
                        yield landed
                        waited += env.now - t0
                    yield env.timeout(post[s][mb])
            if pending:
                raise RuntimeError(f"gathers {sorted(pending)} were never awaited: a bug")
            yield env.timeout(step_post[s])
            compute_end = env.now
            left = [c for c in copies if not c.processed]
            if left:
                yield env.all_of(left)
            drain[s] = env.now - compute_end
            stall[s] = waited
            step_s[s] = env.now - start

    env.process(run())
    env.run()
    breakdown = inp.compute_breakdown()
    breakdown[:, CLASS_INDEX["h2d_wait"]] += stall
    breakdown[:, CLASS_INDEX["d2h_wait"]] += drain
    return SimResult(step_s=step_s, breakdown=breakdown)
