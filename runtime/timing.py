"""CUDA-event timing and run metadata shared by calibration and the benchmarks."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import subprocess

import torch

from nosasim.atomic import atomic_write


def time_cuda(fn, reps: int = 20, warmup: int = 3, setup=None) -> float:
    """Median seconds of ``fn()`` over ``reps`` event-timed calls; ``setup(i)`` runs untimed before call ``i``
    (rotating inputs, so repeated calls don't measure a warm cache)."""
    for i in range(warmup):
        if setup:
            setup(i)
        fn()
    torch.cuda.synchronize()
    out = []
    for i in range(reps):
        if setup:
            setup(i)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out)


def time_graph(fn, inner: int = 10, reps: int = 10) -> float:
    """Median seconds per ``fn()`` with ``inner`` calls captured in one CUDA graph and replayed: the GPU-side cost
    without the host's launch gaps, which is what a decode step replayed from a graph pays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    return time_cuda(g.replay, reps=reps, warmup=2) / inner


def hbm_copy_peak(device="cuda", nbytes: int = 1 << 30) -> float:
    """HBM bandwidth as the project measures it: bytes read plus written per second by a 1 GiB device-to-device
    copy (the calibration's ``hbm_Bps`` and every benchmark's reference)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(3)
    y = torch.empty_like(x)
    rate = 2 * nbytes / time_cuda(lambda: y.copy_(x), reps=10)
    del x, y
    torch.cuda.empty_cache()
    return rate


def host_memory_bytes() -> int:
    """The host's physical memory: where every offloaded sequence's KV history lives (pinned)."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def environment() -> dict:
    """Device, driver and library versions plus the date: stored with every result."""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
           "host_memory_bytes": host_memory_bytes()}
    for mod in ("triton", "cupy", "numpy", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            env[mod] = f"unavailable: {type(exc).__name__}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, sms=p.multi_processor_count, gpu_memory_bytes=p.total_memory,
                   cuda=torch.version.cuda)
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as exc:  # noqa: BLE001
            env["driver"] = f"unavailable: {exc}"
    return env


def write_json(path: str, data: dict) -> None:
    """Write atomically: never a half-written result."""
    atomic_write(path, json.dumps(data, indent=1).encode())
