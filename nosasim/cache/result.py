"""The result of replaying a trace through the block cache: counters per step, layer, KV head and sequence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COUNTERS = ("hits", "misses", "writebacks", "evictions")


@dataclass
class CacheResult:
    """Hits, misses, write-backs and evictions, each int32 [steps, layers, kv_heads, seqs].

    A *miss* moves one block of K and V host -> device; a *write-back* moves one completed tail block
    device -> host. ``block_bytes`` (from the trace's model shape, or None) is the size of one such block.
    With ``record=True`` at simulation, ``resident`` and ``evicted`` are bool [steps, layers, heads, seqs,
    n_blocks]: the resident complete blocks after each step, and those evicted at it.
    """

    policy: str
    capacity: int
    block_size: int
    hits: np.ndarray
    misses: np.ndarray
    writebacks: np.ndarray
    evictions: np.ndarray
    block_bytes: int | None = None
    resident: np.ndarray | None = None
    evicted: np.ndarray | None = None

    def __post_init__(self):
        shape = self.hits.shape
        for name in COUNTERS:
            arr = getattr(self, name)
            if arr.ndim != 4 or arr.shape != shape:
                raise RuntimeError(f"CacheResult.{name} has shape {arr.shape}, expected {shape}: this is a bug")

    steps = property(lambda self: self.hits.shape[0])
    layers = property(lambda self: self.hits.shape[1])
    heads = property(lambda self: self.hits.shape[2])
    seqs = property(lambda self: self.hits.shape[3])
    total_hits = property(lambda self: int(self.hits.sum(dtype=np.int64)))
    total_misses = property(lambda self: int(self.misses.sum(dtype=np.int64)))
    total_writebacks = property(lambda self: int(self.writebacks.sum(dtype=np.int64)))
    total_evictions = property(lambda self: int(self.evictions.sum(dtype=np.int64)))

    @property
    def accesses(self) -> int:
        """Complete-block accesses (hits + misses): every selected block of every step and row."""
        return self.total_hits + self.total_misses

    @property
    def hit_rate(self) -> float:
        """Hits / accesses; NaN when the trace selects no complete block at all (nothing to rate)."""
        return self.total_hits / self.accesses if self.accesses else float("nan")

    def per_step_layer(self, counter: str) -> np.ndarray:
        """One counter summed over KV heads and sequences: int64 [steps, layers]."""
        if counter not in COUNTERS:
            raise ValueError(f"counter must be one of {COUNTERS}, got {counter!r}")
        return getattr(self, counter).sum(axis=(2, 3), dtype=np.int64)

    def per_layer(self) -> dict[str, list]:
        """Totals per layer: lists of length ``layers`` for each counter, plus ``hit_rate`` (None: no access)."""
        out = {name: self.per_step_layer(name).sum(axis=0).tolist() for name in COUNTERS}
        out["hit_rate"] = [h / (h + m) if h + m else None for h, m in zip(out["hits"], out["misses"])]
        return out

    def _bytes(self, counter: str, block_bytes: int | None) -> np.ndarray:
        size = self.block_bytes if block_bytes is None else block_bytes
        if size is None or isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"block_bytes must be a positive integer (2 * block_size * head_dim * dtype_bytes), "
                             f"got {size!r}")
        return getattr(self, counter).sum(axis=(1, 2, 3), dtype=np.int64) * np.int64(size)

    def h2d_bytes(self, block_bytes: int | None = None) -> np.ndarray:
        """Host -> device bytes per step (misses x block bytes), int64 [steps]."""
        return self._bytes("misses", block_bytes)

    def d2h_bytes(self, block_bytes: int | None = None) -> np.ndarray:
        """Device -> host bytes per step (write-backs x block bytes), int64 [steps]."""
        return self._bytes("writebacks", block_bytes)

    def to_json(self) -> dict:
        """A JSON-ready summary: integer totals, hit rate (None if no access), per-layer lists, bytes moved."""
        rate = self.hit_rate
        out = {
            "policy": self.policy,
            "capacity": self.capacity,
            "block_size": self.block_size,
            "steps": self.steps, "layers": self.layers, "kv_heads": self.heads, "seqs": self.seqs,
            "accesses": self.accesses,
            "hits": self.total_hits,
            "misses": self.total_misses,
            "writebacks": self.total_writebacks,
            "evictions": self.total_evictions,
            "hit_rate": None if rate != rate else rate,
            "per_layer": self.per_layer(),
            "block_bytes": self.block_bytes,
        }
        if self.block_bytes is not None:
            out["h2d_bytes"] = int(self.h2d_bytes().sum())
            out["d2h_bytes"] = int(self.d2h_bytes().sum())
        return out
