"""Zero-copy chunk gather (host -> device) and write-back (device -> host) against the pinned memcpy peak.

Run: ``PYTHONPATH=. python benchmarks/bench_gather.py [out.json]``. Chunks are 8, 16 and 32 KiB (one 64-token block of
K plus V at head dim 32, 64, 128 in bf16), drawn at random from a 4 GiB pinned buffer, with fresh indices on every
repetition so nothing is served from the GPU's L2. Each kernel variant (programs per chunk, warps) is timed; the
runtime uses the best one. The target: >= 90% of the pinned memcpy peak for >= 1,024 chunks.

Two timings: one gather per graph replay (the graph launch and the kernel's ramp-up are in every sample), and
gathers back to back in one graph (``in_stream``: what each of a decode step's per-layer gathers costs), the latter
also over the runtime's sparse launch grid, where most entries are hits that exit at once.
"""

from __future__ import annotations

import sys

import torch

from runtime.gather import RUNTIME_BLOCK, copy_chunks, copy_chunks_lists
from runtime.timing import environment, time_cuda, write_json

CHUNKS = (8192, 16384, 32768)
COUNTS = (256, 1024, 4096, 16384)
VARIANTS = ((1, 4), (1, 8), (2, 4), (4, 4))  # (programs per chunk, warps)
PERSISTENT = (0, 66, 132, 264)  # persistent programs looping over the entries (0: one program per entry)


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
            for split, warps in ((0, 4),) + tuple(variants):  # split 0: the runtime's kernel (blocks of entries)
                if split and cb // 4 // split < 256:
                    continue
                for direction in directions:
                    pair = (host, dev_buf, ids, dst) if direction == "h2d" else (dev_buf, host, dst, ids)
                    if split == 0:
                        fn = lambda: copy_chunks_lists([pair], cb, block=RUNTIME_BLOCK)  # noqa: E731
                    else:
                        fn = lambda: copy_chunks(*pair, cb, split=split, num_warps=warps)  # noqa: E731
                    fn()
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        fn()
                    t = time_cuda(graph.replay, reps=reps, warmup=2,
                                  setup=lambda i: ids.copy_(sets[i % len(sets)]))
                    rows.append({"direction": direction, "chunk_bytes": cb, "count": n, "split": split,
                                 "num_warps": warps, "seconds": t, "Bps": n * cb / t, "sequential": sequential,
                                 "kernel": f"lists-block{RUNTIME_BLOCK}" if split == 0 else "copy_chunks",
                                 "timing": "cuda graph replay"})
        del dev_buf
    return rows


def in_stream(host_bytes: int = 4 << 30, dev="cuda", chunks=CHUNKS, count: int = 1024, per_graph: int = 8,
              holes: int = 1, reps: int = 15, split: int = 1, warps: int = 4, programs=PERSISTENT) -> list[dict]:
    """Per-gather seconds when ``per_graph`` gathers run back to back in one graph, as the 32 layers' gathers of a
    decode step do: the graph launch and the first kernel's start are paid once, not per gather. With ``holes`` >
    1 each gather is launched as the runtime launches it, over a grid of ``holes * count`` entries of which only
    ``count`` are valid (the rest are -1, the hits), so the cost of programs that exit at once is included."""
    host = torch.empty(host_bytes // 4, dtype=torch.int32, pin_memory=True)
    host.view(torch.uint8)[:: 4096].fill_(7)
    g = torch.Generator(device=dev).manual_seed(1)
    rows = []
    for cb in chunks:
        n_host = host_bytes // cb
        dev_buf = torch.empty(per_graph * count * cb // 4, dtype=torch.int32, device=dev)
        width = holes * count
        src = [torch.full((width,), -1, dtype=torch.int64, device=dev) for _ in range(per_graph)]
        dst = [torch.full((width,), -1, dtype=torch.int64, device=dev) for _ in range(per_graph)]

        def refill(_i):
            for j in range(per_graph):  # fresh random chunks at random grid positions for every replay
                pos = torch.randperm(width, generator=g, device=dev)[:count]
                src[j].fill_(-1).scatter_(0, pos, torch.randperm(n_host, generator=g, device=dev)[:count])
                dst[j].fill_(-1).scatter_(0, pos, j * count + torch.arange(count, device=dev))

        refill(0)
        for p in programs:
            fn = lambda: [copy_chunks(host, dev_buf, src[j], dst[j], cb, split=split, num_warps=warps,  # noqa: E731
                                      programs=p) for j in range(per_graph)]
            fn()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            t = time_cuda(graph.replay, reps=reps, warmup=2, setup=refill) / per_graph
            rows.append({"direction": "h2d", "chunk_bytes": cb, "count": count, "grid": width,
                         "per_graph": per_graph, "split": split, "num_warps": warps, "programs": p, "seconds": t,
                         "Bps": count * cb / t, "timing": f"{per_graph} gathers per cuda graph replay, per gather"})
        del dev_buf
    return rows


def summarize(rows: list[dict], peaks: dict, kernel: str | None = None) -> list[dict]:
    """Best variant per (direction, chunk, count) and its share of the same run's memcpy peak; ``kernel``: among
    that kernel's rows only (the profile's link tables are the kernel the runtime launches)."""
    best = {}
    for r in rows:
        if kernel is not None and r.get("kernel") != kernel:
            continue
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
    res = {"env": environment(), "peaks": peaks, "best": summarize(rows, peaks, f"lists-block{RUNTIME_BLOCK}"),
           "best_copy_chunks": summarize(rows, peaks, "copy_chunks"), "all": rows}
    if experiments:
        exp = {}
        seq = sweep(sequential=True, variants=((1, 4), (1, 8)), directions=("h2d",))
        exp["sequential_best"] = summarize(seq, peaks)
        peak = peaks["h2d_memcpy_1GiB_Bps"]
        for name, kw in (("in_stream", {}), ("in_stream_holes20", {"holes": 20})):
            exp[name] = [dict(r, pct_of_memcpy_peak=100 * r["Bps"] / peak) for r in in_stream(**kw)]
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
    for name in ("in_stream", "in_stream_holes20"):
        for r in exp.get(name, []):
            lines.append(f"{name:17s} h2d {r['chunk_bytes'] // 1024:3d}K x {r['count']} (grid {r['grid']}, "
                         f"persistent {r['programs']}): "
                         f"{r['Bps'] / 1e9:5.1f} GB/s {r['pct_of_memcpy_peak']:5.1f}% of peak")
    for name in ("sequential_best",):
        if name in exp:
            lines.append(name + " h2d %peak by (chunk K, count): " + ", ".join(
                f"{r['chunk_bytes'] // 1024}K/{r['count']}={r['pct_of_memcpy_peak']:.0f}" for r in exp[name]))
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run(sys.argv[1] if len(sys.argv) > 1 else None)))
