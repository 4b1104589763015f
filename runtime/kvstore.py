"""The pinned host KV store: every (sequence, KV head, block) of K and V is one contiguous chunk.

Layout ``[layers, host_seqs, kv_heads, n_blocks, 2, block_size, head_dim]``: K then V of one block sit together, so a
miss is one chunk of ``2 * 64 * head_dim`` elements (32 KiB at head dim 128 in bf16), the chunk size at which the
zero-copy gather reached 93% of the link's peak (docs/runtime.md). Prefill is not run: the prompt's K/V are filled in
(random, or given) and the first decode step starts cold, as in the cache semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import RuntimeConfig


def available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class HostStore:
    kv: torch.Tensor  # [L, Bh, H, NB, 2, BS, D], pinned when a GPU is present
    batch: int

    @classmethod
    def allocate(cls, cfg: RuntimeConfig, pin: bool) -> "HostStore":
        need = cfg.host_bytes()
        avail = available_host_bytes()
        if avail is not None and need > 0.9 * avail:
            raise ValueError(f"host KV store needs {need / 2**30:.1f} GiB but only {avail / 2**30:.1f} GiB of host "
                             f"memory is available (lower batch, context or host_seqs)")
        s = cfg.shape
        shape = (s.layers, cfg.n_host_seqs, s.kv_heads, cfg.n_blocks, 2, cfg.block_size, s.head_dim)
        return cls(torch.empty(shape, dtype=cfg.kv_torch_dtype, pin_memory=pin), cfg.batch)

    @property
    def chunk_bytes(self) -> int:
        return self.kv[0, 0, 0, 0].numel() * self.kv.element_size()

    def layer(self, layer: int) -> torch.Tensor:
        return self.kv[layer]

    def row_base(self, device, batch: int | None = None) -> torch.Tensor:
        """Chunk index of block 0 of each runtime row (``row = seq * kv_heads + head``) inside one layer; sequence
        ``b`` uses host row ``b % host_seqs``."""
        _, bh, h, nb = self.kv.shape[:4]
        seq = torch.arange(self.batch if batch is None else batch, device=device) % bh
        return ((seq[:, None] * h + torch.arange(h, device=device)[None, :]) * nb).reshape(-1)

    def fill_random(self, seed: int, device) -> None:
        """Random prompt K/V. On a GPU, generated there and copied over the link (the host is slower at it)."""
        g = torch.Generator(device=device).manual_seed(seed)
        flat = self.kv.view(-1)
        piece = 1 << 28
        buf = None
        for start in range(0, flat.numel(), piece):
            n = min(piece, flat.numel() - start)
            if buf is None or buf.numel() < n:
                # float8 has no random generator: draw in bfloat16, then cast.
                buf = torch.empty(n, dtype=flat.dtype if flat.element_size() > 1 else torch.bfloat16, device=device)
            buf[:n].normal_(generator=g)
            flat[start:start + n].copy_(buf[:n].to(flat.dtype), non_blocking=False)

