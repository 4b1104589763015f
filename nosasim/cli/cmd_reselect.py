"""``nosasim reselect``: a new selection trace from a score trace, without running the model again.

A score trace (recorded by ``python -m traces.record``) keeps the InfLLM-V2 block scores of every
step and the static query-agnostic scores, so any budget ``k``/``k_q``/sink/window is re-selected
with :func:`nosasim.select.reselect`, the same function the recorder used; at the recorded
budget the result is the recorded selection exactly.
"""

from __future__ import annotations

import os

import numpy as np

from ..contract import Budget
from ..quality import recall_summary
from ..select import reselect
from ..trace import read_trace, write_trace

TRACE_OWN = "trace"


def sidecar_path(trace_path: str) -> str:
    """Where the recorder puts every proxy's static scores: ``x.nosatrace`` -> ``x.agnostic.npz``."""
    base = trace_path[: -len(".nosatrace")] if trace_path.endswith(".nosatrace") else trace_path
    return base + ".agnostic.npz"


def load_agnostic(trace_path: str, name: str) -> np.ndarray | None:
    """Static scores by name: ``trace`` (the trace's own, None here), a proxy in the sidecar, or an ``.npy`` file."""
    if name == TRACE_OWN:
        return None
    if name.endswith(".npy"):
        if not os.path.isfile(name):
            raise ValueError(f"--agnostic-score: file {name!r} does not exist")
        return np.load(name, allow_pickle=False)
    side = sidecar_path(trace_path)
    if not os.path.isfile(side):
        raise ValueError(f"--agnostic-score {name!r}: no sidecar {side!r} with proxy scores next to the trace "
                         f"(use '{TRACE_OWN}' or a .npy file of shape [layers, kv_heads, seqs, n_blocks])")
    with np.load(side, allow_pickle=False) as z:
        if name not in z.files:
            raise ValueError(f"--agnostic-score: expected one of {sorted(z.files)} (or '{TRACE_OWN}', or a .npy "
                             f"file), got {name!r}")
        return z[name]


def run(args) -> int:
    trace = read_trace(args.trace)
    agn = load_agnostic(args.trace, args.agnostic_score)
    if agn is not None:
        want = (trace.layers, trace.heads, trace.seqs, trace.n_blocks)
        if agn.shape != want:
            raise ValueError(f"--agnostic-score {args.agnostic_score!r}: scores have shape {agn.shape}, "
                             f"expected {want}")
    budget = Budget(args.k, args.kq, args.sink, args.window)
    out = reselect(trace, budget, agnostic=agn,
                   provenance={"agnostic_score": args.agnostic_score, "from": os.path.basename(args.trace)})
    size = write_trace(args.out, out)
    line = (f"wrote {args.out}: {out.header.selection.method} k={budget.k} k_q={budget.k_q}, "
            f"{out.steps} steps, {size} bytes")
    if out.attn_mass is not None:
        s = recall_summary(out)
        line += f"; attention-mass recall mean {s.mean:.4f}, p10 {s.p10:.4f}"
    print(line)
    return 0


def register(sub) -> None:
    p = sub.add_parser("reselect", help="re-select blocks from a score trace at another budget",
                       description="A new selection trace from a score trace at any budget, without running the "
                                   "model again; prints the attention-mass recall when the trace has it.")
    p.add_argument("trace", help="score trace (.nosatrace with qaware_score)")
    p.add_argument("--k", type=int, required=True, help="blocks selected per step, the partial tail included")
    p.add_argument("--kq", type=int, default=None,
                   help="query-aware blocks (sink + window + top); omitted or = k means InfLLM-V2")
    p.add_argument("--sink", type=int, default=1, help="attention-sink blocks always selected (default 1)")
    p.add_argument("--window", type=int, default=16, help="local window blocks, the tail included (default 16)")
    p.add_argument("--agnostic-score", default=TRACE_OWN,
                   help="query-agnostic score for NOSA: 'trace' (the trace's own), a proxy name from the "
                        "recorder's sidecar <trace>.agnostic.npz (attn_mass, key_norm, value_norm), or a .npy file")
    p.add_argument("-o", "--out", required=True, help="output .nosatrace (written atomically)")
    p.set_defaults(func=run)
