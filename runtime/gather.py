"""Chunk copies between the pinned host store and the GPU block pool, driven by index lists made on the GPU.

One primitive serves every transfer of the runtime: ``dst.chunk[dst_idx[i]] = src.chunk[src_idx[i]]`` for all ``i``
whose two indices are >= 0 (a -1 skips the entry). Host to device (misses), device to host (write-back of a
completed tail) and device to device (admitting that tail into a regular slot) are all this copy.

Why a kernel and not ``cudaMemcpyAsync``: one small copy costs about 17 us, so per-block copies reach under 1 GB/s,
while a kernel that reads *mapped* pinned memory keeps thousands of chunk reads in flight and reaches the link's
peak (docs/runtime.md). Why index lists with -1 holes instead of a compacted list: compaction would need the miss count
on the host (a sync) or a scan; a fixed grid over all ``rows * k`` candidates, most of which exit at once, keeps
the launch shape static, so it also replays inside a CUDA graph.

``copy_chunks_lists`` runs up to four such lists in one launch: a layer's write-back, tail admission and miss
gather then cost one kernel launch (one graph node) instead of three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .dispatch import kernels_on

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


    @triton.jit
    def _copy_entry(src, dst, src_idx, dst_idx, j, offs, CH: tl.constexpr):
        # Entry j of one list: the words ``offs`` of chunk src_idx[j] to the same words of chunk dst_idx[j].
        s = tl.load(src_idx + j).to(tl.int64)
        d = tl.load(dst_idx + j).to(tl.int64)
        if (s >= 0) & (d >= 0):
            tl.store(dst + d * CH + offs, tl.load(src + s * CH + offs))


    @triton.jit
    def _copy_lists_entry(i, offs, s0, d0, si0, di0, e0, s1, d1, si1, di1, e1, s2, d2, si2, di2, e2,
                          s3, d3, si3, di3, e3, CH: tl.constexpr, NL: tl.constexpr):
        # Entry i of the concatenated lists; e_l is where list l ends. The lists are separate arguments rather
        # than one pointer table because their buffers differ (host store, pool) and so may their index dtypes;
        # NL is a constexpr, so the branches of absent lists are not compiled at all. i past the last end: no-op.
        if i < e0:
            _copy_entry(s0, d0, si0, di0, i, offs, CH)
        if NL > 1:
            if (i >= e0) & (i < e1):
                _copy_entry(s1, d1, si1, di1, i - e0, offs, CH)
        if NL > 2:
            if (i >= e1) & (i < e2):
                _copy_entry(s2, d2, si2, di2, i - e1, offs, CH)
        if NL > 3:
            if (i >= e2) & (i < e3):
                _copy_entry(s3, d3, si3, di3, i - e2, offs, CH)


    @triton.jit
    def _copy_lists_kernel(s0, d0, si0, di0, e0, s1, d1, si1, di1, e1, s2, d2, si2, di2, e2,
                           s3, d3, si3, di3, e3, CH: tl.constexpr, SUB: tl.constexpr, NL: tl.constexpr):
        # As _copy_chunks_kernel, over all entries of all lists: program_id(0) is the entry, (1) the part.
        offs = tl.program_id(1) * SUB + tl.arange(0, SUB)
        _copy_lists_entry(tl.program_id(0), offs, s0, d0, si0, di0, e0, s1, d1, si1, di1, e1,
                          s2, d2, si2, di2, e2, s3, d3, si3, di3, e3, CH, NL)


    @triton.jit
    def _copy_lists_persistent(s0, d0, si0, di0, e0, s1, d1, si1, di1, e1, s2, d2, si2, di2, e2,
                               s3, d3, si3, di3, e3, CH: tl.constexpr, P: tl.constexpr, ITERS: tl.constexpr,
                               NL: tl.constexpr):
        # As _copy_chunks_persistent: P programs stride over the concatenated entries, so each list's entries
        # spread over all programs however unequal the lists are.
        offs = tl.arange(0, CH)
        pid = tl.program_id(0)
        for it in range(ITERS):
            _copy_lists_entry(it * P + pid, offs, s0, d0, si0, di0, e0, s1, d1, si1, di1, e1,
                              s2, d2, si2, di2, e2, s3, d3, si3, di3, e3, CH, NL)


    @triton.jit
    def _block_indices(si, di, start, end, i, s_vec, d_vec):
        # One list's share of an entry block: its indices where the block's entries i fall in [start, end).
        m = (i >= start) & (i < end)
        s_vec = tl.where(m, tl.load(si + (i - start), mask=m, other=-1).to(tl.int64), s_vec)
        d_vec = tl.where(m, tl.load(di + (i - start), mask=m, other=-1).to(tl.int64), d_vec)
        return s_vec, d_vec

    @triton.jit
    def _copy_lists_blocked(s0, d0, si0, di0, e0, s1, d1, si1, di1, e1, s2, d2, si2, di2, e2,
                            s3, d3, si3, di3, e3, CH: tl.constexpr, EPB: tl.constexpr, P: tl.constexpr,
                            ITERS: tl.constexpr, NL: tl.constexpr):
        # P programs take blocks of EPB entries (block pid, pid + P, ...). A block's indices are read with one
        # vector load per list, so a launch whose entries are mostly holes (-1) costs a few hundred programs
        # and one load latency each, not a program per entry; then the block's copies run one after another.
        offs = tl.arange(0, CH)
        e = tl.arange(0, EPB)
        pid = tl.program_id(0)
        for it in range(ITERS):
            i = (it * P + pid) * EPB + e
            s_vec = tl.full([EPB], -1, tl.int64)
            d_vec = tl.full([EPB], -1, tl.int64)
            s_vec, d_vec = _block_indices(si0, di0, 0, e0, i, s_vec, d_vec)
            lid = tl.zeros([EPB], tl.int32)
            if NL > 1:
                s_vec, d_vec = _block_indices(si1, di1, e0, e1, i, s_vec, d_vec)
                lid += (i >= e0).to(tl.int32)
            if NL > 2:
                s_vec, d_vec = _block_indices(si2, di2, e1, e2, i, s_vec, d_vec)
                lid += (i >= e1).to(tl.int32)
            if NL > 3:
                s_vec, d_vec = _block_indices(si3, di3, e2, e3, i, s_vec, d_vec)
                lid += (i >= e2).to(tl.int32)
            live = (s_vec >= 0) & (d_vec >= 0)
            for j in range(EPB):
                pick = e == j
                if tl.sum((pick & live).to(tl.int32), axis=0) > 0:
                    s = tl.sum(tl.where(pick, s_vec, 0), axis=0)
                    d = tl.sum(tl.where(pick, d_vec, 0), axis=0)
                    lj = tl.sum(tl.where(pick, lid, 0), axis=0)
                    if lj == 0:
                        tl.store(d0 + d * CH + offs, tl.load(s0 + s * CH + offs))
                    if NL > 1:
                        if lj == 1:
                            tl.store(d1 + d * CH + offs, tl.load(s1 + s * CH + offs))
                    if NL > 2:
                        if lj == 2:
                            tl.store(d2 + d * CH + offs, tl.load(s2 + s * CH + offs))
                    if NL > 3:
                        if lj == 3:
                            tl.store(d3 + d * CH + offs, tl.load(s3 + s * CH + offs))


def _as_words(t: torch.Tensor, chunk_bytes: int, name: str = "copy_chunks") -> torch.Tensor:
    """Flat 32-bit view of a contiguous buffer, so one kernel moves bf16, fp16 and fp32 alike."""
    if not t.is_contiguous():
        raise ValueError(f"{name}: buffers must be contiguous")
    if chunk_bytes % 4 or t.numel() * t.element_size() % chunk_bytes:
        raise ValueError(f"{name}: buffer of {t.numel() * t.element_size()} bytes is not a whole number of "
                         f"{chunk_bytes}-byte chunks")
    return t.view(-1).view(torch.int32) if t.dtype != torch.int32 else t.view(-1)


def _copy_torch(s: torch.Tensor, d: torch.Tensor, si: torch.Tensor, di: torch.Tensor, words: int) -> None:
    """The function every kernel computes, as torch indexing (CPU path and reference)."""
    ok = (si >= 0) & (di >= 0)
    s2, d2 = s.view(-1, words), d.view(-1, words)
    d2[di[ok].to(d2.device).long()] = s2[si[ok].to(s2.device).long()].to(d2.device)


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
        use_triton = triton is not None and kernels_on(si)
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
    _copy_torch(s, d, si, di, words)


MAX_LISTS = 4  # the kernels take this many lists as separate arguments
# The runtime's launch of a layer's copies: blocks of 32 entries with vector-loaded indices. A program per entry
# spends most of a mostly-hit launch scheduling programs that exit at once (tens of thousands per layer at large
# batch); 32 entries a block keep hundreds of chunk reads in flight with a few hundred programs.
RUNTIME_BLOCK = 32


@dataclass(frozen=True)
class ChunkList:
    """One list of a ``copy_chunks_lists`` launch: chunk ``src_idx[i]`` of ``src`` to chunk ``dst_idx[i]`` of
    ``dst`` where both indices are >= 0 (``copy_chunks``'s arguments, bundled)."""

    src: torch.Tensor
    dst: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor


def copy_chunks_lists(lists: Sequence[ChunkList | tuple], chunk_bytes: int, *, split: int = 1,
                      num_warps: int = 4, programs: int = 0, use_triton: bool | None = None,
                      block: int = 0) -> None:
    """``copy_chunks`` for up to ``MAX_LISTS`` lists of chunk copies in ONE kernel launch.

    Each list (a ``ChunkList`` or a ``(src, dst, src_idx, dst_idx)`` tuple) has exactly ``copy_chunks``'s
    semantics: entries with a -1 index are skipped; ``src`` / ``dst`` may be pinned host memory, which the kernel
    reads and writes as mapped memory; the grid depends only on the lists' lengths, so the launch replays inside a
    CUDA graph. All lists share ``chunk_bytes``, ``split``, ``num_warps`` and ``programs`` (> 0: that many
    persistent programs stride over the entries of all lists together, leaving the other SMs to compute running
    beside the copy; 0: one program per entry and part). All index tensors must be on one device.

    The entries of all lists run concurrently, in no order: the caller guarantees that the lists do not conflict,
    i.e. no chunk written by an entry is read or written by any other entry of any list (several entries may read
    the same chunk). Where a copy must see another's result, use two launches. Without Triton or for CPU indices,
    the torch path copies list by list.
    """
    if len(lists) > MAX_LISTS:
        raise ValueError(f"copy_chunks_lists: lists holds {len(lists)} lists, at most {MAX_LISTS} per launch")
    name = "copy_chunks_lists"
    words = chunk_bytes // 4
    flat = []  # (src words, dst words, src_idx, dst_idx) per list
    for j, entry in enumerate(lists):
        if not isinstance(entry, ChunkList) and len(entry) != 4:
            raise ValueError(f"{name}: lists[{j}] has {len(entry)} items, not (src, dst, src_idx, dst_idx)")
        cl = entry if isinstance(entry, ChunkList) else ChunkList(*entry)
        if cl.src_idx.shape != cl.dst_idx.shape:
            raise ValueError(f"{name}: lists[{j}].src_idx {tuple(cl.src_idx.shape)} and lists[{j}].dst_idx "
                             f"{tuple(cl.dst_idx.shape)} differ")
        s = _as_words(cl.src, chunk_bytes, f"{name}: lists[{j}].src")
        d = _as_words(cl.dst, chunk_bytes, f"{name}: lists[{j}].dst")
        flat.append((s, d, cl.src_idx.reshape(-1), cl.dst_idx.reshape(-1)))
    if not flat:
        return
    dev = flat[0][2].device
    for j, (_, _, si, di) in enumerate(flat):
        for field, ix in (("src_idx", si), ("dst_idx", di)):
            if ix.device != dev:
                raise ValueError(f"{name}: lists[{j}].{field} is on {ix.device}, lists[0].src_idx on {dev}: "
                                 f"one launch reads all index lists on one device")
    if use_triton is None:
        use_triton = triton is not None and kernels_on(flat[0][2])
    if not use_triton:
        for s, d, si, di in flat:
            _copy_torch(s, d, si, di, words)
        return
    if words % split or (words // split) & (words // split - 1):
        raise ValueError(f"{name}: chunk of {words} words does not split into {split} power-of-two parts")
    args, end = [], 0
    for s, d, si, di in flat:
        end += si.numel()
        args += [s, d, si, di, end]
    n, nl = end, len(flat)
    if n == 0:
        return
    # Absent lists repeat list 0's buffers with the last end: never touched (NL prunes their branches), and
    # the kernels keep one signature whatever the number of lists.
    while len(args) < 5 * MAX_LISTS:
        args += [flat[0][0], flat[0][1], flat[0][2], flat[0][3], end]
    if block > 0:  # blocks of entries, indices read by vector loads (see _copy_lists_blocked)
        if block & (block - 1):
            raise ValueError(f"{name}: block must be a power of two, got {block}")
        nblk = -(-n // block)
        p = min(programs, nblk) if programs > 0 else nblk
        _copy_lists_blocked[(p,)](*args, CH=words, EPB=block, P=p, ITERS=-(-nblk // p), NL=nl,
                                  num_warps=num_warps)
    elif programs > 0:
        p = min(programs, n)
        _copy_lists_persistent[(p,)](*args, CH=words, P=p, ITERS=-(-n // p), NL=nl, num_warps=num_warps)
    else:
        _copy_lists_kernel[(n, split)](*args, CH=words, SUB=words // split, NL=nl, num_warps=num_warps)
