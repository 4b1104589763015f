"""GPU memory model: what one configuration keeps on the GPU, and the largest batch that fits.

Dense attention keeps every token's K and V on the GPU, so its footprint grows with context and batch. Offloaded
variants keep per (layer, KV head, sequence) only ``C`` cache slots plus the tail block; what still grows with
context is the selection index (InfLLM-V2's compressed keys, one per 16 tokens, K only, plus per-block maps and
NOSA's static scores): about 1/32 of dense KV per token at any head_dim. Everything is linear in the batch, so the
largest batch is solved in closed form.
"""

from __future__ import annotations

import math

from nosasim.cost import CMP_STRIDE, CMP_WINDOW
from nosasim.hardware import Profile
from nosasim.models import ModelSpec, ReplayConfig


def footprint(model: ModelSpec, cfg: ReplayConfig, batch: int, context: int, block_size: int = 64) -> dict[str, float]:
    """Bytes by component for ``batch`` sequences of at most ``context`` tokens."""
    if context < 1:
        raise ValueError(f"context: expected at least one token, got {context}")
    dt = model.dtype_bytes
    rows = model.layers * model.kv_heads * batch
    n_blocks = (context - 1) // block_size + 1
    block = model.block_bytes(block_size)
    out = {"weights": float(model.params * dt)}
    if cfg.offloaded:
        n_cmp = max((context - CMP_WINDOW) // CMP_STRIDE + 1, 1)
        slots = cfg.capacity + 1  # C complete blocks plus the tail, which never leaves the GPU
        out["kv_cache"] = float(rows * slots * block)
        # Compressed keys (K only), block id -> slot map, slot -> block id map, NOSA's per-block static score.
        static = n_blocks * 4 if cfg.variant == "nosa" else 0
        out["selection_index"] = float(rows * (n_cmp * model.head_dim * dt + n_blocks * 4 + slots * 4 + static))
        # Per-layer scratch reused by every layer: fp32 scores per query head, pooled block scores, selected ids.
        out["selection_buffers"] = float(batch * (model.q_heads * n_cmp * 4 + model.kv_heads * n_blocks * 8
                                                  + model.kv_heads * cfg.k * 4))
    else:
        out["kv_cache"] = float(rows * n_blocks * block)
    # Live activations of one layer (hidden, qkv, MLP intermediate x2, attention out), double-buffered, + fp32 logits.
    act = model.hidden * 3 + (model.q_heads + 2 * model.kv_heads) * model.head_dim + 2 * model.intermediate
    out["activations"] = float(batch * (2 * act * dt + model.vocab * 4))
    return out


def host_kv_bytes(model: ModelSpec, batch: int, context: int, block_size: int = 64) -> float:
    """Pinned host memory holding the offloaded KV (every complete block of every row)."""
    return float(model.layers * model.kv_heads * batch * ((context - 1) // block_size + 1) * model.block_bytes(block_size))


def usable_bytes(profile: Profile) -> float:
    return profile.gpu_memory_bytes - profile.reserved_bytes


def max_batch(profile: Profile, model: ModelSpec, cfg: ReplayConfig, context: int, block_size: int = 64) -> int:
    """Largest batch whose footprint fits the profile's usable memory (0 if not even the weights fit)."""
    fixed = sum(footprint(model, cfg, 0, context, block_size).values())
    per_seq = sum(footprint(model, cfg, 1, context, block_size).values()) - fixed
    room = usable_bytes(profile) - fixed
    if room < 0:
        return 0
    return int(math.floor(room / per_seq + 1e-9))


def check_fits(profile: Profile, model: ModelSpec, cfg: ReplayConfig, batch: int, context: int,
               block_size: int = 64) -> dict[str, float]:
    """The footprint, or a ValueError that gives it when the batch does not fit."""
    parts = footprint(model, cfg, batch, context, block_size)
    total = sum(parts.values())
    if total > usable_bytes(profile):
        detail = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items())
        raise ValueError(
            f"batch: {batch} sequences of {context} tokens need {total / 2**30:.2f} GiB of GPU memory ({detail} GiB) "
            f"but {profile.name} has {usable_bytes(profile) / 2**30:.2f} GiB usable; the largest batch that fits is "
            f"{max_batch(profile, model, cfg, context, block_size)}")
    return parts
