"""The chunk copy returns exactly the bytes of the requested chunks (checksums, poisoned destinations), skips
entries with a -1 index, and works host to device from pinned memory, device to host and device to device."""

import pytest
import torch

from runtime.gather import copy_chunks

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
