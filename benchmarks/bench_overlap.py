"""Does a host-to-device copy run beside compute without slowing it? The isolated measurement behind micro-batch
overlap.

Run: ``PYTHONPATH=. python benchmarks/bench_overlap.py [out.json]``. In one CUDA graph, a compute chain (decode-sized
GEMMs: 32 tokens against llama3-8b's gate/up weights, the kind of work beside which a micro-batch's gather runs) on
the capture stream, and a copy of 1,024 blocks of 32 KiB from pinned host memory on a side stream. Each is timed
alone and both together; ``overlap`` = hidden time / the shorter one's time (1: the shorter is fully hidden, 0:
they serialise). Copies: the zero-copy gather kernel over the runtime's sparse grid (one program per entry, 1 in 16
valid), the same as persistent programs (33, 132), and the copy engine (``cudaMemcpyAsync`` of one contiguous
buffer, which uses no SMs) as the reference. Then the persistent gather and the copy engine beside chains of 1 to 16
GEMM sets (``lengths``), which tells compute slowed beside a copy from a copy slowed beside compute, and the gather
beside chains of HBM-bound elementwise passes (``memory_lengths``), the kind of work a decode step runs beside it.
"""

from __future__ import annotations

import sys

import torch

from runtime.gather import copy_chunks
from runtime.timing import environment, time_cuda, write_json

CHUNK, COUNT, HOLES = 32768, 1024, 16


def _graph(fns_main, fns_side):
    side = torch.cuda.Stream()
    for f in fns_main + fns_side:  # compile / warm outside the capture
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cap = torch.cuda.current_stream()
        side.wait_stream(cap)
        with torch.cuda.stream(side):
            for f in fns_side:
                f()
        for f in fns_main:
            f()
        cap.wait_stream(side)
    return g


def run(out_path: str | None = None, reps: int = 20) -> dict:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    host = torch.empty((1 << 31) // 4, dtype=torch.int32, pin_memory=True)
    host.view(torch.uint8)[::4096].fill_(3)
    n_host = host.numel() * 4 // CHUNK
    buf = torch.empty(COUNT * CHUNK // 4, dtype=torch.int32, device=dev)
    width = COUNT * HOLES
    src = torch.full((width,), -1, dtype=torch.int64, device=dev)
    dst = torch.full((width,), -1, dtype=torch.int64, device=dev)
    pos = torch.randperm(width, generator=g, device=dev)[:COUNT]
    src.scatter_(0, pos, torch.randperm(n_host, generator=g, device=dev)[:COUNT])
    dst.scatter_(0, pos, torch.arange(COUNT, device=dev))
    x = torch.randn(32, 4096, dtype=torch.bfloat16, device=dev, generator=g)
    ws = [torch.randn(4096, 14336, dtype=torch.bfloat16, device=dev, generator=g) / 64 for _ in range(4)]

    def chain(n):
        def compute():
            for _ in range(n):
                for w in ws:
                    x @ w
        return compute

    compute = chain(4)
    # HBM-bound work, as most of a decode step beside its gather is (attention, scoring): one elementwise pass over
    # 128 MiB in and out per link of the chain.
    big_in = torch.randn(1 << 26, dtype=torch.bfloat16, device=dev, generator=g)
    big_out = torch.empty_like(big_in)

    def memory_chain(n):
        def compute():
            for _ in range(n):
                torch.add(big_in, 1.0, out=big_out)
        return compute

    copies = {f"gather_grid{width}": lambda: copy_chunks(host, buf, src, dst, CHUNK),
              "gather_persistent33": lambda: copy_chunks(host, buf, src, dst, CHUNK, programs=33),
              "gather_persistent132": lambda: copy_chunks(host, buf, src, dst, CHUNK, programs=132),
              "copy_engine": lambda: buf.copy_(host[: buf.numel()], non_blocking=True)}
    t_compute = time_cuda(_graph([compute], []).replay, reps=reps)
    res = {"env": environment(), "chunk_bytes": CHUNK, "count": COUNT, "compute_alone_s": t_compute, "rows": []}
    for name, fn in copies.items():
        t_copy = time_cuda(_graph([], [fn]).replay, reps=reps)
        t_both = time_cuda(_graph([compute], [fn]).replay, reps=reps)
        hidden = t_compute + t_copy - t_both
        res["rows"].append({"copy": name, "copy_alone_s": t_copy, "both_s": t_both,
                            "copy_GBps": COUNT * CHUNK / t_copy / 1e9,
                            "overlap": hidden / min(t_compute, t_copy)})
    # The same copy beside compute chains of other lengths. One length cannot tell compute slowed beside the copy
    # from the copy slowed beside compute (either explains a "both" time above the longer one); the excess over the
    # longer op as the chain grows past the copy does: it stays near s * copy / (1 + s) if compute is what slows,
    # and falls to 0 if the copy is what slows (a copy hidden under a longer chain costs it nothing).
    res["lengths"] = []
    for n in (1, 2, 4, 8, 16):
        t_c = time_cuda(_graph([chain(n)], []).replay, reps=reps)
        row = {"gemm_sets": n, "compute_alone_s": t_c}
        for name in ("gather_persistent33", "copy_engine"):
            t_copy = time_cuda(_graph([], [copies[name]]).replay, reps=reps)
            row[name] = {"copy_alone_s": t_copy, "both_s": time_cuda(_graph([chain(n)], [copies[name]]).replay,
                                                                       reps=reps)}
        res["lengths"].append(row)
    res["memory_lengths"] = []
    t_g = time_cuda(_graph([], [copies["gather_persistent33"]]).replay, reps=reps)
    for n in (2, 4, 8, 16, 32):
        t_c = time_cuda(_graph([memory_chain(n)], []).replay, reps=reps)
        both = time_cuda(_graph([memory_chain(n)], [copies["gather_persistent33"]]).replay, reps=reps)
        res["memory_lengths"].append({"passes": n, "bytes_per_pass": 2 * big_in.numel() * 2, "compute_alone_s": t_c,
                                      "gather_persistent33": {"copy_alone_s": t_g, "both_s": both}})
    if out_path:
        write_json(out_path, res)
    return res


def table(res: dict) -> str:
    lines = [f"overlap: compute alone {res['compute_alone_s'] * 1e3:.3f} ms",
             "overlap: copy                      alone ms  GB/s   both ms  overlap"]
    for r in res["rows"]:
        lines.append(f"overlap: {r['copy']:24s} {r['copy_alone_s'] * 1e3:8.3f} {r['copy_GBps']:5.1f} "
                     f"{r['both_s'] * 1e3:8.3f}   {r['overlap']:5.2f}")
    for r in res.get("lengths", []):
        g = r["gather_persistent33"]
        lines.append(f"overlap: {r['gemm_sets']:2d} GEMM sets: compute {r['compute_alone_s'] * 1e3:7.3f} ms, gather33 "
                     f"{g['copy_alone_s'] * 1e3:6.3f}, both {g['both_s'] * 1e3:7.3f}, excess over the longer "
                     f"{(g['both_s'] - max(r['compute_alone_s'], g['copy_alone_s'])) * 1e3:6.3f} ms")
    for r in res.get("memory_lengths", []):
        g = r["gather_persistent33"]
        lines.append(f"overlap: {r['passes']:2d} HBM passes: compute {r['compute_alone_s'] * 1e3:7.3f} ms, gather33 "
                     f"{g['copy_alone_s'] * 1e3:6.3f}, both {g['both_s'] * 1e3:7.3f}, excess over the longer "
                     f"{(g['both_s'] - max(r['compute_alone_s'], g['copy_alone_s'])) * 1e3:6.3f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run(sys.argv[1] if len(sys.argv) > 1 else None)))
