"""Zero-copy chunk gather (host -> device) and write-back (device -> host) against the pinned memcpy peak.

Run: ``PYTHONPATH=. python benchmarks/bench_gather.py [out.json]``. Chunks are 8, 16 and 32 KiB (one 64-token block of
K plus V at head dim 32, 64, 128 in bf16), drawn at random from a 4 GiB pinned buffer, with fresh indices on every
repetition so nothing is served from the GPU's L2. Each kernel variant (programs per chunk, warps) is timed; the
runtime uses the best one. The target: >= 90% of the pinned memcpy peak for >= 1,024 chunks.
"""

from __future__ import annotations

import sys

import torch

from runtime.gather import copy_chunks
from runtime.timing import environment, time_cuda, write_json

CHUNKS = (8192, 16384, 32768)
COUNTS = (256, 1024, 4096, 16384)
VARIANTS = ((1, 4), (1, 8), (2, 4), (4, 4))  # (programs per chunk, warps)


def memcpy_peaks(dev="cuda") -> dict:
    n = 1 << 30
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    d = torch.empty(n, dtype=torch.uint8, device=dev)
    out = {"h2d_memcpy_1GiB_Bps": n / time_cuda(lambda: d.copy_(h, non_blocking=True), reps=10),
           "d2h_memcpy_1GiB_Bps": n / time_cuda(lambda: h.copy_(d, non_blocking=True), reps=10)}
    d2 = torch.empty_like(d)
    out["d2d_copy_1GiB_Bps_rw"] = 2 * n / time_cuda(lambda: d2.copy_(d), reps=10)
    return out


def sweep(host_bytes: int = 4 << 30, dev="cuda", variants=VARIANTS, chunks=CHUNKS, counts=COUNTS,
          reps: int = 15, sequential: bool = False, directions=("h2d", "d2h")) -> list[dict]:
    """Each copy is captured in a CUDA graph and replayed, as in a decode step: Triton's host-side launch cost
    (tens of microseconds) is then not counted, and the index buffer is refilled before each timed replay."""
    host = torch.empty(host_bytes // 4, dtype=torch.int32, pin_memory=True)
    host.view(torch.uint8)[:: 4096].fill_(7)  # touch every page once
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for cb in chunks:
        n_host = host_bytes // cb
        dev_buf = torch.empty(max(counts) * cb // 4, dtype=torch.int32, device=dev)
        for n in counts:
            if sequential:  # contiguous runs: what host-side address translation costs when it is all local
                sets = [torch.arange(i * n, (i + 1) * n, device=dev) % n_host for i in range(4)]
            else:
                sets = [torch.randperm(n_host, generator=g, device=dev)[:n] for _ in range(4)]
            dst = torch.arange(n, device=dev)
            ids = sets[0].clone()
            for split, warps in variants:
                if cb // 4 // split < 256:
                    continue
                for direction in directions:
                    if direction == "h2d":
                        fn = lambda: copy_chunks(host, dev_buf, ids, dst, cb, split=split, num_warps=warps)  # noqa: E731
                    else:
                        fn = lambda: copy_chunks(dev_buf, host, dst, ids, cb, split=split, num_warps=warps)  # noqa: E731
                    fn()
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        fn()
                    t = time_cuda(graph.replay, reps=reps, warmup=2,
                                  setup=lambda i: ids.copy_(sets[i % len(sets)]))
                    rows.append({"direction": direction, "chunk_bytes": cb, "count": n, "split": split,
                                 "num_warps": warps, "seconds": t, "Bps": n * cb / t, "sequential": sequential,
                                 "timing": "cuda graph replay"})
        del dev_buf
    return rows


def summarize(rows: list[dict], peaks: dict) -> list[dict]:
    """Best variant per (direction, chunk, count) and its share of the same run's memcpy peak."""
    best = {}
    for r in rows:
        key = (r["direction"], r["chunk_bytes"], r["count"])
        if key not in best or r["seconds"] < best[key]["seconds"]:
            best[key] = r
    out = []
    for (direction, cb, n), r in sorted(best.items()):
        peak = peaks["h2d_memcpy_1GiB_Bps"] if direction == "h2d" else peaks["d2h_memcpy_1GiB_Bps"]
        out.append(dict(r, pct_of_memcpy_peak=100 * r["Bps"] / peak))
    return out


def run(out_path: str | None = None, experiments: bool = True) -> dict:
    """The sweep over random chunks of pinned memory, plus contiguous chunk runs (H2D): if those were faster, host
    address translation would be the gap to memcpy. (An earlier run, analysis/results/runtime_run2_*, found them no
    faster, and huge pages no faster either.)"""
    peaks = memcpy_peaks()
    rows = sweep()
    res = {"env": environment(), "peaks": peaks, "best": summarize(rows, peaks), "all": rows}
    if experiments:
        exp = {}
        seq = sweep(sequential=True, variants=((1, 4), (1, 8)), directions=("h2d",))
        exp["sequential_best"] = summarize(seq, peaks)
        res["experiments"] = exp
    if out_path:
        write_json(out_path, res)
    return res


def table(res: dict) -> str:
    lines = [f"memcpy peak h2d {res['peaks']['h2d_memcpy_1GiB_Bps'] / 1e9:.1f} GB/s, "
             f"d2h {res['peaks']['d2h_memcpy_1GiB_Bps'] / 1e9:.1f} GB/s",
             "dir  chunk  count   GB/s   %peak  split warps"]
    for r in res["best"]:
        lines.append(f"{r['direction']}  {r['chunk_bytes'] // 1024:3d}K  {r['count']:6d}  {r['Bps'] / 1e9:5.1f}  "
                     f"{r['pct_of_memcpy_peak']:5.1f}  {r['split']:4d}  {r['num_warps']:4d}")
    exp = res.get("experiments", {})
    for name in ("sequential_best",):
        if name in exp:
            lines.append(name + " h2d %peak by (chunk K, count): " + ", ".join(
                f"{r['chunk_bytes'] // 1024}K/{r['count']}={r['pct_of_memcpy_peak']:.0f}" for r in exp[name]))
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run(sys.argv[1] if len(sys.argv) > 1 else None)))
