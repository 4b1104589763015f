"""Model shapes and the one runtime configuration, validated when built."""

from __future__ import annotations

from dataclasses import dataclass, replace

from nosasim.models import ModelSpec, load_model

VARIANTS = ("dense", "infllmv2", "nosa", "trace")
POLICIES = ("prev", "lru", "lfu", "static")


# Model shapes are nosasim's (nosasim/presets/*.json): the runtime runs exactly the shapes the simulator predicts.
ModelShape = ModelSpec
PRESETS: dict[str, ModelShape] = {name: load_model(name) for name in ("llama3-8b", "smollm2-135m")}
# A few-layer toy for CPU tests: every code path, small enough to run in milliseconds.
PRESETS["tiny"] = ModelShape("tiny", 2, 4, 2, 16, 64, 128, 97)


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Everything one decode run needs besides the weights.

    ``context`` is the prompt length: at the first decode step the cache holds ``context + 1`` tokens (the new one
    included), as in the trace format. ``capacity`` is ``C``, the GPU slots for complete blocks per (layer, KV head,
    sequence); the tail has its own slot. ``microbatches`` splits the batch into contiguous, nearly equal groups of
    sequences whose transfers overlap the other groups' compute (``nosasim.batch.microbatch_groups``);
    ``gather_programs`` > 0 runs the copies as that many persistent programs (``runtime.gather``), which leaves the
    SMs to the overlapping compute. ``host_seqs`` < ``batch`` lets sequences share host rows (benchmarks only:
    the bytes moved are the same, the host store's contents are not meaningful).
    """

    shape: ModelShape
    variant: str = "nosa"
    batch: int = 1
    context: int = 4096
    steps: int = 128
    k: int = 64
    k_q: int | None = None
    capacity: int | None = None
    policy: str = "prev"
    block_size: int = 64
    sink: int = 1
    window: int = 16
    dtype: str = "bfloat16"
    host_seqs: int | None = None
    compress_size: int = 32
    compress_stride: int = 16
    microbatches: int = 1
    gather_programs: int = 0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"RuntimeConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"RuntimeConfig.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"RuntimeConfig.dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        for f in ("batch", "context", "steps", "k", "block_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"RuntimeConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.k < self.sink + self.window:
            raise ValueError(f"RuntimeConfig.k ({self.k}) must be >= sink + window ({self.sink + self.window})")
        if self.k_q is not None and not self.sink + self.window <= self.k_q <= self.k:
            raise ValueError(f"RuntimeConfig.k_q must lie in [sink + window, k] = [{self.sink + self.window}, "
                             f"{self.k}], got {self.k_q}")
        if self.variant == "nosa" and (self.k_q is None or self.k_q >= self.k):
            raise ValueError(f"RuntimeConfig.k_q must be < k for variant nosa, got k_q={self.k_q}, k={self.k}")
        if self.policy == "static" and self.variant not in ("nosa", "trace"):
            raise ValueError(f"RuntimeConfig.policy 'static' ranks blocks by NOSA's eviction score: it needs variant "
                             f"nosa (or trace, with the trace's scores), got {self.variant!r}")
        if self.capacity is not None and self.capacity < self.k - 1:
            raise ValueError(f"RuntimeConfig.capacity ({self.capacity}) must be >= k - 1 ({self.k - 1}): every "
                             f"selected complete block needs a slot")
        if self.gather_programs < 0:
            raise ValueError(f"RuntimeConfig.gather_programs must be >= 0 (0: a program per entry), got "
                             f"{self.gather_programs}")
        if not 1 <= self.microbatches <= self.batch:
            raise ValueError(f"RuntimeConfig.microbatches must lie in [1, batch={self.batch}], got {self.microbatches}")
        if self.host_seqs is not None and not 1 <= self.host_seqs <= self.batch:
            raise ValueError(f"RuntimeConfig.host_seqs must lie in [1, batch], got {self.host_seqs}")
        if self.block_size % self.compress_stride or self.compress_size != 2 * self.compress_stride:
            raise ValueError("RuntimeConfig: compressed keys need size == 2 * stride and stride dividing block_size")

    # Derived sizes: one place, so memory checks and allocations agree.
    @property
    def offloaded(self) -> bool:
        return self.variant != "dense"

    @property
    def slots(self) -> int:
        """Regular slots per row: ``C`` (default ``k - 1``, NOSI's fixed cache of the selected blocks)."""
        return self.k - 1 if self.capacity is None else self.capacity

    @property
    def max_tokens(self) -> int:
        return self.context + self.steps

    @property
    def n_blocks(self) -> int:
        """Blocks per row that ever exist, the tail of the last step included."""
        return (self.max_tokens - 1) // self.block_size + 1

    @property
    def n_host_seqs(self) -> int:
        return self.batch if self.host_seqs is None else self.host_seqs

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def block_bytes(self) -> int:
        """One block of K plus V of one (layer, KV head, sequence): one transfer chunk."""
        return 2 * self.block_size * self.shape.head_dim * self.dtype_bytes

    def gpu_bytes(self) -> dict[str, int]:
        """Planned device memory by part (weights, block pool, metadata), checked before anything is allocated."""
        s, bs = self.shape, self.block_size
        rows = s.layers * s.kv_heads * self.batch
        out = {"weights": s.weight_bytes(self.dtype_bytes)}
        if self.offloaded:
            out["block_pool"] = rows * (self.slots + 1) * self.block_bytes()
            out["block_table"] = rows * (self.slots * 4 + self.n_blocks * 8 * 2)
            nc = self.max_tokens // self.compress_stride
            out["compressed_keys"] = rows * nc * s.head_dim * self.dtype_bytes if self.variant != "trace" else 0
            out["token_bias"] = rows * self.n_blocks * bs * 4 if self.variant == "nosa" else 0
        else:
            out["kv_cache"] = rows * self.n_blocks * self.block_bytes()
        # Activations and scratch: logits plus a few hidden-sized buffers per sequence, and selection scores.
        out["scratch"] = self.batch * (s.vocab * 4 + 8 * max(s.hidden, s.intermediate) * 4)
        if self.offloaded and self.variant != "trace":
            out["scratch"] += 4 * self.batch * s.q_heads * (self.max_tokens // self.compress_stride) * 4
        return out

    def host_bytes(self) -> int:
        if not self.offloaded:
            return 0
        s = self.shape
        return s.layers * self.n_host_seqs * s.kv_heads * self.n_blocks * self.block_bytes()

    def with_(self, **changes) -> "RuntimeConfig":
        return replace(self, **changes)
