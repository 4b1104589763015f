"""Block-cache policy engine: what a GPU cache of complete KV blocks does with a selection trace.

``simulate_cache(source, policy, capacity)`` replays a trace (in memory, a reader, or a path) and returns a
:class:`CacheResult` with hits, misses, write-backs and evictions per step, layer, KV head and sequence.
``simulate_arrays`` does the same for plain arrays. The rules are in docs/cache-semantics.md; the policies'
keep priorities, shared with the GPU runtime, in :mod:`nosasim.cache.policies`.
"""

from .engine import CacheEngine, CapacityError, StepCounters, simulate_arrays
from .policies import POLICIES, eviction_order, keep_key
from .result import CacheResult
from .simulate import simulate_cache

__all__ = [
    "POLICIES", "CacheEngine", "CacheResult", "CapacityError", "StepCounters", "eviction_order", "keep_key",
    "simulate_arrays", "simulate_cache",
]
