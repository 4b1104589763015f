"""The one runtime configuration, validated when built. Shapes, budgets and memory are the contract's.

Model shapes are nosasim's (``nosasim.models.ModelSpec``, presets in nosasim/presets/*.json), the budget is a
``nosasim.contract.Budget`` and the device memory plan is ``nosasim.memory.plan``: the runtime runs, and
allocates, exactly what the simulator predicts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nosasim import memory
from nosasim.contract import (KV_DTYPES, ONLINE_POLICIES, TRACE_VARIANT, VARIANTS, BlockShape, Budget, choice,
                              count, n_blocks)
from nosasim.models import ModelSpec, load_model

PRESETS: dict[str, ModelSpec] = {name: load_model(name) for name in ("llama3-8b", "smollm2-135m")}
# A few-layer toy for CPU tests: every code path, small enough to run in milliseconds.
PRESETS["tiny"] = ModelSpec("tiny", 2, 4, 2, 16, 64, 128, 97)
DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Everything one decode run needs besides the weights.

    ``context`` is the prompt length: at the first decode step the cache holds ``context + 1`` tokens (the new one
    included), as in the trace format. ``budget`` holds ``k``, ``k_q``, sink, window and ``C`` (the GPU slots for
    complete blocks per (layer, KV head, sequence); the tail has its own slot); ``None`` is the variant's default
    (``k = 64``, NOSA's released split, ``C = k - 1``). ``microbatches`` splits the batch into contiguous, nearly
    equal groups of sequences whose transfers overlap the other groups' compute
    (``nosasim.contract.microbatch_groups``); ``gather_programs`` > 0 runs the copies as that many persistent
    programs (``runtime.gather``), which leaves the SMs to the overlapping compute. ``split_attention`` attends the
    resident blocks while the misses copy (on a copy stream), then the copied ones, and merges the two softmax
    results by their log-sum-exp, so even one micro-batch overlaps its transfers. ``selection`` picks the selection
    kernels: ``three`` launches (scores, pooling, top-k) or the ``fused`` one (``benchmarks/bench_select.py`` on an
    H200: the fused launch is 2.5x slower at 64K-128K contexts and ~10% at 8K, so three is the default).
    ``kv_dtype="fp8"`` keeps the
    host store and the block pool in float8 (e4m3): half the bytes per block over the link and out of HBM,
    dequantised by the attention kernel. ``ckey_dtype="fp8"`` keeps InfLLM-V2's compressed keys in e4m3 too (the
    running sums stay fp32): half the bytes scoring reads, converted exactly to ``dtype`` for its dots (the
    three-launch selection only). ``host_seqs`` < ``batch`` lets
    sequences share host rows (benchmarks only: the bytes moved are the same, the host store's contents are not
    meaningful).
    """

    shape: ModelSpec
    variant: str = "nosa"
    batch: int = 1
    context: int = 4096
    steps: int = 128
    budget: Budget | None = None
    policy: str = "prev"
    block_size: int = 64
    dtype: str = "bfloat16"
    host_seqs: int | None = None
    microbatches: int = 1
    gather_programs: int = 0
    gather_block: int = 32
    split_attention: bool = False
    kv_dtype: str | None = None
    selection: str = "three"
    ckey_dtype: str | None = None

    def __post_init__(self):
        choice("RuntimeConfig.variant", self.variant, VARIANTS + (TRACE_VARIANT,))
        choice("RuntimeConfig.policy", self.policy, ONLINE_POLICIES)
        choice("RuntimeConfig.dtype", self.dtype, DTYPES)
        for f in ("batch", "context", "steps", "block_size"):
            count(f"RuntimeConfig.{f}", getattr(self, f), 1)
        if self.variant == "dense":
            if self.budget is not None:
                raise ValueError("RuntimeConfig.budget: dense attention selects nothing, expected None")
        elif self.budget is None:
            object.__setattr__(self, "budget", Budget.for_variant(self.variant, 64))
        elif not isinstance(self.budget, Budget):
            raise ValueError(f"RuntimeConfig.budget: expected a nosasim.contract.Budget, got {self.budget!r}")
        else:
            b = self.budget
            Budget.for_variant(self.variant, b.k, b.k_q, b.sink, b.window, b.capacity)  # the variant's own rules
        if self.policy == "static" and self.variant not in ("nosa", TRACE_VARIANT):
            raise ValueError(f"RuntimeConfig.policy 'static' ranks blocks by NOSA's eviction score: it needs variant "
                             f"nosa (or trace, with the trace's scores), got {self.variant!r}")
        count("RuntimeConfig.gather_programs", self.gather_programs, 0)
        count("RuntimeConfig.gather_block", self.gather_block, 0)
        if self.gather_block & (self.gather_block - 1):
            raise ValueError(f"RuntimeConfig.gather_block must be 0 (a program per entry) or a power of two, got "
                             f"{self.gather_block}")
        count("RuntimeConfig.microbatches", self.microbatches, 1)
        if self.microbatches > self.batch:
            raise ValueError(f"RuntimeConfig.microbatches must lie in [1, batch={self.batch}], got {self.microbatches}")
        choice("RuntimeConfig.selection", self.selection, ("three", "fused"))
        if self.kv_dtype is not None:
            choice("RuntimeConfig.kv_dtype", self.kv_dtype, ("fp8",))
            if not self.offloaded:
                raise ValueError("RuntimeConfig.kv_dtype: 'fp8' is for the offloaded store and block pool; dense keeps "
                                 "its KV in the run's dtype")
        if self.ckey_dtype is not None:
            choice("RuntimeConfig.ckey_dtype", self.ckey_dtype, ("fp8",))
            if self.variant not in ("infllmv2", "nosa"):
                raise ValueError(f"RuntimeConfig.ckey_dtype: 'fp8' is for the compressed keys InfLLM-V2 and NOSA "
                                 f"score; {self.variant!r} keeps none")
            if self.selection != "three":
                raise ValueError("RuntimeConfig.ckey_dtype: fp8 compressed keys are scored by the three-launch "
                                 f"selection only, got selection={self.selection!r}")
        if not isinstance(self.split_attention, bool) or (self.split_attention and not self.offloaded):
            raise ValueError(f"RuntimeConfig.split_attention: expected a bool, and True only for an offloaded variant, "
                             f"got {self.split_attention!r} with {self.variant!r}")
        if self.host_seqs is not None and not 1 <= self.host_seqs <= self.batch:
            raise ValueError(f"RuntimeConfig.host_seqs must lie in [1, batch], got {self.host_seqs}")

    @property
    def offloaded(self) -> bool:
        return self.variant != "dense"

    @property
    def slots(self) -> int:
        """Regular slots per row: the budget's ``C``."""
        return self.budget.capacity

    @property
    def max_tokens(self) -> int:
        return self.context + self.steps

    @property
    def n_blocks(self) -> int:
        """Blocks per row that ever exist, the tail of the last step included."""
        return n_blocks(self.max_tokens, self.block_size)

    @property
    def n_host_seqs(self) -> int:
        return self.batch if self.host_seqs is None else self.host_seqs

    @property
    def dtype_bytes(self) -> int:
        return DTYPES[self.dtype]

    @property
    def block(self) -> BlockShape:
        """One block of K plus V of one (layer, KV head, sequence): one transfer chunk."""
        dt = self.dtype_bytes if self.kv_dtype is None else KV_DTYPES[self.kv_dtype]
        return BlockShape(self.shape.head_dim, dt, self.block_size)

    @property
    def kv_torch_dtype(self):
        """The element type of the host store and the block pool."""
        import torch

        return torch.float8_e4m3fn if self.kv_dtype == "fp8" else getattr(torch, self.dtype)

    @property
    def ckey_torch_dtype(self):
        """The element type of the compressed keys."""
        import torch

        return torch.float8_e4m3fn if self.ckey_dtype == "fp8" else getattr(torch, self.dtype)

    @property
    def ckey_bytes(self) -> int:
        return self.dtype_bytes if self.ckey_dtype is None else KV_DTYPES[self.ckey_dtype]

    def gpu_bytes(self) -> dict[str, int]:
        """Planned device memory by part (``nosasim.memory.plan``, the simulator's own), plus the run's per-step
        loaded-block counters (measurement only), checked before anything is allocated."""
        out = memory.plan(self.model_for_memory, self.variant, self.budget, self.policy, self.batch,
                          self.max_tokens, self.block, self.ckey_bytes)
        if self.offloaded:
            out["step_counters"] = self.steps * self.shape.layers * self.shape.kv_heads * self.batch * 4
        return out

    @property
    def model_for_memory(self) -> ModelSpec:
        """The shape with this run's element type (weights, compressed keys), as the memory plan sizes it."""
        return replace(self.shape, dtype_bytes=self.dtype_bytes)

    def host_bytes(self) -> int:
        if not self.offloaded:
            return 0
        return memory.host_kv_bytes(self.shape, self.n_host_seqs, self.max_tokens, self.block)

    def with_(self, **changes) -> "RuntimeConfig":
        return replace(self, **changes)
