"""Import selections recorded elsewhere from a plain numpy ``.npz`` file.

Expected members: ``sel`` int ``[steps, layers, heads, k]`` (one sequence) or
``[steps, layers, heads, seqs, k]``, -1 padded; ``context_len`` int ``[steps]`` or ``[steps, seqs]``.
Optional: ``agnostic_score`` ``[layers, heads, (seqs,) n_blocks]``. A saved top-k index tensor
fits this directly; ids equal to the tail block are dropped (the tail is always resident).
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from ..contract import Budget
from .header import ModelShape, SelectionParams
from .model import Trace


def import_npz(path: str, block_size: int = 64, head_dim: int = 128, dtype_bytes: int = 2, k: int | None = None,
               q_heads: int | None = None, name: str = "", command: str = "") -> Trace:
    if not os.path.exists(path):
        raise ValueError(f"input file {path!r} does not exist")
    try:
        z = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"input file {path!r} is not a readable .npz ({exc})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):  # np.load reads a plain .npy as one array, without names
        raise ValueError(f"input file {path!r} is a single .npy array; expected an .npz archive with arrays 'sel' "
                         f"and 'context_len' (np.savez(path, sel=..., context_len=...))")
    with z:
        for field in ("sel", "context_len"):
            if field not in z.files:
                raise ValueError(f"input file {path!r}: missing array '{field}' (has {sorted(z.files)})")
        sel, ctx = z["sel"], z["context_len"]
        agn = z["agnostic_score"] if "agnostic_score" in z.files else None
    if sel.ndim == 4:
        sel = sel[:, :, :, None, :]
        if agn is not None and agn.ndim == 3:
            agn = agn[:, :, None, :]
    if sel.ndim != 5:
        raise ValueError(f"array 'sel' must be [steps, layers, heads, k] or [steps, layers, heads, seqs, k], got {sel.shape}")
    if ctx.ndim == 1:
        ctx = ctx[:, None]
    steps, layers, heads, seqs, width = sel.shape
    if ctx.shape != (steps, seqs):
        raise ValueError(f"array 'context_len' has shape {ctx.shape}, expected {(steps,)} or {(steps, seqs)}")
    k = k or width
    model = ModelShape(layers=layers, kv_heads=heads, head_dim=head_dim, dtype_bytes=dtype_bytes, q_heads=q_heads,
                       name=name)
    params = SelectionParams(method="import", budget=Budget(k, None, 0, 0))
    prov = {"source": "import", "file": os.path.basename(path), "command": command}
    return Trace.from_arrays(sel, ctx, block_size=block_size, model=model, selection=params, provenance=prov,
                             agnostic_score=agn, k=k)
