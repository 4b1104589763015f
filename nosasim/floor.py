"""The floor of a decode step: what its bytes and FLOPs cost at the hardware's peaks, whatever the engine.

A runtime is judged by ``measured / floor`` as well as against a baseline. For every step the floor counts what no
engine can avoid moving or computing:

- **HBM bytes**: the weights read once (the embedding table only for the batch's rows), the K/V of every attended
  token (dense: the whole context; offloaded: the selected blocks and the tail) and NOSA's per-token logit bias,
  the compressed keys that scoring reads, the block scores written and read back (and NOSA's frozen per-block
  scores), the missed blocks written into the block pool, completed blocks read for write-back, and the new
  token's K/V;
- **host-link bytes**: missed blocks host to device, written-back blocks device to host;
- **FLOPs**: the GEMMs (two per weight and token), attention (``4 * head_dim`` per query head and attended token)
  and scoring (``2 * head_dim`` per query head and compressed key).

The device term is ``max(HBM bytes / HBM peak, FLOPs / matmul peak)``, the link term the larger direction over its
peak. When the configuration's schedule lets transfers overlap compute (micro-batches) the floor is the larger of
the two terms; when it cannot, their sum. Peaks are the profile's ceilings (``hbm_peak_Bps``: the larger of the copy
rate ``hbm_Bps`` and the best read rate a kernel reached, ``hbm_read_Bps``; ``matmul_flops``; ``h2d/d2h.peak_Bps``),
measured in isolation, so the floor is what the measured hardware allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nosasim.contract import CMP_STRIDE, CMP_WINDOW
from nosasim.hardware import Profile
from nosasim.models import ModelSpec, ReplayConfig

PARTS = ("weights", "kv", "bias", "compressed_keys", "scores", "pool_writes", "writeback_reads", "new_kv")


@dataclass(frozen=True, slots=True)
class Floor:
    """Per-step floors ``floor_s`` [steps] with their terms; ``hbm_parts`` are HBM bytes per step by part."""

    floor_s: np.ndarray
    device_s: np.ndarray
    link_s: np.ndarray
    hbm_s: np.ndarray
    flop_s: np.ndarray
    hbm_bytes: np.ndarray
    h2d_bytes: np.ndarray
    d2h_bytes: np.ndarray
    flops: np.ndarray
    hbm_parts: dict
    overlapped: bool

    def at(self, steps: np.ndarray) -> dict:
        """The median over ``steps`` (indices) of each term, as JSON-ready floats; ``bound`` names the term that
        sets the floor."""
        med = lambda a: float(np.median(a[steps]))  # noqa: E731
        out = {"floor_s": med(self.floor_s), "device_s": med(self.device_s), "link_s": med(self.link_s),
               "hbm_s": med(self.hbm_s), "flop_s": med(self.flop_s), "hbm_bytes": med(self.hbm_bytes),
               "h2d_bytes": med(self.h2d_bytes), "d2h_bytes": med(self.d2h_bytes), "flops": med(self.flops),
               "hbm_parts": {k: med(v) for k, v in self.hbm_parts.items()}, "overlapped": self.overlapped}
        terms = {"hbm": out["hbm_s"], "flops": out["flop_s"], "link": out["link_s"]}
        out["bound"] = max(terms, key=terms.get)
        return out


def _n_cmp(context: np.ndarray) -> np.ndarray:
    return np.maximum((context - CMP_WINDOW) // CMP_STRIDE + 1, 0)


def step_floor(profile: Profile, model: ModelSpec, cfg: ReplayConfig, context: np.ndarray, attended: np.ndarray,
               misses: np.ndarray, writebacks: np.ndarray, block_size: int = 64) -> Floor:
    """Floors of every step. ``context`` [steps, batch] tokens per sequence (the new one included); ``attended``,
    ``misses``, ``writebacks`` [steps, layers, batch]: complete blocks attended, loaded and written back per layer
    and sequence, summed over the KV heads (dense: ``attended`` is every complete block)."""
    m, dt = model, model.dtype_bytes
    block = cfg.block(model, block_size)
    kv_dt = block.dtype_bytes
    context = np.asarray(context, dtype=np.float64)
    steps, batch = context.shape
    L, H, G, D = m.layers, m.kv_heads, m.group, m.head_dim
    heads_rows = L * H  # KV rows per sequence
    embed = m.vocab * m.hidden
    # Weights read once per step: every matrix, but of the embedding table only the batch's rows (a tied LM head
    # reads the shared table whole).
    weight_bytes = (m.params - (0 if m.tie_embeddings else embed)) * dt + batch * m.hidden * dt
    tail_tokens = ((context - 1) % block_size + 1).sum(axis=1) * heads_rows  # [steps]: the tail of every row
    attended_tokens = np.asarray(attended, dtype=np.float64).sum(axis=(1, 2)) * block_size + tail_tokens
    parts = {
        "weights": np.full(steps, float(weight_bytes)),
        "kv": attended_tokens * 2 * D * kv_dt,
        "bias": attended_tokens * 4 if cfg.variant == "nosa" else np.zeros(steps),
        "new_kv": np.full(steps, float(batch * heads_rows * 2 * D * kv_dt)),
        "pool_writes": np.asarray(misses, dtype=np.float64).sum(axis=(1, 2)) * block.block_bytes,
        "writeback_reads": np.asarray(writebacks, dtype=np.float64).sum(axis=(1, 2)) * block.block_bytes,
    }
    cmp_keys = _n_cmp(context).sum(axis=1) * heads_rows  # [steps]
    blocks = ((context - 1) // block_size + 1).sum(axis=1) * heads_rows
    if cfg.offloaded:
        parts["compressed_keys"] = cmp_keys * D * cfg.ckey_bytes(m)
        # Block scores written by scoring and read by selection (fp32), NOSA's frozen per-block scores read.
        parts["scores"] = blocks * 4 * (2 + (1 if cfg.variant == "nosa" else 0))
    else:
        parts["compressed_keys"] = np.zeros(steps)
        parts["scores"] = np.zeros(steps)
    hbm = sum(parts.values())
    matmul_params = m.params - embed - m.hidden * (2 * L + 1) + (0 if m.tie_embeddings else 0)
    flops = (2.0 * batch * matmul_params + 4.0 * G * D * attended_tokens
             + (2.0 * G * D * cmp_keys if cfg.offloaded else 0.0))
    h2d = parts["pool_writes"]
    d2h = parts["writeback_reads"]
    hbm_s = hbm / profile.hbm_peak_Bps
    flop_s = flops / profile.matmul_flops
    device_s = np.maximum(hbm_s, flop_s)
    link_s = np.maximum(h2d / profile.h2d.peak_Bps, d2h / profile.d2h.peak_Bps)
    overlapped = cfg.microbatches > 1 or cfg.split_attention
    floor = np.maximum(device_s, link_s) if overlapped else device_s + link_s
    return Floor(floor, device_s, link_s, hbm_s, flop_s, hbm, h2d, d2h, flops, {k: parts[k] for k in PARTS},
                 overlapped)
