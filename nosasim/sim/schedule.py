"""What both simulators replay: per-step op durations (``StepInputs``), the issue order, results.

The runtime issues one decode step as a fixed program on an in-order compute stream, with gathers (H2D) and
writebacks (D2H) on their own copy streams; the program is ``nosasim.contract.program``, which the runtime runs
itself. With ``m`` micro-batches it staggers them, so micro-batch ``j``'s gather overlaps the other
micro-batches' compute; with ``m = 1`` everything is serial. A step ends when compute is done and both copy streams
are drained (a step never leaves transfers running into the next; conservative, as writebacks are rare).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nosasim.contract import program  # noqa: F401 - the issue order, shared with the runtime, re-exported here
from nosasim.cost import CLASSES


@dataclass(frozen=True, slots=True)
class StepInputs:
    """Seconds of every op of every step. Layers share compute costs (same shapes); transfers are per layer because
    each layer's cache misses differ.

    pre, post: [steps, m] compute before / after a micro-batch's transfers (per layer).
    pre_cls, post_cls: [steps, m, classes] the same split into breakdown classes.
    step_pre, step_post: [steps] embedding before the layers, final norm + LM head after (all micro-batches).
    step_cls: [steps, classes]. gather, writeback: [steps, layers, m] copy seconds (0 = no copy issued).
    overlap_slowdown: compute runs ``1 + overlap_slowdown`` times slower while a gather is in flight (the profile's).
    early, late: [steps, layers, m] attention seconds of a post phase split around its gather (``split_attention``:
    the resident blocks are attended before the gather is waited for, the copied ones after); None when attention
    is not split (it is then part of ``post``). Both count as the ``attention`` class.
    """

    pre: np.ndarray
    post: np.ndarray
    pre_cls: np.ndarray
    post_cls: np.ndarray
    step_pre: np.ndarray
    step_post: np.ndarray
    step_cls: np.ndarray
    gather: np.ndarray
    writeback: np.ndarray
    overlap_slowdown: float = 0.0
    early: np.ndarray | None = None
    late: np.ndarray | None = None

    def __post_init__(self):
        steps, m = self.pre.shape
        expect = {"post": (steps, m), "pre_cls": (steps, m, len(CLASSES)), "post_cls": (steps, m, len(CLASSES)),
                  "step_pre": (steps,), "step_post": (steps,), "step_cls": (steps, len(CLASSES)),
                  "writeback": self.gather.shape}
        for name, shape in expect.items():
            if getattr(self, name).shape != shape:
                raise RuntimeError(f"StepInputs.{name} has shape {getattr(self, name).shape}, expected {shape}: a bug")
        if self.gather.ndim != 3 or self.gather.shape[0] != steps or self.gather.shape[2] != m:
            raise RuntimeError(f"StepInputs.gather has shape {self.gather.shape}, expected (steps, layers, {m}): a bug")
        if (self.early is None) != (self.late is None) or (self.early is not None and not (
                self.early.shape == self.late.shape == self.gather.shape)):
            raise RuntimeError("StepInputs.early and late must both be None or both [steps, layers, m]: a bug")

    def split_at(self, layer: int, mb: int) -> tuple:
        """(seconds before the wait, seconds after it) of the post phase's attention of ``layer``: ``(0, 0)`` when
        attention is not split (it is inside ``post``)."""
        if self.early is None:
            return 0.0, 0.0
        return self.early[:, layer, mb], self.late[:, layer, mb]

    @property
    def layers(self) -> int:
        return self.gather.shape[1]

    @property
    def microbatches(self) -> int:
        return self.pre.shape[1]

    def compute_breakdown(self) -> np.ndarray:
        """Compute-stream seconds per class, [steps, classes] (stalls excluded)."""
        out = self.step_cls + self.layers * (self.pre_cls.sum(axis=1) + self.post_cls.sum(axis=1))
        if self.early is not None:
            out[:, CLASSES.index("attention")] += (self.early + self.late).sum(axis=(1, 2))
        return out


def compute_end(t, d, busy_until, slowdown: float):
    """End of a compute op of ``d`` seconds that starts at ``t`` while the H2D engine is busy until ``busy_until``:
    compute progresses at ``1 / (1 + slowdown)`` speed while a gather runs beside it, then at full speed. Scalars
    (the event model) or arrays over steps (the analytic path). Gathers queued on the engine run back to back and
    are all issued before the op starts, so the engine is busy without a gap from ``t`` to ``busy_until``."""
    if not slowdown:
        return t + d
    span = np.maximum(busy_until - t, 0.0)
    work = span / (1.0 + slowdown)  # compute seconds the op gets through while the engine is busy
    return np.where(d <= work, t + d * (1.0 + slowdown), t + span + (d - work))


@dataclass(frozen=True, slots=True)
class SimResult:
    """Per-step results: ``step_s`` [steps] and ``breakdown`` [steps, classes], whose rows sum to ``step_s``."""

    step_s: np.ndarray
    breakdown: np.ndarray

    def median_step(self) -> tuple[float, dict[str, float]]:
        """Median step time and the breakdown of the median step(s), so the breakdown adds up to the median."""
        order = np.argsort(self.step_s, kind="stable")
        n = len(order)
        mid = order[[(n - 1) // 2, n // 2]]
        parts = self.breakdown[mid].mean(axis=0)
        return float(self.step_s[mid].mean()), {c: float(v) for c, v in zip(CLASSES, parts)}
