"""The chunk copy returns exactly the bytes of the requested chunks (checksums, poisoned destinations), skips
entries with a -1 index, and works host to device from pinned memory, device to host and device to device; several
lists in one launch (``copy_chunks_lists``) leave every buffer exactly as copying them one by one does."""

import pytest
import torch

from runtime.gather import MAX_LISTS, ChunkList, copy_chunks, copy_chunks_lists

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


# CPU runs the torch path; "kernel" runs the Triton kernels on CPU tensors in Triton's interpreter.
PATHS = [("cpu", None), pytest.param("cpu", True, marks=pytest.mark.triton, id="cpu-kernel"),
         pytest.param("cuda", None, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device,use_triton", PATHS)
@pytest.mark.parametrize("chunk_bytes,split,programs", [(8192, 1, 0), (16384, 2, 0), (32768, 1, 0), (32768, 4, 0),
                                                        (8192, 1, 7), (32768, 1, 64)])
@pytest.mark.parametrize("direction", ["h2d", "d2h", "d2d"])
def test_copy_chunks_exact(device, use_triton, chunk_bytes, split, programs, direction):
    g = torch.Generator().manual_seed(chunk_bytes + split)
    n_src, n_dst, n = 300, 200, 150
    words = chunk_bytes // 4
    pin = device == "cuda"
    src_dev = "cpu" if direction == "h2d" else device
    dst_dev = "cpu" if direction == "d2h" else device
    src = torch.randint(-2**31, 2**31 - 1, (n_src, words), generator=g, dtype=torch.int32)
    src = src.pin_memory() if pin and src_dev == "cpu" else src.to(src_dev)
    poison = -0x21524111  # 0xDEADBEEF: never produced by a correct copy of these sources
    dst = torch.full((n_dst, words), poison, dtype=torch.int32)
    dst = dst.pin_memory() if pin and dst_dev == "cpu" else dst.to(dst_dev)
    si = torch.randperm(n_src, generator=g)[:n]
    di = torch.randperm(n_dst, generator=g)[:n]
    skip = torch.rand(n, generator=g) < 0.2
    si = torch.where(skip, -1, si)
    copy_chunks(src.view(torch.bfloat16), dst.view(torch.bfloat16), si.to(device), di.to(device), chunk_bytes,
                split=split, programs=programs, use_triton=use_triton)
    if device == "cuda":
        torch.cuda.synchronize()
    d, s = dst.cpu(), src.cpu()
    ok = ~skip
    assert torch.equal(d[di[ok]], s[si[ok]])
    assert torch.equal(d[di[ok]].sum(1, dtype=torch.int64), s[si[ok]].sum(1, dtype=torch.int64))
    untouched = torch.ones(n_dst, dtype=torch.bool)
    untouched[di[ok]] = False
    assert (d[untouched] == poison).all()


def test_copy_chunks_rejects_bad_sizes():
    with pytest.raises(ValueError, match="chunks"):
        copy_chunks(torch.zeros(100), torch.zeros(128), torch.zeros(1, dtype=torch.long),
                    torch.zeros(1, dtype=torch.long), 512)


def _random_words(shape, g):
    return torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int32)


def _lists_case(seed, lens, words, dtype, device):
    """Buffers and ``len(lens)`` non-conflicting lists in the roles of a layer's copies: write-back pool -> host,
    tail admission pool -> pool (reading the same chunks as the write-back), misses host -> pool, and a buffer of
    another dtype -> pool. Every written chunk has one writer and is read by no entry. A quarter of the entries are
    holes (-1 in the source or the destination index); list 1 has int32 indices, the others int64.

    Returns (buffers by name, host ones pinned on CUDA; the lists as ChunkList with indices on ``device``)."""
    g = torch.Generator().manual_seed(seed)
    pin = device == "cuda"
    n0, n1, n2, n3 = (list(lens) + [0] * MAX_LISTS)[:MAX_LISTS]
    n_pool, n_host, n_aux = 2 * sum(lens) + 8, 2 * sum(lens) + 8, n3 + 5

    def place(words_tensor, host, as_dtype):
        x = words_tensor.view(as_dtype)
        return (x.pin_memory() if pin else x) if host else x.to(device)

    bufs = {"host": place(_random_words((n_host, words), g), True, dtype),
            "pool": place(_random_words((n_pool, words), g), False, dtype),
            "aux": place(_random_words((n_aux, words), g), False, torch.int16)}
    pool_perm, host_perm = torch.randperm(n_pool, generator=g), torch.randperm(n_host, generator=g)
    n_read = max(n0, n1)
    read, move_dst = pool_perm[:n_read], pool_perm[n_read:n_read + n1]
    miss_dst = pool_perm[n_read + n1:n_read + n1 + n2]
    aux_dst = pool_perm[n_read + n1 + n2:n_read + n1 + n2 + n3]
    idx = [(read[:n0], host_perm[:n0]), (read[:n1], move_dst), (host_perm[n0:n0 + n2], miss_dst),
           (torch.randperm(n_aux, generator=g)[:n3], aux_dst)]
    roles = [("pool", "host"), ("pool", "pool"), ("host", "pool"), ("aux", "pool")]
    lists = []
    for j in range(len(lens)):
        si, di = idx[j]
        hole = torch.rand(len(si), generator=g) < 0.25
        side = torch.rand(len(si), generator=g) < 0.5
        si, di = torch.where(hole & side, -1, si), torch.where(hole & ~side, -1, di)
        it = torch.int32 if j == 1 else torch.int64
        lists.append(ChunkList(bufs[roles[j][0]], bufs[roles[j][1]], si.to(device, it), di.to(device, it)))
    return bufs, lists


def _clone_case(bufs, lists):
    """The same case on copies of the buffers (pinned stays pinned), for the list-by-list reference."""
    new = {k: (v.clone().pin_memory() if v.is_pinned() else v.clone()) for k, v in bufs.items()}
    back = {id(v): k for k, v in bufs.items()}
    return new, [ChunkList(new[back[id(c.src)]], new[back[id(c.dst)]], c.src_idx, c.dst_idx) for c in lists]


def _words_cpu(t):
    return t.contiguous().view(-1).view(torch.int32).cpu()


# (chunk bytes, split, persistent programs, buffer dtype, list lengths): holes everywhere; empty lists; persistent
# programs fewer than, about as many as, and more than the entries; 1 to 4 lists.
LIST_CASES = [(8192, 1, 0, torch.bfloat16, (12, 12, 50, 20)), (16384, 2, 0, torch.float16, (7, 3, 40)),
              (32768, 1, 0, torch.float32, (10, 10, 30, 6)), (32768, 4, 0, torch.uint8, (5, 9)),
              (8192, 1, 5, torch.bfloat16, (12, 12, 50, 20)), (16384, 1, 33, torch.float32, (40,)),
              (32768, 1, 1000, torch.float16, (4, 0, 25, 3)), (8192, 1, 0, torch.bfloat16, (0, 6, 0, 9)),
              (8192, 1, 3, torch.int32, (0, 0, 17))]
LIST_CASES = [c + (0,) for c in LIST_CASES] + [
    # Blocks of entries whose indices are read by vector loads (the runtime's default): one program per block, or
    # persistent programs over the blocks; blocks cut across lists.
    (32768, 1, 0, torch.bfloat16, (12, 12, 50, 20), 32), (8192, 1, 5, torch.float32, (40, 3), 8),
    (16384, 1, 0, torch.uint8, (0, 6, 0, 9), 16), (32768, 1, 2, torch.bfloat16, (4, 0, 25, 3), 4)]


@pytest.mark.parametrize("device,use_triton", PATHS)
@pytest.mark.parametrize("chunk_bytes,split,programs,dtype,lens,block", LIST_CASES,
                         ids=[f"{c // 1024}K-s{s}-p{p}-{str(d).split('.')[1]}-lens{'_'.join(map(str, n))}-b{b}"
                              for c, s, p, d, n, b in LIST_CASES])
def test_copy_chunks_lists_equals_list_by_list(device, use_triton, chunk_bytes, split, programs, dtype, lens, block):
    bufs, lists = _lists_case(chunk_bytes + 7 * programs + len(lens), lens, chunk_bytes // 4, dtype, device)
    before = {k: _words_cpu(v) for k, v in bufs.items()}
    ref_bufs, ref_lists = _clone_case(bufs, lists)
    for c in ref_lists:
        copy_chunks(c.src, c.dst, c.src_idx, c.dst_idx, chunk_bytes, split=split, programs=programs,
                    use_triton=use_triton)
    copy_chunks_lists(lists, chunk_bytes, split=split, programs=programs, use_triton=use_triton, block=block)
    if device == "cuda":
        torch.cuda.synchronize()
    words = chunk_bytes // 4
    for k in bufs:  # every buffer, byte for byte, as the three (or four) separate launches leave it
        assert torch.equal(_words_cpu(bufs[k]), _words_cpu(ref_bufs[k])), k
    # And independently of copy_chunks: each valid entry's destination holds its source's original bytes (no
    # entry writes a chunk another reads), every other chunk is as it was.
    back = {id(v): k for k, v in bufs.items()}
    written = {k: torch.zeros(len(v) // words, dtype=torch.bool) for k, v in before.items()}
    for c in lists:
        s, d = back[id(c.src)], back[id(c.dst)]
        si, di = c.src_idx.long().cpu(), c.dst_idx.long().cpu()
        ok = (si >= 0) & (di >= 0)
        got = _words_cpu(bufs[d]).view(-1, words)[di[ok]]
        assert torch.equal(got, before[s].view(-1, words)[si[ok]])
        written[d][di[ok]] = True
    for k, v in before.items():
        assert torch.equal(_words_cpu(bufs[k]).view(-1, words)[~written[k]], v.view(-1, words)[~written[k]]), k
    assert sum(int(w.sum()) for w in written.values()) > 0 or sum(lens) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("programs,block", [(0, 0), (33, 0), (0, 32), (33, 32)])
def test_copy_chunks_lists_replays_in_a_cuda_graph(programs, block):
    """Captured once, replayed with the index lists refilled in place: each replay equals eager list-by-list
    copies of the same lists (the launch shape depends on the lengths only)."""
    chunk_bytes, lens = 32768, (16, 16, 200, 8)
    bufs, lists = _lists_case(0, lens, chunk_bytes // 4, torch.bfloat16, "cuda")
    start = {k: v.clone() for k, v in bufs.items()}
    fn = lambda: copy_chunks_lists(lists, chunk_bytes, programs=programs, block=block)  # noqa: E731
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for seed in (1, 2):
        _, fresh = _lists_case(seed, lens, chunk_bytes // 4, torch.bfloat16, "cuda")
        for c, f in zip(lists, fresh):
            c.src_idx.copy_(f.src_idx)
            c.dst_idx.copy_(f.dst_idx)
        for k, v in bufs.items():
            v.copy_(start[k])
        ref_bufs, ref_lists = _clone_case(bufs, lists)
        for c in ref_lists:
            copy_chunks(c.src, c.dst, c.src_idx, c.dst_idx, chunk_bytes, programs=programs)
        graph.replay()
        torch.cuda.synchronize()
        for k in bufs:
            assert torch.equal(_words_cpu(bufs[k]), _words_cpu(ref_bufs[k])), (seed, k)


def test_copy_chunks_lists_rejects_bad_input():
    z = torch.zeros(4, 1024)
    idx = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="at most 4"):
        copy_chunks_lists([(z, z, idx, idx)] * 5, 4096)
    with pytest.raises(ValueError, match=r"lists\[1\]\.src_idx \(2,\) and lists\[1\]\.dst_idx \(3,\)"):
        copy_chunks_lists([(z, z, idx, idx), (z, z, idx, torch.zeros(3, dtype=torch.long))], 4096)
    with pytest.raises(ValueError, match=r"lists\[1\]\.dst: buffer of 400 bytes"):
        copy_chunks_lists([(z, z, idx, idx), (z, torch.zeros(100), idx, idx)], 4096)
    with pytest.raises(ValueError, match=r"lists\[0\]\.src: buffers must be contiguous"):
        copy_chunks_lists([(z.t(), z, idx, idx)], 4096)
    with pytest.raises(ValueError, match=r"lists\[1\]\.dst_idx is on meta"):
        copy_chunks_lists([(z, z, idx, idx), (z, z, idx, torch.zeros(2, dtype=torch.long, device="meta"))], 4096)
    with pytest.raises(ValueError, match=r"lists\[0\] has 3 items"):
        copy_chunks_lists([(z, z, idx)], 4096)
    with pytest.raises(ValueError, match="split"):
        copy_chunks_lists([(z, z, idx, idx)], 4096, split=3, use_triton=True)


def test_copy_chunks_lists_without_lists_or_entries_does_nothing():
    z = torch.ones(4, 1024)
    copy_chunks_lists([], 4096)
    copy_chunks_lists([(z, z, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))], 4096)
    assert (z == 1).all()


def test_overlap_slowdown_reproduces_the_overlap_benchmark():
    """The profile's slowdown, put back into the simulator's compute_end, gives the measured time of the GEMM chain
    and the gather together (runtime_overlap.json, H100)."""
    import json
    from pathlib import Path

    from nosasim.sim.schedule import compute_end
    from runtime.calibrate import OVERLAP_COPY, overlap_slowdown

    res = json.loads((Path(__file__).resolve().parents[1] / "analysis/results/runtime_overlap.json").read_text())
    s = overlap_slowdown(res)
    row = next(r for r in res["rows"] if r["copy"] == OVERLAP_COPY)
    assert 0.1 < s < 0.5
    assert float(compute_end(0.0, res["compute_alone_s"], row["copy_alone_s"], s)) == pytest.approx(row["both_s"])
    serial = dict(res, rows=[dict(row, both_s=res["compute_alone_s"] + row["copy_alone_s"])])
    assert overlap_slowdown(serial) > s  # no overlap at all reads as a larger slowdown
