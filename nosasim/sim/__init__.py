"""Predict decode step time, throughput and memory by replaying a trace.

``predict(trace, config)`` is the whole pipeline: resolve budgets against the trace, re-select from scores when the
budgets differ from the trace's, run the policy engine (``nosasim.cache``), assemble the batch and retarget to the
model shape (``nosasim.batch``), cost every op of every step (``nosasim.cost``), and run the schedule through the
analytic path (default) or the SimPy event model (``method="des"``). Per-step transfer volume is that step's misses,
never an average.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from nosasim.batch import BatchPlan, per_layer_seq, per_microbatch, plan_batch
from nosasim.contract import Budget, default_capacity, microbatch_groups
from nosasim.cost import CostModel, class_totals
from nosasim.floor import step_floor
from nosasim.hardware import Profile, load_profile
from nosasim.memory import check_fits, footprint, host_kv_bytes, max_batch
from nosasim.models import ModelSpec, ReplayConfig, load_model, presets
from nosasim.sim.schedule import SimResult, StepInputs, program

__all__ = ["Prediction", "StepInputs", "SimResult", "build_inputs", "predict", "program", "resolve", "run_cache", "selection_trace"]


def _preset_for(shape) -> str:
    """The preset a trace was recorded on: by name, else the one preset with the trace's attention shape."""
    if shape.name in presets():
        return shape.name
    same = []
    for n in presets():
        m = load_model(n)
        if (m.layers, m.kv_heads, m.head_dim) == (shape.layers, shape.kv_heads, shape.head_dim) and \
                shape.q_heads in (None, m.q_heads):
            same.append(n)
    if len(same) != 1:
        raise ValueError(f"--model: the trace's model {shape.name or '(unnamed)'!r} is not a preset and its shape "
                         f"matches {len(same)} presets; pass one of {presets()}, a JSON file or a key=value shape")
    return same[0]


def resolve(trace, cfg: ReplayConfig) -> tuple[ReplayConfig, ModelSpec, Profile]:
    """Fill the config's trace-dependent defaults (model, budgets, capacity) and load the model shape and profile.

    Without ``k`` the trace's own budget applies (its sink and window too: its selections are replayed as they
    are); NOSA on a trace recorded with InfLLM-V2 scores re-selects with NOSA's default split. The default capacity
    is the contract's for the trace's selection method (``nosasim.contract.default_capacity``) when the trace's own
    selections are replayed, the budget rule's (``k - 1``) when they are re-selected."""
    have = trace.header.selection.budget
    name = cfg.model or _preset_for(trace.header.model)
    model = load_model(name)
    changes: dict = {"model": name}
    if cfg.variant != "dense" and cfg.k is None:
        k_q = cfg.k_q
        if k_q is None and cfg.variant == "nosa":
            has_scores = trace.qaware_score is not None and trace.agnostic_score is not None
            # A NOSA trace keeps its split; an InfLLM-V2 score trace is re-selected with NOSA's default split; an
            # InfLLM-V2 trace without scores is replayed as it is, with NOSA's costs.
            k_q = have.k_q if have.agnostic or not has_scores else None
        want = Budget.for_variant(cfg.variant, have.k, k_q, have.sink, have.window)
        method = trace.header.selection.method if want.same_selection(have) else "reselect"
        changes.update(k=want.k, k_q=want.k_q, sink=want.sink, window=want.window,
                       capacity=cfg.capacity if cfg.capacity is not None else default_capacity(want.k, method))
    cfg = dataclasses.replace(cfg, **changes)
    return cfg, model, load_profile(cfg.profile)


def selection_trace(trace, cfg: ReplayConfig):
    """The trace whose selections match the config's budget (see ``nosasim.select.for_budget``)."""
    from nosasim.select import for_budget

    return for_budget(trace, cfg.budget)


def run_cache(trace, cfg: ReplayConfig):
    """Policy-engine result for the config's selections, or None for dense (nothing is cached or moved)."""
    if not cfg.offloaded:
        return None
    from nosasim.cache.simulate import simulate_cache

    return simulate_cache(selection_trace(trace, cfg), cfg.policy, cfg.capacity)


def build_inputs(cost: CostModel, context: np.ndarray, misses: np.ndarray, writebacks: np.ndarray,
                 microbatches: int, hits: np.ndarray | None = None) -> StepInputs:
    """Op seconds for every step: ``context`` [T, B] tokens per sequence, ``misses``/``writebacks``/``hits``
    [T, L, B] blocks per layer and sequence (already summed over the target's KV heads; ``hits`` is needed only
    when attention is split around the gather)."""
    steps, batch = context.shape
    groups = microbatch_groups(batch, microbatches)
    pre_cls, post_cls = [], []
    step_pre_ops, step_post_ops = [], []
    split = cost.cfg.split_attention
    early, late = [], []
    for j, g in enumerate(groups):
        ops_pre, ops_post = cost.layer_ops(len(g), context[:, g.start:g.stop].sum(axis=1))
        if split:  # attention moves out of "post", split around the gather per layer
            ops_post = [op for op in ops_post if op.cls != "attention"]
            e, lt = cost.attention_split(len(g), per_microbatch(hits, groups)[..., j],
                                         per_microbatch(misses, groups)[..., j])
            early.append(e)
            late.append(lt)
        pre_cls.append(class_totals(ops_pre, steps))
        post_cls.append(class_totals(ops_post, steps))
        emb, head = cost.step_ops(len(g), steps)
        step_pre_ops += emb
        step_post_ops += head
    pre_cls, post_cls = np.stack(pre_cls, axis=1), np.stack(post_cls, axis=1)
    step_pre = class_totals(step_pre_ops, steps)
    step_post = class_totals(step_post_ops, steps)
    return StepInputs(
        pre=pre_cls.sum(axis=2), post=post_cls.sum(axis=2), pre_cls=pre_cls, post_cls=post_cls,
        step_pre=step_pre.sum(axis=1), step_post=step_post.sum(axis=1), step_cls=step_pre + step_post,
        gather=cost.gather_time(per_microbatch(misses, groups)),
        writeback=cost.writeback_time(per_microbatch(writebacks, groups)),
        overlap_slowdown=cost.p.overlap_slowdown,
        early=np.stack(early, axis=-1) if split else None, late=np.stack(late, axis=-1) if split else None,
    )


@dataclass
class Prediction:
    """What one replay predicts. ``breakdown`` is the median step's seconds per class (sums to ``step_time_s``)."""

    step_time_s: float
    tokens_per_s: float
    breakdown: dict[str, float]
    hit_rate: float | None
    h2d_bytes_per_step: float
    d2h_bytes_per_step: float
    gpu_memory_bytes: float
    memory: dict[str, float]
    max_batch: int
    host_kv_bytes: float
    steps: int
    method: str
    config: dict = field(default_factory=dict)
    floor: dict = field(default_factory=dict)
    # The profile's host memory (0: not known) and whether the batch's offloaded KV fits it (None: not known, or
    # dense, which keeps nothing on the host). Every slot of the batch is its own sequence with its own history.
    host_memory_bytes: float = 0.0
    host_fits: bool | None = None
    # Tables read outside the range their calibration measured (per micro-batch batch, longest context), one
    # sentence each; empty when every table this configuration reads covers it.
    outside_calibration: list = field(default_factory=list)
    step_times: np.ndarray | None = field(default=None, repr=False)
    floor_steps: object = field(default=None, repr=False)

    @property
    def transfer_share(self) -> float:
        """Share of the step spent stalled on transfers (exposed PCIe time)."""
        return (self.breakdown["h2d_wait"] + self.breakdown["d2h_wait"]) / self.step_time_s

    @property
    def floor_s(self) -> float:
        """The step's floor (``nosasim.floor``): bytes and FLOPs at the hardware's peaks, the median over steps."""
        return self.floor["floor_s"]

    @property
    def x_floor(self) -> float:
        """Predicted step time over its floor: how far this runtime is from what the hardware allows."""
        return self.step_time_s / self.floor_s

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("step_times", "floor_steps")}
        out.update(transfer_share=self.transfer_share, floor_s=self.floor_s, x_floor=self.x_floor)
        return out


def predict(trace, cfg: ReplayConfig, *, method: str = "analytic", cache_result=None, check_memory: bool = True,
            resolved: tuple[ModelSpec, Profile] | None = None) -> Prediction:
    """Replay ``trace`` under ``cfg``. Pass ``cache_result`` (and ``resolved``) to reuse work across sweep points."""
    if method not in ("analytic", "des"):
        raise ValueError(f"method: expected 'analytic' or 'des', got {method!r}")
    if resolved is None:
        cfg, model, profile = resolve(trace, cfg)
    else:
        model, profile = resolved
    plan: BatchPlan = plan_batch(trace.seqs, trace.steps, cfg.batch)
    context = plan.take(trace.context_len)
    ctx_max = int(context.max())
    mem = check_fits(profile, model, cfg, cfg.batch, ctx_max, trace.block_size) if check_memory else \
        footprint(model, cfg, cfg.batch, ctx_max, trace.block_size)
    cost = CostModel(profile, model, cfg, trace.block_size)
    zeros = np.zeros((plan.steps, model.layers, cfg.batch), dtype=np.int64)
    hit_rate = None
    if cfg.offloaded:
        res = cache_result if cache_result is not None else run_cache(trace, cfg)
        misses = plan.take(per_layer_seq(res.misses, model.layers, model.kv_heads))
        writebacks = plan.take(per_layer_seq(res.writebacks, model.layers, model.kv_heads))
        hits_lb = plan.take(per_layer_seq(res.hits, model.layers, model.kv_heads))
        hits = int(hits_lb.sum())
        hit_rate = hits / (hits + int(misses.sum())) if hits + misses.sum() else None
        attended = hits_lb + misses
    else:
        misses = writebacks = zeros
        # Dense attends every complete block of every KV head (the tail is counted by the floor itself).
        attended = np.broadcast_to(((context - 1) // trace.block_size * model.kv_heads)[:, None, :], zeros.shape)
    floor = step_floor(profile, model, cfg, context, attended, misses, writebacks, trace.block_size)
    inputs = build_inputs(cost, context, misses, writebacks, cfg.microbatches,
                          hits=hits_lb if cfg.offloaded else None)
    if method == "des":
        from nosasim.sim.des import simulate
    else:
        from nosasim.sim.analytic import simulate
    result = simulate(inputs)
    step, parts = result.median_step()
    shape = cfg.block(model, trace.block_size)
    block = shape.block_bytes
    host = float(host_kv_bytes(model, cfg.batch, ctx_max, shape)) if cfg.offloaded else 0.0
    return Prediction(
        step_time_s=step, tokens_per_s=cfg.batch / step, breakdown=parts, hit_rate=hit_rate,
        h2d_bytes_per_step=float(misses.sum(axis=(1, 2)).mean() * block),
        d2h_bytes_per_step=float(writebacks.sum(axis=(1, 2)).mean() * block),
        gpu_memory_bytes=float(sum(mem.values())), memory={k: float(v) for k, v in mem.items()},
        max_batch=max_batch(profile, model, cfg, ctx_max, trace.block_size),
        host_kv_bytes=host,
        steps=plan.steps, method=method, config=dataclasses.asdict(cfg),
        floor=floor.at(np.arange(plan.steps)), step_times=result.step_s, floor_steps=floor,
        host_memory_bytes=profile.host_memory_bytes, host_fits=host_fits(profile, cfg, host),
        outside_calibration=cost.reach_notes(max(len(g) for g in microbatch_groups(cfg.batch, cfg.microbatches)),
                                             float(ctx_max)),
    )


def host_fits(profile: Profile, cfg: ReplayConfig, host_bytes: float) -> bool | None:
    """Whether ``host_bytes`` of offloaded KV fit the profile's host memory (None when unknown or dense)."""
    if not cfg.offloaded or not profile.host_memory_bytes:
        return None
    return host_bytes <= profile.host_memory_bytes
