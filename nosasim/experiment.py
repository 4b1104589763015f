"""What one end-to-end measurement is, written once for the runtime that measures it and the validation that
scores it (``runtime.e2e`` and ``analysis.validate``).

An :class:`E2EConfig` names a configuration: its trace source (a trace file, or the arguments of a seeded
synthetic trace, regenerated identically anywhere), variant, batch, budget, policy and schedule. Both sides replay
the same selections: :func:`replay_batch` re-selects the trace for the budget and assembles the batch from its
sequences (``nosasim.batch.assemble_trace``, every slot starting cold), and :func:`fingerprint` identifies the
source trace so a measurement is never scored against another trace. Measurement files store the fields of
:meth:`E2EConfig.to_fields` in every run; :meth:`E2EConfig.from_fields` reads them, those committed before budgets
were recorded whole included (their sink and window were the method's 1 and 16; their capacity, when null, the
runtime's default, ``k - 1``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from nosasim.contract import ONLINE_POLICIES, VARIANTS, Budget, choice, count

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class E2EConfig:
    """One measured configuration. ``source``: a trace path (relative to the repository root or the current
    folder) or a dict of ``nosasim.trace.synth.synthesize`` arguments. ``budget`` is None for dense."""

    name: str
    source: str | dict
    variant: str
    batch: int
    budget: Budget | None = None
    policy: str = "prev"
    microbatches: int = 1
    gather_programs: int = 0
    model: str = "llama3-8b"
    split_attention: bool = False
    kv_dtype: str = "bf16"
    ckey_dtype: str = "bf16"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        if not isinstance(self.source, (str, dict)):
            raise ValueError(f"{self.name}: source: expected a trace path or synthesize() arguments, got "
                             f"{self.source!r}")
        choice(f"{self.name}: variant", self.variant, VARIANTS)
        choice(f"{self.name}: policy", self.policy, ONLINE_POLICIES)
        count(f"{self.name}: batch", self.batch, 1)
        count(f"{self.name}: gather_programs", self.gather_programs, 0)
        count(f"{self.name}: microbatches", self.microbatches, 1)
        choice(f"{self.name}: kv_dtype", self.kv_dtype, ("bf16", "fp8"))
        if self.kv_dtype != "bf16" and self.budget is None:
            raise ValueError(f"{self.name}: kv_dtype: fp8 is for the offloaded store; dense keeps bf16")
        choice(f"{self.name}: ckey_dtype", self.ckey_dtype, ("bf16", "fp8"))
        if self.ckey_dtype != "bf16" and self.variant not in ("infllmv2", "nosa"):
            raise ValueError(f"{self.name}: ckey_dtype: fp8 is for the compressed keys InfLLM-V2 and NOSA score")
        if not isinstance(self.split_attention, bool) or (self.split_attention and self.budget is None):
            raise ValueError(f"{self.name}: split_attention: expected a bool, True only for an offloaded variant")
        if self.microbatches > self.batch:
            raise ValueError(f"{self.name}: microbatches: expected at most batch ({self.batch}), got "
                             f"{self.microbatches}")
        if self.variant == "dense":
            if self.budget is not None:
                raise ValueError(f"{self.name}: budget: dense selects nothing, expected none")
        else:
            if not isinstance(self.budget, Budget):
                raise ValueError(f"{self.name}: budget: expected a Budget for variant {self.variant!r}")
            b = self.budget
            Budget.for_variant(self.variant, b.k, b.k_q, b.sink, b.window, b.capacity)

    def to_fields(self) -> dict:
        """The configuration as a measurement file stores it."""
        b = self.budget
        return {"name": self.name, "trace": self.source if isinstance(self.source, str) else None,
                "synth": None if isinstance(self.source, str) else dict(self.source), "model": self.model,
                "variant": self.variant, "batch": self.batch, "k": b.k if b else None, "k_q": b.k_q if b else None,
                "sink": b.sink if b else None, "window": b.window if b else None,
                "capacity": b.capacity if b else None, "policy": self.policy, "microbatches": self.microbatches,
                "gather_programs": self.gather_programs, "split_attention": self.split_attention,
                "kv_dtype": self.kv_dtype, "ckey_dtype": self.ckey_dtype}

    @classmethod
    def from_fields(cls, run: dict) -> "E2EConfig":
        """Read a measured run's configuration; ValueError naming a missing or bad field."""
        name = run.get("name") or "?"
        for f in ("model", "variant", "batch"):
            if f not in run:
                raise ValueError(f"measurement run {name!r}: missing field '{f}'")
        source = run.get("synth") or run.get("trace")
        if not source:
            raise ValueError(f"measurement run {name!r}: missing field 'trace' (or 'synth')")
        budget = None
        if run["variant"] != "dense":
            if run.get("k") is None:
                raise ValueError(f"measurement run {name!r}: missing field 'k'")
            sink = 1 if run.get("sink") is None else run["sink"]
            window = 16 if run.get("window") is None else run["window"]
            budget = Budget.for_variant(run["variant"], run["k"], run.get("k_q"), sink, window, run.get("capacity"))
        return cls(name=name, source=source, variant=run["variant"], batch=run["batch"], budget=budget,
                   policy=run.get("policy", "prev"), microbatches=run.get("microbatches", 1),
                   gather_programs=run.get("gather_programs", 0), model=run["model"],
                   split_attention=run.get("split_attention", False), kv_dtype=run.get("kv_dtype", "bf16"),
                   ckey_dtype=run.get("ckey_dtype", "bf16"))

    def replay_config(self, profile: str):
        """The simulator's configuration of this measurement on ``profile``."""
        from nosasim.models import ReplayConfig

        b = self.budget
        budget = {} if b is None else dict(k=b.k, k_q=b.k_q, sink=b.sink, window=b.window, capacity=b.capacity)
        return ReplayConfig(profile=profile, model=self.model, variant=self.variant, batch=self.batch,
                            policy=self.policy, microbatches=self.microbatches, split_attention=self.split_attention,
                            kv_dtype=self.kv_dtype, ckey_dtype=self.ckey_dtype, **budget)


def resolve_path(path: str) -> Path:
    """A trace path as given, else relative to the repository root (where committed measurements name them)."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else ROOT / p


def load_source(source: str | dict, cache: dict | None = None):
    """The trace of a source: read from its file, or regenerated from its seeded synthesis arguments."""
    import json

    key = json.dumps(source, sort_keys=True) if isinstance(source, dict) else str(resolve_path(source))
    if cache is not None and key in cache:
        return cache[key]
    if isinstance(source, dict):
        from nosasim.trace.synth import synthesize

        trace = synthesize(**source)
    else:
        from nosasim.trace import read_trace

        path = resolve_path(source)
        if not path.is_file():
            raise ValueError(f"trace: no such file {source!r}")
        trace = read_trace(path)
    if cache is not None:
        cache[key] = trace
    return trace


def fingerprint(trace) -> str:
    """SHA-256 of the source trace's selection array: which trace a measurement decoded."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(trace.sel).tobytes()).hexdigest()


def replay_batch(trace, cfg: E2EConfig):
    """The batch both sides replay: the trace re-selected for the budget (offloaded variants), assembled into
    ``cfg.batch`` slots, every slot starting cold (``nosasim.batch.assemble_trace``)."""
    from nosasim.batch import assemble_trace
    from nosasim.select import for_budget

    if cfg.budget is not None:
        trace = for_budget(trace, cfg.budget)
    return assemble_trace(trace, cfg.batch)
