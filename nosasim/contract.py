"""The contract between the simulator and the GPU runtime, written once and imported by both.

Everything both halves must agree on for the runtime's measurements to be comparable with the simulator's
predictions lives here, in plain Python (no numpy, no torch, so the runtime and the recorder import it freely):

- the names: attention variants and cache policies;
- :class:`Budget`: the selection budgets (``k``, ``k_q``, sink, window) and the cache capacity ``C``, with the one
  validation of their fields and the one capacity rule;
- :class:`BlockShape`: what one KV block is in bytes, and how it is cut into transfer chunks;
- the sizes every allocation and cost derives from (blocks of a context, compressed keys);
- the schedule: how a batch is split into micro-batches and the order in which one decode step issues its work.

The rules themselves are documented in ``docs/contract.md`` (budgets, capacity, schedule) and
``docs/cache-semantics.md`` (what the cache does with a selection).
"""

from __future__ import annotations

from dataclasses import dataclass

VARIANTS = ("dense", "infllmv2", "nosa")
"""Attention variants the simulator predicts and the runtime runs."""
TRACE_VARIANT = "trace"
"""Runtime only: decode a trace's selections without computing any (no scoring state on the GPU)."""
POLICIES = ("prev", "lru", "lfu", "static", "belady")
"""Cache keep policies (``docs/cache-semantics.md``)."""
ONLINE_POLICIES = ("prev", "lru", "lfu", "static")
"""The policies a runtime can run: ``belady`` reads the future, so it is an offline bound only."""
POLICY_CODES = {name: i for i, name in enumerate(POLICIES)}
"""Integer codes of the policies inside kernels (the numba engine's and the runtime's table kernel)."""

BLOCK_SIZE = 64
"""Tokens per KV block (the method's; a trace records its own)."""
CMP_WINDOW, CMP_STRIDE = 32, 16
"""InfLLM-V2's compressed keys: the mean of 32 consecutive keys, one every 16 tokens."""
TAIL_SLOTS = 2
"""GPU slots per (layer, KV head, sequence) for the partial tail block, besides the cache's ``C``: two, used by
the parity of the tail block, so a block that just completed can be copied out while the next one fills."""
KV_DTYPES = {"bf16": 2, "fp8": 1}
"""Element types of the KV store and block pool, with their bytes: ``fp8`` (e4m3) halves every block moved."""
RULE_METHODS = ("random", "infllmv2", "nosa", "recorded", "reselect")
"""Trace selection methods whose selections come from a budget rule, so they hold at most ``k - 1`` complete
blocks (``k`` counts the tail); an imported trace may hold ``k``."""


def count(name: str, value, minimum: int = 0) -> int:
    """The one check of an integer field: an ``int`` (not a bool) of at least ``minimum``; ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return value


def is_real(value) -> bool:
    """Whether ``value`` is a finite JSON number: an int or a float, not a bool (JSON's true is no number), not NaN
    or infinite. The one test of a numeric field read from a file (profiles, measurements)."""
    import math

    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def choice(name: str, value, options) -> str:
    """The one check of a name field: one of ``options``; ValueError naming the field and the choices."""
    if value not in options:
        raise ValueError(f"{name}: expected one of {tuple(options)}, got {value!r}")
    return value


def min_capacity(k: int) -> int:
    """The smallest cache capacity a budget ``k`` allows: every selection of the budget rule holds at most ``k - 1``
    complete blocks (``k`` counts the partial tail, which has its own slot), and a row keeps at least one slot."""
    return max(k - 1, 1)


def default_capacity(k: int, method: str = "nosa") -> int:
    """``C`` when none is given: the largest selection a trace made by ``method`` can hold, so every step fits.
    Budget-rule selections hold at most ``k - 1`` complete blocks; an imported trace (any other method) may hold
    ``k``, the width of the format's selection arrays. The cache engine still checks ``C >= max |S_t|`` on the
    actual selections."""
    return min_capacity(k) if method in RULE_METHODS else k


@dataclass(frozen=True, slots=True)
class Budget:
    """Selection budgets and cache capacity of one configuration, validated once when built.

    ``k`` counts every selected block including the partial tail block, as the method does; ``k_q`` the query-aware
    ones (sink, window with the tail, then top blocks by the query-aware score), ``None`` meaning all ``k``
    (InfLLM-V2); the remaining ``k - k_q`` are filled by the query-agnostic score (NOSA). ``sink`` and ``window``
    are the always-selected leading and trailing blocks (the window holds the tail; 0 and 0 describe selections
    that force nothing, as imported ones). ``capacity`` is ``C``, the GPU slots for complete blocks per (layer, KV
    head, sequence), at least :func:`min_capacity`; ``None`` takes :func:`default_capacity`. After construction
    ``k_q`` and ``capacity`` are always integers.
    """

    k: int
    k_q: int | None = None
    sink: int = 1
    window: int = 16
    capacity: int | None = None

    def __post_init__(self):
        count("k", self.k, 1)
        count("sink", self.sink, 0)
        count("window", self.window, 0)
        forced = self.sink + self.window
        if forced > self.k:
            raise ValueError(f"k ({self.k}) must be >= sink + window ({self.sink} + {self.window}): those blocks are "
                             f"always selected (impossible budget)")
        k_q = self.k if self.k_q is None else count("k_q", self.k_q, 0)
        if not forced <= k_q <= self.k:
            raise ValueError(f"k_q ({k_q}) must lie between sink + window ({forced}) and k ({self.k}) "
                             f"(impossible budget)")
        cap = default_capacity(self.k) if self.capacity is None else count("capacity", self.capacity, 0)
        if cap < min_capacity(self.k):
            raise ValueError(f"capacity ({cap}) must be >= {min_capacity(self.k)}: a selection of k = {self.k} "
                             f"blocks holds up to k - 1 complete ones (impossible budget)")
        object.__setattr__(self, "k_q", k_q)
        object.__setattr__(self, "capacity", cap)

    @classmethod
    def for_variant(cls, variant: str, k: int, k_q: int | None = None, sink: int = 1, window: int = 16,
                    capacity: int | None = None) -> "Budget":
        """A variant's budget with its defaults: InfLLM-V2 selects only query-aware blocks (``k_q = k``); NOSA's
        default split is the released one, sink + window + 16 query-aware blocks (``k_q = 33`` at 1 + 16)."""
        choice("variant", variant, VARIANTS + (TRACE_VARIANT,))
        if variant == "infllmv2" and k_q is not None and k_q != k:
            raise ValueError(f"k_q: infllmv2 selects only query-aware blocks, so k_q must equal k ({k}), got {k_q}")
        if variant == "nosa" and k_q is None:
            k_q = min(count("k", k, 1), count("sink", sink, 0) + count("window", window, 0) + 16)
        return cls(k, k_q, sink, window, capacity)

    @property
    def k_e(self) -> int:
        """Blocks filled by the query-agnostic score (0 for InfLLM-V2)."""
        return self.k - self.k_q

    @property
    def agnostic(self) -> bool:
        """Whether some blocks are chosen by the query-agnostic score (NOSA's split)."""
        return self.k_q < self.k

    def same_selection(self, other: "Budget") -> bool:
        """Whether the two budgets select the same blocks from the same scores (capacity aside)."""
        return (self.k, self.k_q, self.sink, self.window) == (other.k, other.k_q, other.sink, other.window)

    def with_capacity(self, capacity: int | None) -> "Budget":
        return Budget(self.k, self.k_q, self.sink, self.window, capacity)


@dataclass(frozen=True, slots=True)
class BlockShape:
    """One KV block of one (layer, KV head, sequence): the unit the cache holds and the host link moves.

    ``dtype_bytes`` is the KV store's element size (2 for bf16, 1 for fp8), which may differ from the weights'.
    ``layout`` says how the host store keeps a block: ``joint``, K then V in one contiguous chunk (the runtime's
    store, one transfer per block), or ``split``, K and V apart (two chunks per block)."""

    head_dim: int
    dtype_bytes: int = 2
    block_size: int = BLOCK_SIZE
    layout: str = "joint"

    def __post_init__(self):
        count("head_dim", self.head_dim, 1)
        count("dtype_bytes", self.dtype_bytes, 1)
        count("block_size", self.block_size, 1)
        choice("kv_layout", self.layout, ("joint", "split"))

    @property
    def block_bytes(self) -> int:
        """K plus V of one block of one KV head."""
        return 2 * self.block_size * self.head_dim * self.dtype_bytes

    @property
    def chunks_per_block(self) -> int:
        return 1 if self.layout == "joint" else 2

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one transfer chunk."""
        return self.block_bytes // self.chunks_per_block


def n_blocks(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks that hold ``tokens`` tokens, the partial tail included."""
    return (tokens - 1) // block_size + 1


def compressed_slots(tokens: int) -> int:
    """Compressed-key slots the runtime allocates for up to ``tokens`` tokens (one per stride, plus a scratch slot
    that masked writes land in)."""
    return tokens // CMP_STRIDE + 1


def microbatch_groups(batch: int, microbatches: int) -> list[range]:
    """Contiguous, nearly equal micro-batches of sequence indices (sizes differ by at most one)."""
    count("batch", batch, 1)
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or not 1 <= microbatches <= batch:
        raise ValueError(f"microbatches: expected 1..{batch}, got {microbatches!r}")
    size, extra = divmod(batch, microbatches)
    out, start = [], 0
    for j in range(microbatches):
        n = size + (j < extra)
        out.append(range(start, start + n))
        start += n
    return out


def program(layers: int, microbatches: int) -> list[tuple[str, int, int]]:
    """Issue order of one decode step on the compute stream: ``("pre" | "post", layer, micro-batch)``.

    "pre" is a layer's work up to issuing its transfers (norm, QKV, selection, table update), "post" the rest
    (attention onward). With ``m`` micro-batches the program staggers them, ``pre(0, 0..m-1)`` then
    ``post(l-1, j), pre(l, j)`` for each ``j``, so micro-batch ``j``'s transfers overlap the other micro-batches'
    compute; with one it is the plain layer-by-layer step."""
    order = [("pre", 0, j) for j in range(microbatches)]
    for layer in range(1, layers):
        for j in range(microbatches):
            order += [("post", layer - 1, j), ("pre", layer, j)]
    order += [("post", layers - 1, j) for j in range(microbatches)]
    return order
