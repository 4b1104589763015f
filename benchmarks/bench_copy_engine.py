"""Does the copy engine beat the SM gather? Chunks from random rows of pinned host memory to random pool slots.

Run: ``PYTHONPATH=. python benchmarks/bench_copy_engine.py [out.json]`` or, in a device call,
``python -m runtime.device_suite --stages bench:copy_engine``. N chunks (16 and 32 KiB; N = 256, 1,024, 4,096) move
host to device from a 2 GiB pinned buffer (fresh random rows each repetition, so nothing is served from a cache)
to random slots of a 256 MiB device pool, by:

- ``triton_grid`` / ``triton_p33``: the runtime's ``copy_chunks`` (one program per chunk; 33 persistent programs);
- ``ce_batch``: the copy engine's batched copy ``cudaMemcpyBatchAsync`` (CUDA 12.8+) through ``cuda.bindings.runtime``
  (CuPy exposes no batched copy; the run records whether it does), one stream-ordered attribute for all copies;
  ``ce_batch_ctypes`` is the same call into libcudart with numpy pointer arrays, i.e. without the Python lists that
  cuda-bindings converts entry by entry: the call's own host cost;
- ``cupy_raw_grid`` / ``cupy_raw_33``: a CuPy RawKernel gather in CUDA C (16-byte vector loads, each thread issuing
  its loads before its stores, blocks striding over the entries): the SM copy written without Triton;
- ``ce_per_chunk``: one ``cudaMemcpyAsync`` per chunk, the known slow baseline (N <= 1,024).

Timing: every copy is issued eagerly behind a sleep kernel long enough to hide the host's issue time, and CUDA
events bracket only the GPU's work, so all methods are timed alike (the batch API cannot be captured in a graph,
which the run verifies; Triton's launch cost then vanishes as it does under graphs). The host's issue time is
recorded beside it. Rates are against a 1 GiB pinned ``cudaMemcpy`` in the same run. Every method's copy is checked
against the host bytes once per configuration.

Beside a GEMM chain (as ``bench_overlap.py``, on another stream, 1,024 x 32 KiB): compute alone, copy alone, both;
overlap = hidden time / the shorter one. And what only the copy engine needs: the index lists on the host, i.e. a
device-to-host copy of a layer's ``[R*K]`` int64 indices plus a stream synchronize, the compaction of the -1 holes
and the pointer lists, then the issue, per layer (a decode step has 32), with the GPU idle across the sync.
Each method runs under its own try/except: a failing one records its error and the others still run.
"""

from __future__ import annotations

import ctypes
import glob
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch

from runtime.gather import copy_chunks
from runtime.timing import environment, write_json

CHUNKS = (16384, 32768)
COUNTS = (256, 1024, 4096)
PER_CHUNK_MAX = 1024  # one cudaMemcpyAsync per chunk costs microseconds each: capped
HOST_BYTES = 2 << 30  # >= 2 GiB of pinned rows, far beyond any cache
POOL_BYTES = 256 << 20  # 8,192 slots of 32 KiB: room for the largest batch and the index-path test
PERSISTENT = 33  # the runtime's overlap setting (runtime_overlap.json: 33 programs leave the SMs to compute)
SETS = 4  # index sets rotated over the repetitions
REPS = 10
OVERLAP = (32768, 1024)  # bench_overlap's copy: 1,024 blocks of 32 KiB
INDEX_ENTRIES = (4096, 32768, 131072)  # a layer's R*K candidates (llama3-8b: 8 KV heads x batch x k = 64)
INDEX_VALID = 16  # 1 in 16 candidates is a miss, as bench_overlap's sparse grid
LAYERS = 32
RAW_THREADS = 256

# Each thread loads UNROLL 16-byte vectors before it stores any, so a block keeps 256 * 8 * 16 B = 32 KiB (one
# whole chunk) of reads in flight; blocks stride over the entries, so a small grid (33) loops as Triton's
# persistent programs do.
_RAW_SRC = r"""
#define UNROLL 8
extern "C" __global__ void __launch_bounds__(256)
gather_chunks(const uint4* __restrict__ src, uint4* __restrict__ dst, const long long* __restrict__ src_idx,
              const long long* __restrict__ dst_idx, long long n, int vecs)
{
    for (long long e = blockIdx.x; e < n; e += gridDim.x) {
        const long long s = src_idx[e], d = dst_idx[e];
        if (s < 0 || d < 0) continue;
        const uint4* sp = src + s * vecs;
        uint4* dp = dst + d * vecs;
        for (int base = threadIdx.x; base < vecs; base += UNROLL * blockDim.x) {
            uint4 r[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int v = base + u * blockDim.x;
                if (v < vecs) r[u] = sp[v];
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int v = base + u * blockDim.x;
                if (v < vecs) dp[v] = r[u];
            }
        }
    }
}
"""


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:400]}"


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


class _Bindings:
    """``cuda.bindings.runtime``: the batched copy, one copy per chunk, graph capture, versions."""

    def __init__(self, prefer_overlap: bool = False):
        from cuda.bindings import runtime as rt

        self.rt = rt
        if not hasattr(rt, "cudaMemcpyBatchAsync"):
            raise RuntimeError("cuda.bindings.runtime has no cudaMemcpyBatchAsync (needs CUDA 12.8+ bindings)")
        self.attr = self._attributes(prefer_overlap)

    def _attributes(self, prefer_overlap: bool):
        rt = self.rt
        attr = rt.cudaMemcpyAttributes()
        # Stream order: the copy must see the index lists and the pool as the stream left them.
        attr.srcAccessOrder = rt.cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderStream
        if prefer_overlap:  # a hint; the struct starts zeroed, i.e. cudaMemcpyFlagDefault
            flag = rt.cudaMemcpyFlags.cudaMemcpyFlagPreferOverlapWithCompute
            try:
                attr.flags = flag
            except TypeError:  # a plain unsigned int field in some versions
                attr.flags = int(getattr(flag, "value", flag))
        return attr

    def check(self, res, what: str) -> None:
        # The first element of every call's tuple is the error; 12.x bindings add failIdx after it.
        if res[0] != self.rt.cudaError_t.cudaSuccess:
            self.rt.cudaGetLastError()  # don't leave it for the next launch to report
            raise RuntimeError(f"{what}: {res[0]!r}")

    def batch(self, dsts: list, srcs: list, sizes: list) -> None:
        rt = self.rt
        self.check(rt.cudaMemcpyBatchAsync(dsts, srcs, sizes, len(dsts), [self.attr], [0], 1,
                                           rt.cudaStream_t(_stream())), "cudaMemcpyBatchAsync")

    def per_chunk(self, dsts: list, srcs: list, size: int) -> None:
        rt, s = self.rt, self.rt.cudaStream_t(_stream())
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        for d, src in zip(dsts, srcs):
            self.check(rt.cudaMemcpyAsync(d, src, size, kind, s), "cudaMemcpyAsync")

    def versions(self) -> dict:
        rt, out = self.rt, {}
        for name, fn in (("cuda_runtime_version", rt.cudaRuntimeGetVersion),
                         ("cuda_driver_version", rt.cudaDriverGetVersion)):
            try:
                res = fn()
                out[name] = int(res[1]) if res[0] == rt.cudaError_t.cudaSuccess else repr(res[0])
            except Exception as exc:  # noqa: BLE001 - recorded, not fatal
                out[name] = _err(exc)
        return out

    def capture(self, fn) -> dict:
        """Try to capture ``fn()`` on a fresh stream (thread-local mode, so nothing else is affected); record each
        step's status, then drop the graph."""
        rt = self.rt
        side = torch.cuda.Stream()
        out = {}
        res = rt.cudaStreamBeginCapture(rt.cudaStream_t(side.cuda_stream),
                                        rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        out["begin"] = repr(res[0])
        if res[0] != rt.cudaError_t.cudaSuccess:
            return out
        try:
            with torch.cuda.stream(side):
                fn()
            out["call"] = "ok"
        except Exception as exc:  # noqa: BLE001 - the point of the probe
            out["call"] = _err(exc)
        res = rt.cudaStreamEndCapture(rt.cudaStream_t(side.cuda_stream))
        out["end"] = repr(res[0])
        out["captured"] = res[0] == rt.cudaError_t.cudaSuccess and out["call"] == "ok"
        if res[0] == rt.cudaError_t.cudaSuccess and len(res) > 1 and res[1] is not None and int(res[1]):
            rt.cudaGraphDestroy(res[1])
        rt.cudaGetLastError()
        torch.cuda.synchronize()
        return out


class _CudartCtypes:
    """``cudaMemcpyBatchAsync`` called from ctypes with numpy pointer arrays: the same driver path as
    ``_Bindings.batch`` without converting Python lists, which is the API's own host cost. Uses the libcudart that
    torch loaded (the first name that resolves); the signature is chosen by that library's version (12.8/12.9 take a
    ``failIdx`` before the stream, 13.x do not). Only ``srcAccessOrder`` (the struct's first field) is set."""

    class _Attr(ctypes.Structure):
        # struct cudaMemcpyAttributes {srcAccessOrder; cudaMemLocation srcLocHint, dstLocHint; unsigned flags}
        _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocType", ctypes.c_int), ("srcLocId", ctypes.c_int),
                    ("dstLocType", ctypes.c_int), ("dstLocId", ctypes.c_int), ("flags", ctypes.c_uint)]

    def __init__(self):
        self.lib, self.path = self._load()
        ver = ctypes.c_int(0)
        if self.lib.cudaRuntimeGetVersion(ctypes.byref(ver)) != 0:
            raise RuntimeError("cudaRuntimeGetVersion failed")
        self.version = ver.value
        if self.version < 12080:
            raise RuntimeError(f"libcudart {self.version} predates cudaMemcpyBatchAsync (12.8)")
        self.fail_idx = self.version < 13000
        fn = self.lib.cudaMemcpyBatchAsync
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        fn.argtypes = [vp, vp, vp, sz, vp, vp, sz] + ([vp] if self.fail_idx else []) + [vp]
        fn.restype = ctypes.c_int
        self.fn = fn
        self.lib.cudaGetLastError.restype = ctypes.c_int
        self.attr = self._Attr(srcAccessOrder=1)  # cudaMemcpySrcAccessOrderStream
        self.attr_idx = (ctypes.c_size_t * 1)(0)
        self.failed = ctypes.c_size_t(0)

    @staticmethod
    def _load():
        names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
        roots = [os.path.dirname(torch.__file__)] + [p for p in sys.path if p and os.path.isdir(p)]
        for root in roots:
            names += sorted(glob.glob(os.path.join(root, "nvidia", "**", "libcudart.so*"), recursive=True))
            names += sorted(glob.glob(os.path.join(root, "lib", "libcudart.so*")))
        errors = []
        for name in names:
            try:
                return ctypes.CDLL(name), name
            except OSError as exc:
                errors.append(str(exc)[:80])
        raise RuntimeError("no libcudart found: " + "; ".join(errors[:4]))

    def batch(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray) -> None:
        args = [dsts.ctypes.data, srcs.ctypes.data, sizes.ctypes.data, len(dsts), ctypes.addressof(self.attr),
                ctypes.addressof(self.attr_idx), 1]
        if self.fail_idx:
            args.append(ctypes.addressof(self.failed))
        err = self.fn(*args, _stream())
        if err != 0:
            self.lib.cudaGetLastError()
            raise RuntimeError(f"cudaMemcpyBatchAsync (ctypes, libcudart {self.version}): error {err}")


class _RawGather:
    """The CuPy RawKernel gather, launched on torch's current stream with raw pointers (the host buffer is mapped
    pinned memory: its host pointer is valid on the device under unified addressing)."""

    def __init__(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import cupy
        self.cupy = cupy
        self.kernel = cupy.RawKernel(_RAW_SRC, "gather_chunks")
        self.kernel.compile()
        self.streams = {}  # torch stream handle -> CuPy's view of it (made once: ExternalStream warns, CuPy 14)

    def _stream(self):
        h = _stream()
        if h not in self.streams:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.streams[h] = self.cupy.cuda.ExternalStream(h)
        return self.streams[h]

    def __call__(self, src: torch.Tensor, dst: torch.Tensor, si: torch.Tensor, di: torch.Tensor, chunk_bytes: int,
                 grid: int) -> None:
        n = si.numel()
        args = (np.uint64(src.data_ptr()), np.uint64(dst.data_ptr()), np.uint64(si.data_ptr()),
                np.uint64(di.data_ptr()), np.int64(n), np.int32(chunk_bytes // 16))
        with self._stream():
            self.kernel((max(1, min(grid, n)),), (RAW_THREADS,), args)


class _SleepTimer:
    """GPU seconds of one eager issue: a sleep kernel queued first covers the host's issue time (twice the longest
    seen so far), then CUDA events bracket only the GPU's work. ``host_bound`` counts samples whose issue outlasted
    the sleep (their time would include host gaps)."""

    def __init__(self):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1000)
        torch.cuda.synchronize()
        a.record()
        torch.cuda._sleep(20_000_000)
        b.record()
        b.synchronize()
        self.cycles_per_s = 20_000_000 / (a.elapsed_time(b) / 1e3)

    def sleep(self, seconds: float) -> None:
        torch.cuda._sleep(max(1000, int(self.cycles_per_s * seconds)))

    def run(self, issue, reps: int = REPS) -> dict:
        """``issue(i)`` puts the work of repetition ``i`` on the current stream (after one untimed call that
        compiles and warms, and a second that estimates the host time)."""
        issue(0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        issue(1)
        host_max = time.perf_counter() - t0
        torch.cuda.synchronize()
        gpu, host, bound = [], [], 0
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for i in range(reps):
            cover = 2 * host_max + 2e-4
            self.sleep(cover)
            a.record()
            t0 = time.perf_counter()
            issue(i)
            h = time.perf_counter() - t0
            b.record()
            b.synchronize()
            bound += h > cover
            host_max = max(host_max, h)
            gpu.append(a.elapsed_time(b) / 1e3)
            host.append(h)
        return {"gpu_s": statistics.median(gpu), "host_issue_s": statistics.median(host), "host_bound": bound}


class _Config:
    """Index sets of one (chunk size, count): device tensors for the kernels, pointer lists for the copy engine."""

    def __init__(self, host: torch.Tensor, pool: torch.Tensor, chunk_bytes: int, count: int, seed: int):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.host, self.pool, self.cb, self.n = host, pool, chunk_bytes, count
        n_host, n_pool = host.numel() * 4 // chunk_bytes, pool.numel() * 4 // chunk_bytes
        self.src = [torch.randperm(n_host, generator=g, device="cuda")[:count] for _ in range(SETS)]
        self.dst = [torch.randperm(n_pool, generator=g, device="cuda")[:count] for _ in range(SETS)]
        hb, pb, cb = np.uint64(host.data_ptr()), np.uint64(pool.data_ptr()), np.uint64(chunk_bytes)
        self.src_np = [np.ascontiguousarray(hb + s.cpu().numpy().astype(np.uint64) * cb) for s in self.src]
        self.dst_np = [np.ascontiguousarray(pb + d.cpu().numpy().astype(np.uint64) * cb) for d in self.dst]
        self.src_list = [a.tolist() for a in self.src_np]
        self.dst_list = [a.tolist() for a in self.dst_np]
        self.sizes_np = np.full(count, chunk_bytes, dtype=np.uint64)
        self.sizes_list = [chunk_bytes] * count

    def methods(self, tools: dict) -> dict:
        """name -> issue(i) on the current stream, for the tools that loaded."""
        h, p, cb, m = self.host, self.pool, self.cb, {}
        S, D = self.src, self.dst
        m["triton_grid"] = lambda i: copy_chunks(h, p, S[i % SETS], D[i % SETS], cb)
        m[f"triton_p{PERSISTENT}"] = lambda i: copy_chunks(h, p, S[i % SETS], D[i % SETS], cb, programs=PERSISTENT)
        if "bindings" in tools:
            b = tools["bindings"]
            m["ce_batch"] = lambda i: b.batch(self.dst_list[i % SETS], self.src_list[i % SETS], self.sizes_list)
        if "ctypes" in tools:
            c = tools["ctypes"]
            m["ce_batch_ctypes"] = lambda i: c.batch(self.dst_np[i % SETS], self.src_np[i % SETS], self.sizes_np)
        if "raw" in tools:
            r = tools["raw"]
            m["cupy_raw_grid"] = lambda i: r(h, p, S[i % SETS], D[i % SETS], cb, grid=self.n)
            m[f"cupy_raw_{PERSISTENT}"] = lambda i: r(h, p, S[i % SETS], D[i % SETS], cb, grid=PERSISTENT)
        if "bindings" in tools and self.n <= PER_CHUNK_MAX:
            b = tools["bindings"]
            m["ce_per_chunk"] = lambda i: b.per_chunk(self.dst_list[i % SETS], self.src_list[i % SETS], cb)
        return m

    def verify(self, issue, sample: int = 256) -> bool:
        """Poison the pool, copy set 0, compare a sample of destination chunks with their host rows."""
        words = self.cb // 4
        self.pool.fill_(-1)
        issue(0)
        torch.cuda.synchronize()
        k = min(sample, self.n)
        got = self.pool.view(-1, words)[self.dst[0][:k]].cpu()
        want = self.host.view(-1, words)[self.src[0][:k].cpu()]
        return bool(torch.equal(got, want))


def load_tools() -> tuple[dict, dict]:
    """Each optional tool on its own: a failure is recorded, the rest still load."""
    tools, info = {}, {}
    for name, make in (("bindings", _Bindings), ("ctypes", _CudartCtypes), ("raw", _RawGather),
                       ("bindings_overlap", lambda: _Bindings(prefer_overlap=True))):
        try:
            tools[name] = make()
        except Exception as exc:  # noqa: BLE001 - one missing tool must not stop the others
            info[f"{name}_error"] = _err(exc)
    if "ctypes" in tools:
        info["ctypes_libcudart"] = f"{tools['ctypes'].path} (version {tools['ctypes'].version})"
    return tools, info


def versions(tools: dict) -> dict:
    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "numpy": np.__version__}
    for key, mod in (("triton", "triton"), ("cupy", "cupy"), ("cuda_bindings", "cuda.bindings")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[key] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception as exc:  # noqa: BLE001
            out[key] = f"unavailable: {_err(exc)}"
    try:
        from cuda.bindings import runtime as rt
        out["cuda_bindings_has_cudaMemcpyBatchAsync"] = hasattr(rt, "cudaMemcpyBatchAsync")
    except Exception:  # noqa: BLE001
        out["cuda_bindings_has_cudaMemcpyBatchAsync"] = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import cupy
        rt = cupy.cuda.runtime
        out["cupy_runtime_batch_names"] = sorted(n for n in dir(rt) if "batch" in n.lower())
    except Exception as exc:  # noqa: BLE001
        out["cupy_runtime_batch_names"] = f"unavailable: {_err(exc)}"
    if "bindings" in tools:
        out.update(tools["bindings"].versions())
    return out


def measure_alone(timer: _SleepTimer, host, pool, tools, peak_Bps: float, left) -> list[dict]:
    rows = []
    for cb in CHUNKS:
        for n in COUNTS:
            if left() < 0:
                rows.append({"chunk_bytes": cb, "count": n, "error": "skipped: budget"})
                continue
            cfg = _Config(host, pool, cb, n, seed=cb + n)
            for name, issue in cfg.methods(tools).items():
                row = {"method": name, "chunk_bytes": cb, "count": n}
                try:
                    row["verified"] = cfg.verify(issue)
                    row.update(timer.run(issue))
                    row["Bps"] = n * cb / row["gpu_s"]
                    row["pct_of_memcpy_peak"] = 100 * row["Bps"] / peak_Bps
                except Exception as exc:  # noqa: BLE001 - record, go on with the next method
                    row["error"] = _err(exc)
                    torch.cuda.synchronize()
                rows.append(row)
    return rows


def _overlap_run(timer: _SleepTimer, side, copy, compute, reps: int = REPS) -> dict:
    """Median GPU seconds of the copy on ``side`` and/or the compute on the current stream, both starting when
    the sleep ends (the host issues both behind it)."""
    main = torch.cuda.current_stream()

    def issue(i):
        side.wait_stream(main)  # after the sleep and the start event: both streams start together
        if copy is not None:
            with torch.cuda.stream(side):
                copy(i)
        if compute is not None:
            compute()
        main.wait_stream(side)

    return timer.run(issue, reps=reps)


def measure_overlap(timer: _SleepTimer, host, pool, tools) -> dict:
    cb, n = OVERLAP
    cfg = _Config(host, pool, cb, n, seed=7)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(32, 4096, dtype=torch.bfloat16, device="cuda", generator=g)
    ws = [torch.randn(4096, 14336, dtype=torch.bfloat16, device="cuda", generator=g) / 64 for _ in range(4)]

    def compute():
        for _ in range(4):
            for w in ws:
                x @ w

    side = torch.cuda.Stream()
    copies = {k: v for k, v in cfg.methods(tools).items() if k not in ("ce_per_chunk", "ce_batch_ctypes")}
    if "bindings_overlap" in tools:
        b = tools["bindings_overlap"]
        copies["ce_batch_prefer_overlap"] = lambda i: b.batch(cfg.dst_list[i % SETS], cfg.src_list[i % SETS],
                                                              cfg.sizes_list)
    flat = pool.view(-1)[: n * cb // 4]
    copies["memcpy_contiguous"] = lambda i: flat.copy_(host[i * (n * cb // 4):][: n * cb // 4], non_blocking=True)
    res = {"chunk_bytes": cb, "count": n, "rows": []}
    res["compute_alone_s"] = _overlap_run(timer, side, None, compute)["gpu_s"]
    for name, fn in copies.items():
        row = {"copy": name}
        try:
            t_copy = _overlap_run(timer, side, fn, None)["gpu_s"]
            both = _overlap_run(timer, side, fn, compute)
            hidden = res["compute_alone_s"] + t_copy - both["gpu_s"]
            row.update(copy_alone_s=t_copy, both_s=both["gpu_s"], hidden_s=hidden, host_bound=both["host_bound"],
                       copy_GBps=n * cb / t_copy / 1e9, overlap=hidden / min(res["compute_alone_s"], t_copy))
        except Exception as exc:  # noqa: BLE001
            row["error"] = _err(exc)
            torch.cuda.synchronize()
        res["rows"].append(row)
    return res


def measure_index_path(host, pool, tools, reps: int = REPS, chunk_bytes: int = 32768) -> list[dict]:
    """What only the copy engine needs per layer: the candidates' indices (made on the GPU) to the host, a
    synchronize, compaction of the holes into pointer lists, the issue. Wall seconds, GPU otherwise idle."""
    g = torch.Generator(device="cuda").manual_seed(3)
    n_host, n_pool = host.numel() * 4 // chunk_bytes, pool.numel() * 4 // chunk_bytes
    hb, pb, cb = np.uint64(host.data_ptr()), np.uint64(pool.data_ptr()), np.uint64(chunk_bytes)
    stream = torch.cuda.current_stream()
    rows = []
    for entries in INDEX_ENTRIES:
        valid = min(entries // INDEX_VALID, n_pool)
        idx = torch.full((2, entries), -1, dtype=torch.int64, device="cuda")
        pos = torch.randperm(entries, generator=g, device="cuda")[:valid]
        idx[0, pos] = torch.randperm(n_host, generator=g, device="cuda")[:valid]
        idx[1, pos] = torch.randperm(n_pool, generator=g, device="cuda")[:valid]
        pinned = torch.empty((2, entries), dtype=torch.int64, pin_memory=True)
        row = {"entries": entries, "valid": valid, "chunk_bytes": chunk_bytes}
        t = {"d2h_sync_s": [], "build_s": [], "issue_bindings_s": [], "issue_ctypes_s": []}
        try:
            for _ in range(reps + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                pinned.copy_(idx, non_blocking=True)
                stream.synchronize()
                t1 = time.perf_counter()
                a = pinned.numpy()
                ok = (a[0] >= 0) & (a[1] >= 0)
                srcs = np.ascontiguousarray(hb + a[0][ok].astype(np.uint64) * cb)
                dsts = np.ascontiguousarray(pb + a[1][ok].astype(np.uint64) * cb)
                sizes = np.full(len(srcs), chunk_bytes, dtype=np.uint64)
                t2 = time.perf_counter()
                t["d2h_sync_s"].append(t1 - t0)
                t["build_s"].append(t2 - t1)
                if "bindings" in tools:
                    t3 = time.perf_counter()
                    tools["bindings"].batch(dsts.tolist(), srcs.tolist(), [chunk_bytes] * len(srcs))
                    t["issue_bindings_s"].append(time.perf_counter() - t3)
                    torch.cuda.synchronize()
                if "ctypes" in tools:
                    t3 = time.perf_counter()
                    tools["ctypes"].batch(dsts, srcs, sizes)
                    t["issue_ctypes_s"].append(time.perf_counter() - t3)
                    torch.cuda.synchronize()
            for k, v in t.items():  # the first round warms the path (allocations, first touches)
                if len(v) > 1:
                    row[k] = statistics.median(v[1:])
            issue = min((row[k] for k in ("issue_ctypes_s", "issue_bindings_s") if k in row), default=0.0)
            row["per_layer_s"] = row["d2h_sync_s"] + row["build_s"] + issue
            row["per_step_s"] = LAYERS * row["per_layer_s"]
        except Exception as exc:  # noqa: BLE001
            row["error"] = _err(exc)
            torch.cuda.synchronize()
        rows.append(row)
    return rows


def probe_capture(host, pool, tools) -> dict:
    """Which copies can a CUDA graph hold? The batched copy is expected not to (no graph node exists for it);
    Triton's gather is the control that must capture."""
    if "bindings" not in tools:
        return {"error": "cuda.bindings unavailable: capture not probed"}
    cfg = _Config(host, pool, 32768, 256, seed=11)
    out = {}
    for name, issue in cfg.methods(tools).items():
        if name in ("triton_grid", "ce_batch", "cupy_raw_grid", "ce_per_chunk"):
            issue(0)  # compiled and warm before the capture
            torch.cuda.synchronize()
            try:
                out[name] = tools["bindings"].capture(lambda: issue(0))
            except Exception as exc:  # noqa: BLE001
                out[name] = {"error": _err(exc)}
    return out


def run(out_path: str | None = None, budget_s: float = 85.0) -> dict:
    t_start = time.time()
    left = lambda: budget_s - (time.time() - t_start)  # noqa: E731
    from benchmarks.bench_gather import memcpy_peaks

    res = {"env": environment(), "errors": {}}
    peaks = memcpy_peaks()
    res["peaks"] = peaks
    tools, info = load_tools()
    res["tools"] = info
    res["versions"] = versions(tools)
    host = torch.empty(HOST_BYTES // 4, dtype=torch.int32, pin_memory=True)
    host.view(-1, 1024)[:, 0] = torch.arange(HOST_BYTES // 4096, dtype=torch.int32)  # each 4 KiB names itself
    pool = torch.empty(POOL_BYTES // 4, dtype=torch.int32, device="cuda")
    res["host_bytes"], res["pool_bytes"] = HOST_BYTES, POOL_BYTES
    main = torch.cuda.Stream()  # the batched copy refuses the legacy default stream
    with torch.cuda.stream(main):
        timer = _SleepTimer()
        for key, fn in (("alone", lambda: measure_alone(timer, host, pool, tools, peaks["h2d_memcpy_1GiB_Bps"],
                                                        left)),
                        ("overlap", lambda: measure_overlap(timer, host, pool, tools)),
                        ("index_path", lambda: measure_index_path(host, pool, tools)),
                        ("graph_capture", lambda: probe_capture(host, pool, tools))):
            if left() < 5:
                res["errors"][key] = "skipped: budget"
                continue
            try:
                res[key] = fn()
            except Exception as exc:  # noqa: BLE001 - one part's failure keeps the others
                res["errors"][key] = _err(exc)
                torch.cuda.synchronize()
    res["seconds"] = time.time() - t_start
    if out_path:
        write_json(out_path, res)
    return res


def _us(x) -> str:
    return f"{x * 1e6:9.1f}" if isinstance(x, (int, float)) else f"{'-':>9s}"


def table(res: dict) -> str:
    peak = res["peaks"]["h2d_memcpy_1GiB_Bps"]
    v = res.get("versions", {})
    alone = res.get("alone", [])
    methods = list(dict.fromkeys(r["method"] for r in alone if "method" in r))
    cells = {(r.get("method"), r["chunk_bytes"], r["count"]): r for r in alone}
    lines = [f"copy engine vs SM gather, h2d: random rows of {res.get('host_bytes', 0) / 2**30:.0f} GiB pinned -> "
             f"random pool slots; % of the pinned memcpy peak {peak / 1e9:.1f} GB/s (! = bytes wrong, "
             f"* = host-bound sample), then host us per issue"]
    head = "chunk  count " + "".join(f"{m:>16s}" for m in methods)
    for what in ("pct", "host"):
        lines.append(head)
        for cb in sorted({k[1] for k in cells}):
            for n in sorted({k[2] for k in cells if k[1] == cb}):
                row = f"{cb // 1024:4d}K {n:6d} "
                for m in methods:
                    r = cells.get((m, cb, n))
                    if r is None:
                        cell = "-"
                    elif "gpu_s" not in r:
                        cell = "ERR"
                    elif what == "pct":
                        cell = (f"{r['pct_of_memcpy_peak']:.1f}" + ("" if r.get("verified") else "!")
                                + ("*" if r.get("host_bound") else ""))
                    else:
                        cell = f"{r['host_issue_s'] * 1e6:.0f}"
                    row += f"{cell:>16s}"
                lines.append(row)
    for m in methods:
        errs = [r["error"] for r in alone if r.get("method") == m and "error" in r]
        if errs:
            lines.append(f"{m} failed {len(errs)}x: {errs[0][:140]}")
    ov = res.get("overlap")
    if ov:
        lines.append(f"beside a GEMM chain ({ov['count']} x {ov['chunk_bytes'] // 1024} KiB, other stream): "
                     f"compute alone {ov['compute_alone_s'] * 1e3:.3f} ms")
        lines.append("copy                      alone ms  GB/s   both ms  overlap")
        for r in ov["rows"]:
            if "error" in r:
                lines.append(f"{r['copy']:24s}  error: {r['error'][:90]}")
            else:
                lines.append(f"{r['copy']:24s} {r['copy_alone_s'] * 1e3:9.3f} {r['copy_GBps']:5.1f} "
                             f"{r['both_s'] * 1e3:9.3f}   {r['overlap']:5.2f}")
    if res.get("index_path"):
        lines.append(f"copy engine's host path per layer (indices d2h + sync, compaction, issue; x{LAYERS} per step):")
        lines.append("entries  valid  d2h+sync us  build us  issue bindings us  issue ctypes us  per step ms")
        for r in res["index_path"]:
            if "error" in r:
                lines.append(f"{r['entries']:7d}  error: {r['error'][:90]}")
                continue
            lines.append(f"{r['entries']:7d} {r['valid']:6d}    {_us(r.get('d2h_sync_s'))} {_us(r.get('build_s'))}"
                         f"         {_us(r.get('issue_bindings_s'))}        {_us(r.get('issue_ctypes_s'))}"
                         f"     {r['per_step_s'] * 1e3:7.2f}")
    cap = res.get("graph_capture")
    if cap:
        parts = []
        for name, c in cap.items():
            if not isinstance(c, dict):
                parts.append(f"{name}: {c}")
            elif c.get("captured"):
                parts.append(f"{name}: captured")
            else:
                why = c.get("call", c.get("error", ""))[:80]
                parts.append(f"{name}: NOT captured ({why}; end {c.get('end', '-')})")
        lines.append("graph capture: " + "; ".join(parts))
    lines.append("versions: " + ", ".join(f"{k} {v.get(k, '?')}" for k in
                                          ("torch", "triton", "cupy", "cuda_bindings", "cuda_runtime_version",
                                           "cuda_driver_version")) + f", driver {res['env'].get('driver', '?')}")
    names = v.get("cupy_runtime_batch_names")
    if names is not None:
        lines.append(f"cupy.cuda.runtime names with 'batch': {names}")
    for k, e in list(res.get("tools", {}).items()) + list(res.get("errors", {}).items()):
        if k.endswith("_error") or k in ("alone", "overlap", "index_path", "graph_capture"):
            lines.append(f"error {k}: {e[:160]}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run(sys.argv[1] if len(sys.argv) > 1 else None)))
