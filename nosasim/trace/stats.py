"""Trace statistics: adjacent-step overlap per layer, selection sizes, compression."""

from __future__ import annotations

import numpy as np

from .codec import to_bitmap
from .io import TraceReader
from .model import tails_of


def overlap_per_layer(reader: TraceReader, sizes: list | None = None, progress: bool = False) -> np.ndarray:
    """Mean adjacent-step overlap per layer, streaming over the file.

    overlap_t = |S_t & (S_t-1 + {tail_t-1})| / |S_t| for t >= 1, averaged over steps, heads and
    sequences with a non-empty S_t. The block that was the tail at t-1 counts as carried over: it
    is already on the GPU, so this is exactly the hit rate of NOSI's keep-the-previous-step cache.
    """
    h = reader.header
    L, H, B = h.model.layers, h.model.kv_heads, h.seqs
    num = np.zeros(L)
    den = np.zeros(L)
    from tqdm import tqdm

    prev = prev_tail = None
    chunks = tqdm(reader.iter_chunks(), total=h.n_chunks, desc="trace info", unit="chunk",
                  disable=None if progress else True)  # None: shown on a terminal only
    for chunk in chunks:
        if sizes is not None:  # the mean selection size, in the same pass over the file
            sizes.append((chunk.sel >= 0).sum(axis=-1).mean())
        rows = chunk.rows()
        tails = np.broadcast_to(tails_of(chunk.context_len, h.block_size)[:, None, None, :], (chunk.steps, L, H, B))
        tails = tails.reshape(chunk.steps, -1)
        for s in range(chunk.steps):
            cur = to_bitmap(rows[s], h.n_blocks)
            if prev is not None:
                carried = prev.copy()
                carried[np.arange(carried.shape[0]), prev_tail] = True
                inter = (cur & carried).sum(axis=1).reshape(L, -1)
                size = cur.sum(axis=1).reshape(L, -1)
                valid = size > 0
                num += np.where(valid, inter / np.maximum(size, 1), 0).sum(axis=1)
                den += valid.sum(axis=1)
            prev, prev_tail = cur, np.minimum(tails[s], h.n_blocks - 1)
    return np.divide(num, den, out=np.full(L, np.nan), where=den > 0)


def summarize(path: str, progress: bool = False) -> dict:
    """What ``nosasim trace info`` prints (one pass over the file; ``progress``: a bar on a terminal)."""
    import os

    with TraceReader(path) as reader:
        h = reader.header
        sizes: list = []
        ov = overlap_per_layer(reader, sizes=sizes, progress=progress)
        raw = h.steps * h.model.layers * h.model.kv_heads * h.seqs * h.k * 2
        disk = os.path.getsize(path)
        # The selections alone, without the optional score arrays: what the 10x target is about.
        sel_bytes = sum(i.compress_size for i in reader._zf.infolist() if i.filename.startswith("sel_"))
        return {
            "path": path,
            "version": h.version,
            "shape": {"steps": h.steps, "layers": h.model.layers, "kv_heads": h.model.kv_heads, "seqs": h.seqs, "k": h.k},
            "block_size": h.block_size,
            "n_blocks": h.n_blocks,
            "context_len": {"first": reader.context_len[0].tolist(), "last": reader.context_len[-1].tolist()},
            "model": h.to_dict()["model"],
            "selection": h.to_dict()["selection"],
            "arrays": list(h.arrays),
            "provenance": h.provenance,
            "mean_selected_blocks": float(np.mean(sizes)),
            "overlap_per_layer": [round(float(x), 4) for x in ov],
            "overlap_mean": float(np.nanmean(ov)) if np.isfinite(ov).any() else None,
            "size_on_disk_bytes": disk,
            "raw_int16_selection_bytes": raw,
            "selection_bytes": sel_bytes,
            "compression_ratio_vs_raw_int16": raw / max(sel_bytes, 1),
        }
