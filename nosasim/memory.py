"""The one memory model: what a configuration keeps on the GPU (and in pinned host memory), and the largest batch.

This is the plan the GPU runtime allocates by: every part below is one of the runtime's device allocations, with
the same shapes (``tests/test_memory_contract.py`` builds the runtime's buffers and holds each part equal to the
byte). Dense attention keeps every token's K and V on the GPU, so its footprint grows with context and batch.
Offloaded variants keep per (layer, KV head, sequence) ``C`` cache slots plus the tail slots; what still grows with
context is the selection state: InfLLM-V2's compressed keys (one per 16 tokens, K only), the block table's
per-block statistics and, for NOSA, the per-token eviction score that is also attention's logit bias. Everything
is linear in the batch, so the largest batch is solved in closed form.

``tokens`` is the most tokens a sequence holds during the run (the runtime's ``context + steps``).
"""

from __future__ import annotations

import math

from nosasim.contract import (TAIL_SLOTS, TRACE_VARIANT, VARIANTS, BlockShape, Budget, choice, compressed_slots,
                              count, n_blocks)
from nosasim.models import ModelSpec

# Parts that are the runtime's allocations exactly; "scratch" (activations and per-layer temporaries, reused by
# every layer) is an estimate on top.
EXACT_PARTS = ("weights", "eviction_head", "kv_cache", "block_table", "compressed_keys", "eviction_scores")


def plan(model: ModelSpec, variant: str, budget: Budget | None, policy: str, batch: int, tokens: int,
         block: BlockShape | None = None, ckey_bytes: int | None = None) -> dict[str, int]:
    """Device bytes by part for ``batch`` sequences of up to ``tokens`` tokens. ``block``: the KV block as the pool
    stores it (default: the model's element type, 64-token blocks); ``ckey_bytes``: the compressed keys' element
    size (default the model's; 1 for fp8 keys). Dense takes no budget."""
    choice("variant", variant, VARIANTS + (TRACE_VARIANT,))
    count("batch", batch, 0)
    count("tokens", tokens, 1)
    block = model.block() if block is None else block
    L, H, D, dt = model.layers, model.kv_heads, model.head_dim, model.dtype_bytes
    rows = L * H * batch  # (layer, KV head, sequence) rows
    nb = n_blocks(tokens, block.block_size)
    out = {"weights": model.params * dt,
           # NOSA's eviction head per layer: W_delta [kv_heads, head_dim] and A [kv_heads], float32.
           "eviction_head": L * (H * D + H) * 4}
    if variant == "dense":
        out["kv_cache"] = rows * nb * block.block_bytes
    else:
        if budget is None:
            raise ValueError(f"budget: variant {variant!r} needs a Budget (k, capacity)")
        C = budget.capacity
        out["kv_cache"] = rows * (C + TAIL_SLOTS) * block.block_bytes
        # Slot -> block id (int64 per slot), then last use and times selected (int64 per block, plus a scratch
        # column that masked writes land in); policy 'static' ranks by a float32 per-block score, which NOSA
        # shares with its own eviction state.
        static = 4 * (nb + 1) if policy == "static" and variant != "nosa" else 0
        out["block_table"] = rows * (8 * C + 16 * (nb + 1) + static)
        nc = compressed_slots(tokens)
        if variant in ("infllmv2", "nosa"):
            # Compressed keys in their element type, plus two float32 running sums of 16 keys each.
            ck = dt if ckey_bytes is None else ckey_bytes
            out["compressed_keys"] = rows * (nc * D * ck + 2 * D * 4)
        if variant == "nosa":
            # Per-token eviction score (attention's logit bias), its compressed form, two running sums, and the
            # frozen per-block score, all float32.
            out["eviction_scores"] = rows * 4 * (nb * block.block_size + nc + 2 + nb + 1)
    out["scratch"] = scratch_bytes(model, variant, batch, tokens)
    return out


def scratch_bytes(model: ModelSpec, variant: str, batch: int, tokens: int) -> int:
    """Activations and per-layer temporaries (reused by every layer): fp32 logits and a few hidden-sized buffers
    per sequence, and for scoring variants the fp32 logits of every compressed key, a few times over."""
    out = batch * (model.vocab * 4 + 8 * max(model.hidden, model.intermediate) * 4)
    if variant in ("infllmv2", "nosa"):
        out += 4 * batch * model.q_heads * (tokens // 16) * 4
    return out


def host_kv_bytes(model: ModelSpec, seqs: int, tokens: int, block: BlockShape | None = None) -> int:
    """Pinned host memory holding the offloaded KV of ``seqs`` sequences (every block of every row)."""
    block = model.block() if block is None else block
    return model.layers * model.kv_heads * seqs * n_blocks(tokens, block.block_size) * block.block_bytes


def largest_batch(usable: float, model: ModelSpec, variant: str, budget: Budget | None, policy: str, tokens: int,
                  block: BlockShape | None = None, weights_resident: bool = False,
                  ckey_bytes: int | None = None) -> int:
    """The largest batch whose plan fits ``usable`` bytes (0 if not even the fixed part fits): the one answer the
    simulator, the runtime and the benchmarks use. ``weights_resident``: the weights are already on the device
    (a runtime reusing loaded weights measures free memory after them), so only the rest counts."""
    fixed = sum(plan(model, variant, budget, policy, 0, tokens, block, ckey_bytes).values())
    per_seq = sum(plan(model, variant, budget, policy, 1, tokens, block, ckey_bytes).values()) - fixed
    if weights_resident:
        parts = plan(model, variant, budget, policy, 0, tokens, block, ckey_bytes)
        fixed -= parts["weights"] + parts["eviction_head"]
    room = usable - fixed
    if room < 0:
        return 0
    return int(math.floor(room / per_seq + 1e-9))


def refuse_unless_fits(usable: float, parts: dict[str, int], what: str, largest: int) -> None:
    """ValueError giving the footprint by part when ``parts`` exceed ``usable`` bytes."""
    total = sum(parts.values())
    if total > usable:
        detail = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items() if v)
        raise ValueError(f"batch: {what} needs {total / 2**30:.2f} GiB of GPU memory ({detail} GiB) but "
                         f"{usable / 2**30:.2f} GiB is usable; the largest batch that fits is {largest}")


# The simulator's view: a ReplayConfig on a hardware profile.

def footprint(model: ModelSpec, cfg, batch: int, tokens: int, block_size: int = 64) -> dict[str, int]:
    """:func:`plan` of a :class:`~nosasim.models.ReplayConfig`."""
    return plan(model, cfg.variant, cfg.budget, cfg.policy, batch, tokens, cfg.block(model, block_size),
                cfg.ckey_bytes(model))


def usable_bytes(profile) -> float:
    return profile.gpu_memory_bytes - profile.reserved_bytes


def max_batch(profile, model: ModelSpec, cfg, tokens: int, block_size: int = 64) -> int:
    """:func:`largest_batch` of a ReplayConfig on a profile's usable memory."""
    return largest_batch(usable_bytes(profile), model, cfg.variant, cfg.budget, cfg.policy, tokens,
                         cfg.block(model, block_size), ckey_bytes=cfg.ckey_bytes(model))


def check_fits(profile, model: ModelSpec, cfg, batch: int, tokens: int, block_size: int = 64) -> dict[str, int]:
    """The footprint, or a ValueError that gives it when the batch does not fit the profile."""
    parts = footprint(model, cfg, batch, tokens, block_size)
    refuse_unless_fits(usable_bytes(profile), parts, f"{batch} sequences of {tokens} tokens on {profile.name}",
                       max_batch(profile, model, cfg, tokens, block_size))
    return parts
