"""Keep-priority rules of the block-cache policies: the one definition the simulator and the GPU runtime share.

After the selected blocks ``S_t`` of a step are made resident, the cache may hold more than ``C`` complete
blocks. The surplus is evicted from the *other* candidates (resident blocks not selected at step ``t``, plus the
just-completed tail block). Every policy orders those candidates by a **keep key** ``(primary, secondary, id)``
compared lexicographically: the smallest key is evicted first, the largest kept. ``id`` as the last component is
what makes "ties: the lower block id is evicted first" hold for every policy, and it makes the order total, so
the simulator and the runtime can be compared block for block.

The statistics the keys read, all per row (layer, KV head, sequence) and per block:

- ``last_used``: the last decode step at which the block was attended, as a selected block or as the tail
  (a block that completes at step ``t`` was the tail at ``t - 1``, so its value is ``t - 1``);
- ``times_selected``: how many steps selected it (being the tail does not count);
- ``next_use``: the next step, after the current one, that selects it (``inf`` if none; known offline only);
- ``static_score``: the trace's query-agnostic per-block score (NOSA's eviction score; NaN reads as ``-inf``).

The numba engine calls :func:`keep_key_nb`; :func:`keep_key` and :func:`eviction_order` are the same rule in
plain numpy, for tests and for the runtime's step-by-step comparison.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from nosasim import contract

# Integer codes used inside the numba engine (the contract's, shared with the runtime's table kernel).
PREV, LRU, LFU, STATIC, BELADY = (contract.POLICY_CODES[p] for p in ("prev", "lru", "lfu", "static", "belady"))

_DESCRIPTIONS = {
    "prev": (
        "keep exactly the blocks step t attended, evict everything else (NOSI's rule, the authors' inference "
        "system); C does not change the result, though it must still hold the largest selection"
    ),
    "lru": "keep the blocks attended most recently (selected, or the tail); evict the least recently used",
    "lfu": "keep the blocks selected most often; ties by recency (lru's key), then by id",
    "static": (
        "keep the blocks with the highest query-agnostic score (NOSA's learned eviction score); "
        "needs the trace's agnostic_score array"
    ),
    "belady": (
        "keep the blocks selected again soonest; a block never selected again is evicted first "
        "(the offline optimum: it reads the future, so it needs the whole trace)"
    ),
}
POLICIES: dict[str, str] = {name: _DESCRIPTIONS[name] for name in contract.POLICIES}
"""Policy name (``nosasim.contract.POLICIES``) -> one-line description (the CLI's help text uses these)."""

POLICY_CODES = contract.POLICY_CODES

# Step value meaning "never selected again" inside the engine (int32 max: no trace has that many steps).
NEVER = np.int64(2**31 - 1)


def policy_code(policy: str) -> int:
    """Map a policy name to the engine's integer code; ValueError names the choices."""
    try:
        return POLICY_CODES[policy]
    except (KeyError, TypeError):
        raise ValueError(f"policy must be one of {sorted(POLICY_CODES)}, got {policy!r}") from None


@njit(cache=True, inline="always")
def keep_key_nb(policy, last_used, times_selected, next_use, static_score):
    """Return ``(primary, secondary)`` of one block's keep key (the id, compared last, is the caller's).

    Larger is kept. ``prev`` never ranks (it evicts every unselected candidate), so it gets a constant.
    """
    if policy == LRU:
        return float(last_used), 0.0
    if policy == LFU:
        return float(times_selected), float(last_used)
    if policy == STATIC:
        # A block without a score (NaN) has nothing recommending it: evict it first.
        if static_score != static_score:
            return -np.inf, 0.0
        return float(static_score), 0.0
    if policy == BELADY:
        # Sooner next use = larger key. NEVER maps to -inf so "never again" sorts below any real step.
        if next_use >= NEVER:
            return -np.inf, 0.0
        return -float(next_use), 0.0
    return 0.0, 0.0


def _need(policy: str, arr, name: str) -> np.ndarray:
    if arr is None:
        raise ValueError(f"keep_key: policy {policy!r} needs '{name}', got None")
    return np.asarray(arr, dtype=np.float64)


def prev_key(last_used=None, times_selected=None, next_use=None, static_score=None):
    """prev (NOSI): no ranking at all; every unselected candidate is evicted, so all keys are equal."""
    given = [a for a in (last_used, times_selected, next_use, static_score) if a is not None]
    if not given:
        raise ValueError("keep_key: pass at least one statistic so the number of candidates is known")
    zeros = np.zeros(len(given[0]))
    return zeros, zeros.copy()


def lru_key(last_used=None, **_):
    """lru: the more recently a block was attended (selected, or as the tail), the longer it stays."""
    last = _need("lru", last_used, "last_used")
    return last, np.zeros_like(last)


def lfu_key(times_selected=None, last_used=None, **_):
    """lfu: blocks selected more often stay; equal counts fall back to recency (lru's key)."""
    return _need("lfu", times_selected, "times_selected"), _need("lfu", last_used, "last_used")


def static_key(static_score=None, **_):
    """static: NOSA's query-agnostic eviction score ranks blocks once and for all; no score (NaN) goes first."""
    score = _need("static", static_score, "static_score")
    return np.where(np.isnan(score), -np.inf, score), np.zeros_like(score)


def belady_key(next_use=None, **_):
    """belady: the block needed again soonest stays; one never selected again (inf) goes first."""
    nxt = _need("belady", next_use, "next_use")
    return np.where(nxt >= float(NEVER), -np.inf, -nxt), np.zeros_like(nxt)


_KEYS = {"prev": prev_key, "lru": lru_key, "lfu": lfu_key, "static": static_key, "belady": belady_key}


def keep_key(
    policy: str,
    last_used=None,
    times_selected=None,
    next_use=None,
    static_score=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised reference of :func:`keep_key_nb`: ``(primary, secondary)`` float64 arrays, larger kept.

    Pass the statistics of the candidate blocks (aligned 1-D arrays); only those the policy reads are needed.
    ``next_use`` may hold ``np.inf`` for "never selected again".
    """
    policy_code(policy)
    return _KEYS[policy](last_used=last_used, times_selected=times_selected, next_use=next_use,
                         static_score=static_score)


def eviction_order(policy: str, block_ids, **stats) -> np.ndarray:
    """Candidate ids sorted so that the first is evicted first (smallest keep key, then lowest id).

    ``stats`` are the keyword arguments of :func:`keep_key`, aligned with ``block_ids``. For ``prev`` the order
    does not matter (all unselected candidates go); ids are returned ascending.
    """
    ids = np.asarray(block_ids, dtype=np.int64)
    if len(ids) == 0:
        return ids
    primary, secondary = keep_key(policy, **stats)
    return ids[np.lexsort((ids, secondary, primary))]
