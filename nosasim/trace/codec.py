"""Delta coding of selections: a keyframe per chunk of steps, then per-step added and removed ids.

Adjacent selections overlap heavily (0.89-0.94 on real text), so storing what changed is far
smaller than storing every selection. All helpers here are plain numpy so that the format can be
decoded by anyone with numpy alone (docs/trace-format.md restates the algorithm).
"""

from __future__ import annotations

import numpy as np

from .header import TraceError


def to_bitmap(sel: np.ndarray, n_blocks: int) -> np.ndarray:
    """``sel [R, k]`` (-1 padded ids) -> ``bool [R, n_blocks]`` membership."""
    rows = sel.shape[0]
    bm = np.zeros((rows, n_blocks + 1), dtype=bool)
    # -1 padding lands in the spare last column, which is then dropped.
    bm[np.arange(rows)[:, None], np.where(sel < 0, n_blocks, sel)] = True
    return bm[:, :n_blocks]


def from_bitmap(bm: np.ndarray, k: int) -> np.ndarray:
    """``bool [R, n_blocks]`` -> ``int16 [R, k]`` ids sorted ascending, -1 padded."""
    rows, cols = np.nonzero(bm)  # row-major: ids come out sorted within each row
    counts = bm.sum(axis=1)
    if counts.size and counts.max(initial=0) > k:
        raise TraceError(f"selection holds {int(counts.max())} blocks, more than k={k}")
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    out = np.full((bm.shape[0], k), -1, dtype=np.int16)
    out[rows, np.arange(rows.size) - starts[rows]] = cols
    return out


def count_dtype(k: int):
    """The dtype of the per-row add/remove counts and removed positions for a budget ``k``."""
    return np.uint8 if k <= 255 else np.uint16


def encode_chunk(sel: np.ndarray, n_blocks: int) -> dict[str, np.ndarray]:
    """Encode ``sel [n, R, k]`` (one chunk of steps, rows flattened) into keyframe + deltas.

    A removed block is stored as its *position* in the previous (sorted) selection, which is
    always below ``k``; an added block as its id, split into a low-byte and a high-byte plane
    because the high bytes are nearly constant and then cost almost nothing after deflate.
    """
    n, rows, k = sel.shape
    cdt = count_dtype(k)
    prev = to_bitmap(sel[0], n_blocks)
    adds, dels = [], []
    nadd, ndel = np.zeros((n - 1, rows), cdt), np.zeros((n - 1, rows), cdt)
    for s in range(1, n):
        cur = to_bitmap(sel[s], n_blocks)
        added = cur & ~prev
        gone = (sel[s - 1] >= 0) & ~cur[np.arange(rows)[:, None], np.maximum(sel[s - 1], 0)]
        nadd[s - 1], ndel[s - 1] = added.sum(axis=1), gone.sum(axis=1)
        adds.append(np.nonzero(added)[1])
        dels.append(np.nonzero(gone)[1])
        prev = cur
    add = np.concatenate(adds) if adds else np.zeros(0, np.int64)
    dele = np.concatenate(dels) if dels else np.zeros(0, np.int64)
    return {
        "key": sel[0].astype(np.int16), "nadd": nadd, "ndel": ndel, "del": dele.astype(cdt),
        "addlo": (add & 0xFF).astype(np.uint8), "addhi": (add >> 8).astype(np.uint8),
    }


def decode_chunk(parts: dict[str, np.ndarray], n: int, rows: int, k: int, n_blocks: int, where: str) -> np.ndarray:
    """Inverse of :func:`encode_chunk`; ``where`` names the chunk in error messages."""
    key, nadd, ndel, dele = (parts[x] for x in ("key", "nadd", "ndel", "del"))
    if key.shape != (rows, k):
        raise TraceError(f"{where}: array 'key' has shape {key.shape}, expected {(rows, k)}")
    for name, arr in (("nadd", nadd), ("ndel", ndel)):
        if arr.shape != (n - 1, rows):
            raise TraceError(f"{where}: array '{name}' has shape {arr.shape}, expected {(n - 1, rows)}")
    total_add = int(nadd.sum())
    if parts["addlo"].shape != (total_add,) or parts["addhi"].shape != (total_add,) or dele.shape != (int(ndel.sum()),):
        raise TraceError(f"{where}: delta arrays do not match their counts (truncated or corrupt)")
    add = parts["addlo"].astype(np.intp) | (parts["addhi"].astype(np.intp) << 8)
    if key.max(initial=-1) >= n_blocks or add.max(initial=0) >= n_blocks or dele.max(initial=0) >= k:
        raise TraceError(f"{where}: block id >= n_blocks={n_blocks} or position >= k={k} (corrupt)")
    if (key < -1).any():
        raise TraceError(f"{where}: array 'key' has negative ids other than the -1 padding")
    # Within one row and step, added ids and removed positions are stored ascending (encode_chunk writes them so):
    # a redundancy that catches many damaged bytes which would otherwise decode to another valid selection.
    for name, vals, counts in (("addlo/addhi", add, nadd), ("del", dele, ndel)):
        group = np.repeat(np.arange(counts.size), counts.reshape(-1))
        if ((group[1:] == group[:-1]) & (vals[1:] <= vals[:-1])).any():
            raise TraceError(f"{where}: array 'sel_{name}' is not ascending within a row and step (corrupt)")
    out = np.empty((n, rows, k), dtype=np.int16)
    out[0] = key
    bm = to_bitmap(key, n_blocks)
    if int(bm.sum()) != int((key >= 0).sum()):
        raise TraceError(f"{where}: duplicate block ids in one selection of the keyframe")
    ia = idl = 0
    row_ids = np.arange(rows)
    for s in range(1, n):
        ra, rd = np.repeat(row_ids, nadd[s - 1]), np.repeat(row_ids, ndel[s - 1])
        a = add[ia : ia + ra.size]
        d = out[s - 1][rd, dele[idl : idl + rd.size].astype(np.intp)].astype(np.intp)
        ia, idl = ia + ra.size, idl + rd.size
        # A delta that removes a padding slot or adds a present block cannot come from encode_chunk.
        if (d < 0).any() or bm[ra, a].any():
            raise TraceError(f"{where}: step {s} of the chunk removes an absent or adds a present block (corrupt)")
        bm[rd, d] = False
        bm[ra, a] = True
        out[s] = from_bitmap(bm, k)
    return out
