"""Chunk copies between the pinned host store and the GPU block pool, driven by index lists made on the GPU.

One primitive serves every transfer of the runtime: ``dst.chunk[dst_idx[i]] = src.chunk[src_idx[i]]`` for all ``i``
whose two indices are >= 0 (a -1 skips the entry). Host to device (misses), device to host (write-back of a
completed tail) and device to device (admitting that tail into a regular slot) are all this copy.

Why a kernel and not ``cudaMemcpyAsync``: one small copy costs about 17 us, so per-block copies reach under 1 GB/s,
while a kernel that reads *mapped* pinned memory keeps thousands of chunk reads in flight and reaches the link's
peak (DESIGN.md). Why index lists with -1 holes instead of a compacted list: compaction would need the miss count
on the host (a sync) or a scan; a fixed grid over all ``rows * k`` candidates, most of which exit at once, keeps
the launch shape static, so it also replays inside a CUDA graph.
"""

from __future__ import annotations

import torch

try:  # Triton is only on GPU machines; the torch path below computes the same function.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None

if triton is not None:

    @triton.jit
    def _copy_chunks_kernel(src, dst, src_idx, dst_idx, CH: tl.constexpr, SUB: tl.constexpr):
        # One program copies SUB words of one chunk; program_id(1) picks which part, so small grids still put
        # enough independent loads on the link.
        i = tl.program_id(0)
        part = tl.program_id(1)
        s = tl.load(src_idx + i).to(tl.int64)
        d = tl.load(dst_idx + i).to(tl.int64)
        if (s >= 0) & (d >= 0):
            offs = part * SUB + tl.arange(0, SUB)
            v = tl.load(src + s * CH + offs)
            tl.store(dst + d * CH + offs, v)


    @triton.jit
    def _copy_chunks_persistent(src, dst, src_idx, dst_idx, n, CH: tl.constexpr, P: tl.constexpr,
                                ITERS: tl.constexpr):
        # P programs stride over the n entries (interleaved, so the misses of cold rows spread over all of them).
        # A few programs keep enough chunk reads in flight to fill the link while leaving the SMs to the compute
        # kernels that run beside the copy when micro-batches overlap.
        offs = tl.arange(0, CH)
        pid = tl.program_id(0)
        # The trip count is a constexpr (one compile per launch shape, which is fixed in a decode run): Triton's
        # CPU interpreter can't loop to a runtime bound.
        for it in range(ITERS):
            i = it * P + pid
            if i < n:
                s = tl.load(src_idx + i).to(tl.int64)
                d = tl.load(dst_idx + i).to(tl.int64)
                if (s >= 0) & (d >= 0):
                    tl.store(dst + d * CH + offs, tl.load(src + s * CH + offs))


def _as_words(t: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    """Flat 32-bit view of a contiguous buffer, so one kernel moves bf16, fp16 and fp32 alike."""
    if not t.is_contiguous():
        raise ValueError("copy_chunks: buffers must be contiguous")
    if chunk_bytes % 4 or t.numel() * t.element_size() % chunk_bytes:
        raise ValueError(f"copy_chunks: buffer of {t.numel() * t.element_size()} bytes is not a whole number of "
                         f"{chunk_bytes}-byte chunks")
    return t.view(-1).view(torch.int32) if t.dtype != torch.int32 else t.view(-1)


def copy_chunks(src: torch.Tensor, dst: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor,
                chunk_bytes: int, *, split: int = 1, num_warps: int = 4, programs: int = 0,
                use_triton: bool | None = None) -> None:
    """Copy chunk ``src_idx[i]`` of ``src`` to chunk ``dst_idx[i]`` of ``dst`` where both are >= 0.

    ``src`` / ``dst``: contiguous tensors (either may be pinned host memory when the kernel runs: it reads and writes
    mapped host memory directly). ``split``: programs per chunk. ``programs`` > 0: that many persistent programs
    loop over the entries instead (one chunk at a time each). Indices must be on the device that runs the copy.
    """
    if src_idx.shape != dst_idx.shape:
        raise ValueError(f"copy_chunks: src_idx {tuple(src_idx.shape)} and dst_idx {tuple(dst_idx.shape)} differ")
    words = chunk_bytes // 4
    s, d = _as_words(src, chunk_bytes), _as_words(dst, chunk_bytes)
    si, di = src_idx.reshape(-1), dst_idx.reshape(-1)
    if use_triton is None:
        use_triton = triton is not None and si.is_cuda
    if use_triton:
        if words % split or (words // split) & (words // split - 1):
            raise ValueError(f"copy_chunks: chunk of {words} words does not split into {split} power-of-two parts")
        n = si.numel()
        if n and programs > 0:
            p = min(programs, n)
            _copy_chunks_persistent[(p,)](s, d, si, di, n, CH=words, P=p, ITERS=-(-n // p), num_warps=num_warps)
        elif n:
            _copy_chunks_kernel[(n, split)](s, d, si, di, CH=words, SUB=words // split, num_warps=num_warps)
        return
    ok = (si >= 0) & (di >= 0)
    s2, d2 = s.view(-1, words), d.view(-1, words)
    d2[di[ok].to(d2.device).long()] = s2[si[ok].to(s2.device).long()].to(d2.device)
