"""Calibration: isolated operator microbenchmarks -> a nosasim hardware profile (docs/profile-format.md).

Each operator is timed alone (CUDA events, median), never inside a decode step: end-to-end steps are what the
simulator predicts from this profile, so fitting them would make the comparison circular.

Transfers: the runtime moves one 64-token block of K *and* V as one chunk (``2 * 64 * head_dim`` elements), and so
does the simulator's default ``kv_layout="joint"``; the ``gather_h2d`` / ``writeback_d2h`` tables are written in
those terms (chunk bytes and chunk count exactly as measured).
"""

from __future__ import annotations

import torch

from nosasim.contract import Budget
from nosasim.models import ModelSpec, load_model

from .timing import environment, hbm_copy_peak, time_cuda, time_graph

DEFAULT_MODEL = "llama3-8b"
DEVICE = "cuda"  # the phase benchmarks' device (a CPU smoke test runs them there, untimed)


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gemm_shapes(shape: ModelSpec) -> dict[str, tuple[int, int]]:
    """(n, k) of each GEMM the decoder runs per token, named as nosasim.cost names them."""
    qkv = (shape.q_heads + 2 * shape.kv_heads) * shape.head_dim
    return {"qkv_proj": (qkv, shape.hidden), "o_proj": (shape.hidden, shape.q_heads * shape.head_dim),
            "gate_up_proj": (2 * shape.intermediate, shape.hidden), "down_proj": (shape.hidden, shape.intermediate),
            "lm_head": (shape.vocab, shape.hidden)}


def gemms(shape: ModelSpec, ms=(1, 8, 16, 32, 64, 96, 128, 256)) -> list[dict]:
    out = []
    for name, (n, k) in gemm_shapes(shape).items():
        w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out.append({"m": m, "n": n, "k": k, "seconds": time_graph(lambda: x @ w), "op": name})
        del w
    return out


def ceilings() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    flops = 2 * 8192 ** 3 / time_cuda(lambda: a @ b, reps=10)
    hbm = hbm_copy_peak()
    # Launch overhead: many tiny kernels back to back; GPU-side time per kernel.
    t = torch.zeros(1, device="cuda")

    def many():
        for _ in range(200):
            t.add_(1)

    launch_eager = time_cuda(many, reps=10) / 200
    launch = time_graph(many, inner=1) / 200
    # Non-tensor FP32 throughput: a long dependent FMA chain per element, compute-bound.
    z = torch.randn(1 << 24, device="cuda")

    def fma():
        torch.addcmul(z, z, z, value=0.5, out=y.view(torch.float32)[: 1 << 24])

    vec = None
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _fma_kernel(p, N: tl.constexpr, ITERS: tl.constexpr):
            offs = tl.program_id(0) * N + tl.arange(0, N)
            v = tl.load(p + offs)
            a = v
            for _ in range(ITERS):
                a = a * 0.999 + 0.001
            tl.store(p + offs, a)

        iters = 4096
        secs = time_cuda(lambda: _fma_kernel[(z.numel() // 1024,)](z, N=1024, ITERS=iters), reps=5)
        vec = 2 * iters * z.numel() / secs
    except Exception:  # noqa: BLE001 - fall back to the memory-bound op's rate, recorded as such
        vec = 2 * z.numel() / time_cuda(fma, reps=10)
    return {"matmul_flops": flops, "hbm_Bps": hbm, "launch_s": launch, "launch_eager_s": launch_eager,
            "vector_flops": vec}


def elementwise(sizes=(1 << 16, 1 << 20, 1 << 24, 1 << 27)) -> list[dict]:
    out = []
    for n in sizes:
        a = torch.randn(n // 2, device="cuda", dtype=torch.bfloat16)
        b = torch.randn_like(a)
        c = torch.empty_like(a)
        out.append({"bytes": 3 * a.numel() * 2, "seconds": time_graph(lambda: torch.add(a, b, out=c))})
    return out


# Batches of the attention tables in the runtime's layout: every 16 up to 256 rows' worth, since the kernel's
# launch (rounds of programs per SM) makes its time per row vary between neighbouring batches.
LAYOUT_BATCHES = (1, 8, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256)


def sparse_attention(shape: ModelSpec, batches=(1, 8, 16, 32, 64, 96, 128, 256), ks=(16, 32, 64, 128),
                     fp8: bool = False, layout: str = "ordered") -> list[dict]:
    """The attention kernel as the offloaded backend launches it: ``k_blocks - 1`` selected complete blocks plus a
    full tail per row, in a pool of ``k_blocks + 1`` slots (distinct slots per row, as the block table assigns);
    ``fp8``: an e4m3 block pool (the ``sparse_attention_fp8`` table). ``layout="ordered"``: every row reads its
    slots in order from a pool of ``max(ks) + 1`` slots; ``"runtime"``: as a decode step with ``C = k - 1`` holds
    them, a pool of ``k + 1`` slots per row (``C`` plus two tail slots) read in a random order per row."""
    from .attention import EntryPlan, decode_attention

    if layout not in ("ordered", "runtime"):
        raise ValueError(f"layout: expected 'ordered' or 'runtime', got {layout!r}")
    out = []
    q_heads, kv_heads, d = shape.q_heads, shape.kv_heads, shape.head_dim
    G = q_heads // kv_heads
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for B in batches:
        R = B * kv_heads
        q = torch.randn(R, G, d, device=DEVICE, dtype=torch.bfloat16)
        pool = None
        for k in ks:
            if pool is None or layout == "runtime":
                n_slots = max(ks) + 1 if layout == "ordered" else k + 1
                pool = torch.randn(R, n_slots, 2, 64, d, device=DEVICE, dtype=torch.bfloat16)
                if fp8:
                    pool = pool.to(torch.float8_e4m3fn)
            if layout == "ordered":
                slots = torch.arange(k - 1, device=DEVICE).expand(R, k - 1).contiguous()
            else:  # the k - 1 complete blocks in random slots of the first k, the tail in slot k
                slots = torch.rand(R, k, device=DEVICE, generator=g).argsort(-1)[:, : k - 1].contiguous()
            tail = torch.full((R,), k if layout == "runtime" else k - 1, device=DEVICE, dtype=torch.int64)
            plan = EntryPlan(slots, slots, tail, tail, torch.full((R,), 64, device=DEVICE, dtype=torch.int64))
            out.append({"batch": B, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": d, "k_blocks": k,
                        "seconds": time_graph(lambda: decode_attention(q, pool, plan))})
        del pool
        _empty_cache()
    return out


def sparse_attention_walk(shape: ModelSpec, batches=(1, 8, 16, 32, 64, 96, 128, 256), ks=(16, 32, 64, 128)) -> list[dict]:
    """What an attention pass costs beyond its bytes: the kernel as a split step launches its "misses" pass when
    nothing missed, walking every entry of the plan and loading none (``part="misses"``, no tail). With the full
    pass (``sparse_attention``) it gives the cost of a pass over a share of the blocks."""
    from .attention import EntryPlan, decode_attention

    out = []
    q_heads, kv_heads, d = shape.q_heads, shape.kv_heads, shape.head_dim
    for B in batches:
        R = B * kv_heads
        pool = torch.randn(R, max(ks) + 1, 2, 64, d, device=DEVICE, dtype=torch.bfloat16)
        q = torch.randn(R, q_heads // kv_heads, d, device=DEVICE, dtype=torch.bfloat16)
        for k in ks:
            slots = torch.arange(k - 1, device=DEVICE).expand(R, k - 1).contiguous()
            tail = torch.full((R,), k - 1, device=DEVICE, dtype=torch.int64)
            plan = EntryPlan(slots, slots, tail, tail, torch.full((R,), 64, device=DEVICE, dtype=torch.int64))
            miss = torch.zeros((R, k - 1), dtype=torch.bool, device=DEVICE)
            out.append({"batch": B, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": d, "k_blocks": k,
                        "seconds": time_graph(lambda: decode_attention(q, pool, plan, miss=miss, part="misses",
                                                                       return_lse=True))})
        del pool
    return out


DENSE_POINTS = ((1, 4096), (8, 8192), (16, 8192), (32, 8192), (8, 16384), (16, 16384), (8, 32768), (16, 32768),
                (1, 65536), (8, 65536), (14, 65536), (1, 131072), (4, 131072), (7, 131072))


def _inv_freq(shape: ModelSpec, theta: float = 500000.0) -> torch.Tensor:
    d = shape.head_dim
    return 1.0 / theta ** (torch.arange(0, d, 2, device=DEVICE, dtype=torch.float32) / d)


def dense_attention(shape: ModelSpec, points=DENSE_POINTS) -> list[dict]:
    """The dense attention phase of one layer exactly as decode runs it (RoPE and the new token written into the
    tail block in one launch, then attention over every block), alone in a CUDA graph; contexts up to 128K where
    the device holds them."""
    from dataclasses import replace

    from .backends import DenseBackend
    from .config import RuntimeConfig

    one = replace(shape, layers=1, vocab=16)
    inv_freq = _inv_freq(one)
    out = []
    for B, ctx in points:
        try:
            be = DenseBackend(RuntimeConfig(one, "dense", batch=B, context=ctx, steps=4), DEVICE)
        except torch.OutOfMemoryError:
            continue
        be.begin_step()
        q = torch.randn(be.R, one.group, one.head_dim, device=DEVICE, dtype=torch.bfloat16)
        k, v = (torch.randn(be.R, one.head_dim, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
        out.append({"batch": B, "q_heads": one.q_heads, "kv_heads": one.kv_heads, "head_dim": one.head_dim,
                    "context": ctx,
                    "seconds": time_graph(lambda: be.attend(0, q, k, v, None, inv_freq=inv_freq), inner=4)})
        del be
        _empty_cache()
    return out


def layer_glue(shape: ModelSpec, batches=(1, 8, 16, 32, 64, 96, 128, 256)) -> list[dict]:
    """One layer's token-path work besides the GEMMs, attention and the token kernel, with the decoder's own
    functions in the decoder's order: RMSNorm with the residual add fused in, twice, and SiLU(gate) * up."""
    from .token_kernels import rms_norm, silu_mul

    s = shape
    w = torch.ones(s.hidden, device=DEVICE, dtype=torch.bfloat16)
    out = []
    for B in batches:
        x = torch.randn(B, s.hidden, device=DEVICE, dtype=torch.bfloat16)
        o = torch.randn(B, s.hidden, device=DEVICE, dtype=torch.bfloat16)
        gu = torch.randn(B, 2 * s.intermediate, device=DEVICE, dtype=torch.bfloat16)

        def glue():
            rms_norm(x, w, residual=o)
            rms_norm(x, w, residual=o)
            silu_mul(gu)

        out.append({"batch": B, "hidden": s.hidden, "q_heads": s.q_heads, "kv_heads": s.kv_heads,
                    "head_dim": s.head_dim, "mlp": s.intermediate, "seconds": time_graph(glue, inner=4)})
    return out


PHASE_POINTS = tuple((b, c) for b in (8, 16, 32, 64, 128) for c in (8192, 16384, 32768)) + \
    tuple((b, c) for b in (8, 32, 128) for c in (65536, 131072)) + ((192, 65536),)


def offload_phases(shape: ModelSpec, points=PHASE_POINTS, variant: str = "nosa", budget: Budget | None = None,
                   ckey_dtype: str | None = None) -> list[dict]:
    """Per-layer cost of the offloaded path's own work, each phase alone in a CUDA graph (one layer of the shape):
    the selection phase (the scoring state's share of the token kernel, measured as the token kernel with the
    state less the token kernel without it, plus the fused selection), the block-table phase (table update and
    copy plan), and the whole ``attend`` as a trace-driven decode runs it, with every selected block resident (no
    transfer). The first two become the profile's ``selection``/``selection_nosa`` and ``block_table`` tables, the
    rest of the third its ``attend_glue``. ``ckey_dtype="fp8"``: e4m3 compressed keys (the ``selection_fp8`` and
    ``selection_nosa_fp8`` tables; their other phases are the bf16 runs' and are not tabled twice)."""
    from dataclasses import replace

    from nosasim.contract import TAIL_SLOTS

    from .backends import OffloadBackend
    from .blockcache import update_table
    from .config import RuntimeConfig
    from .kvstore import HostStore
    from .model import Weights
    from .plan_kernels import copy_plan
    from .token_kernels import TokenBuffers, token_step

    one = replace(shape, layers=1, vocab=16)
    lw = Weights.random(one, torch.bfloat16, DEVICE, 0).layers[0]
    inv_freq = _inv_freq(one)
    out = []
    for B, ctx in points:
        cfg = RuntimeConfig(one, variant, batch=B, context=ctx, steps=8,
                            budget=budget or Budget.for_variant(variant, 64), host_seqs=min(B, 4),
                            ckey_dtype=ckey_dtype)
        try:
            host = HostStore.allocate(cfg, pin=DEVICE == "cuda")
            host.fill_random(0, DEVICE)
            be = OffloadBackend(cfg, DEVICE, host)
        except (torch.OutOfMemoryError, ValueError):
            continue
        be.prefill(None, exact=False)
        be.begin_step()
        H, D = one.kv_heads, one.head_dim
        q = torch.randn(B, one.q_heads * D, device=DEVICE, dtype=torch.bfloat16)
        k, v = (torch.randn(B, H * D, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
        nosa = {"evict_w": lw.evict_w, "evict_a": lw.evict_a, "tail_done": be.tail_done,
                "old_tail": be.old_tail} if be.scores.cis is not None else {}
        full = TokenBuffers.from_scores(be.scores, 0, be.pos, pool=be.pool[0], dst_slot=be.tail_slot,
                                        dst_tok=be.dst_tok, **nosa)
        bare = TokenBuffers(be.pos, pool=be.pool[0], dst_slot=be.tail_slot, dst_tok=be.dst_tok)
        qr, _ = token_step(q, k, v, full, head_dim=D, inv_freq=inv_freq)
        sel = be.select(0, qr)
        # The trace-driven path: the trace's selection replaces the computed one, as runtime.e2e decodes.
        be.trace_sel = sel.view(1, 1, B, H, -1).permute(0, 1, 3, 2, 4).contiguous()
        t_full = time_graph(lambda: token_step(q, k, v, full, head_dim=D, inv_freq=inv_freq), inner=4)
        t_bare = time_graph(lambda: token_step(q, k, v, bare, head_dim=D, inv_freq=inv_freq), inner=4)
        t_select = time_graph(lambda: be.select(0, qr), inner=4)

        def table():
            plan = update_table(be.table, 0, sel, be.state.step, be.tail_done, be.old_tail)
            copy_plan(sel, plan, be.tail_done, be.old_tail, be.row_base, be.slot_base, be.C, TAIL_SLOTS, be.loaded,
                      be.state.step, 0, be.all_rows)

        entry = {"variant": variant, "ckey_dtype": ckey_dtype or "bf16", "batch": B, "context": ctx, "rows": be.R, "k": cfg.budget.k, "capacity": cfg.slots,
                 "token_state_s": max(t_full - t_bare, 0.0), "select_s": t_select,
                 "selection_s": max(t_full - t_bare, 0.0) + t_select,
                 "block_table_s": time_graph(table, inner=4),
                 "attend_all_hits_s": time_graph(lambda: be.attend(0, q, k, v, lw, inv_freq=inv_freq), inner=4)}
        out.append(entry)
        del be, host
        _empty_cache()
    return out


# Batches between the PHASE_POINTS rows at 64K and 128K (micro-batches of large batches run there).
FILL_POINTS = ((16, 65536), (64, 65536), (96, 65536), (16, 131072), (48, 131072), (64, 131072), (96, 131072))


def scoring_phases(shape: ModelSpec, points, ckey_dtypes=(None, "fp8")) -> list[dict]:
    """The offloaded phases of both scoring variants at ``points``, for each compressed-key type."""
    return [e for v in ("infllmv2", "nosa") for ck in ckey_dtypes
            for e in offload_phases(shape, points, variant=v, ckey_dtype=ck)]


def fill_phases(shape: ModelSpec, points=FILL_POINTS) -> list[dict]:
    """The offloaded phases of both scoring variants, with bf16 and fp8 compressed keys, at ``FILL_POINTS``."""
    return scoring_phases(shape, points)


# fp8 compressed keys fit larger batches at long contexts: one more point there.
PHASE_POINTS_FP8 = PHASE_POINTS + ((192, 131072),)


def select_phases(shape: ModelSpec) -> list[dict]:
    """Every point of the selection tables, both scoring variants, both compressed-key types: ``PHASE_POINTS``
    and ``FILL_POINTS`` (and fp8's extra point), as one call re-measures them after the selection kernels change."""
    pts = PHASE_POINTS + FILL_POINTS
    return scoring_phases(shape, pts, (None,)) + scoring_phases(shape, pts + PHASE_POINTS_FP8[len(PHASE_POINTS):],
                                                                ("fp8",))


def ckey_fp8_phases(shape: ModelSpec, points=PHASE_POINTS_FP8) -> list[dict]:
    """The offloaded phases of both scoring variants with fp8 compressed keys (their selection tables)."""
    return scoring_phases(shape, points, ("fp8",))


def profile_name(device: str) -> str:
    """A profile's name from the device's, e.g. ``NVIDIA H200`` -> ``h200-pcie5`` (the host link this project's
    machines have; ``--profile-name`` overrides it)."""
    import re

    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", device.upper())
    return f"{m.group(1).lower()}-pcie5" if m else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "gpu"


def transfer_tables(gather_best: list[dict]) -> dict[str, list[dict]]:
    """Link tables from the gather benchmark's best variants, in runtime chunk terms (see module doc)."""
    tables = {"h2d": [], "d2h": []}
    for r in gather_best:
        tables[r["direction"]].append({"chunk_bytes": r["chunk_bytes"], "count": r["count"], "seconds": r["seconds"]})
    return tables


def _link(entries: list[dict], memcpy_peak: float) -> tuple[dict, list[dict]]:
    # Peak: the pinned memcpy of the same run, or the best gather if that beat it (efficiency must stay <= 1).
    peak = max([memcpy_peak] + [e["chunk_bytes"] * e["count"] / e["seconds"] for e in entries])
    lat = min(e["seconds"] - e["chunk_bytes"] * e["count"] / peak for e in entries)
    lat = max(0.0, 0.95 * lat)
    return {"peak_Bps": peak, "latency_s": lat}, entries


OVERLAP_COPY = "gather_persistent33"  # the copy micro-batched decode steps run beside compute (runtime.e2e)


def overlap_slowdown(overlap: dict, copy: str = OVERLAP_COPY) -> float:
    """Fractional slowdown of compute while a gather runs beside it, from ``benchmarks/bench_overlap.py``: the value
    ``s`` for which ``nosasim.sim.schedule.compute_end`` reproduces the measured time of compute and copy together
    (the copy taken as unslowed: the compute chain is what ends last)."""
    row = next((r for r in overlap["rows"] if r["copy"] == copy), None)
    if row is None:
        raise ValueError(f"overlap benchmark: no row for copy {copy!r}")
    tc, tg, both = overlap["compute_alone_s"], row["copy_alone_s"], row["both_s"]
    if both <= max(tc, tg):
        return 0.0
    # Stretched for the whole op (it ends inside the copy's span), or for the copy's span and then at full speed.
    if both <= tg:
        s = both / tc - 1
    else:
        done = tg + tc - both  # compute seconds got through while the copy ran
        # None (copy and compute serialised): the profile's largest slowdown, 9, stands for "no progress".
        s = tg / done - 1 if done > tg / 10 else 9.0
    return min(max(0.0, s), 9.0)


def build_profile(name: str, cal: dict, gather: dict, overlap: dict | None = None,
                  total_memory: float | None = None) -> dict:
    """Assemble the profile dict from calibration results ``cal``, the gather benchmark ``gather`` and, when given,
    the overlap benchmark ``overlap`` (``overlap_slowdown``; without it the simulator assumes none)."""
    env = environment()
    tables = transfer_tables(gather["best"])
    h2d, h2d_tab = _link(tables["h2d"], gather["peaks"]["h2d_memcpy_1GiB_Bps"])
    d2h, d2h_tab = _link(tables["d2h"], gather["peaks"]["d2h_memcpy_1GiB_Bps"])
    c = cal["ceilings"]
    total = torch.cuda.get_device_properties(0).total_memory if total_memory is None else total_memory
    prof = {
        "schema": "nosasim-profile/1", "name": name,
        "device": f"{env.get('device')} (driver {env.get('driver')}, CUDA {env.get('cuda')})",
        "provenance": (f"measured by runtime.calibrate on {env['date']}: torch {env['torch']}, triton {env['triton']}; "
                       "isolated operator microbenchmarks, CUDA-event medians; link tables from "
                       "benchmarks/bench_gather.py (best kernel variant) in runtime chunk terms"),
        "gpu_memory_bytes": total, "reserved_bytes": cal.get("reserved_bytes", 0),
        "host_memory_bytes": env["host_memory_bytes"],
        "hbm_Bps": c["hbm_Bps"], "matmul_flops": c["matmul_flops"], "vector_flops": c["vector_flops"],
        "launch_s": c["launch_s"], "h2d": h2d, "d2h": d2h,
        "ops": {"gemm": [{k: e[k] for k in ("m", "n", "k", "seconds")} for e in cal["gemm"]],
                "sparse_attention": cal["sparse_attention"], "dense_attention": cal["dense_attention"],
                **({"sparse_attention_walk": cal["sparse_attention_walk"]} if cal.get("sparse_attention_walk") else {}),
                **({"sparse_attention_fp8": cal["sparse_attention_fp8"]} if cal.get("sparse_attention_fp8") else {}),
                "elementwise": cal["elementwise"], "layer_glue": cal["layer_glue"],
                **phase_tables(cal["offload_phases"], cal["sparse_attention"], load_model(cal.get("model", DEFAULT_MODEL))),
                "gather_h2d": h2d_tab, "writeback_d2h": d2h_tab},
        "notes": (f"launch_s: per-kernel cost of tiny kernels replayed from a CUDA graph (decode steps replay graphs); "
                  f"eager launches cost {c['launch_eager_s'] * 1e6:.1f} us each. Op tables are timed inside CUDA "
                  f"graphs too."),
    }
    if overlap is not None:
        prof["overlap_slowdown"] = overlap_slowdown(overlap)
        prof["provenance"] += f"; overlap_slowdown from benchmarks/bench_overlap.py ({OVERLAP_COPY} beside GEMMs)"
    return prof


def phase_tables(phases: list[dict], sparse: list[dict], shape: ModelSpec) -> dict[str, list[dict]]:
    """Profile tables from the per-layer phase timings: selection per variant, block-table update per row count,
    and the offloaded attend path's remaining work (tail moves, copy launches with nothing to copy, new-token
    write): the whole attend with every block resident, less its selection, block-table update and attention
    kernel, each of which was timed alone."""
    dims = {"q_heads": shape.q_heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim}
    out = {"selection": [], "selection_nosa": [], "block_table": [], "attend_glue": []}
    attn = {(e["batch"], e["k_blocks"]): e["seconds"] for e in sparse}
    glue: dict[int, list[float]] = {}
    by_rows: dict[tuple, list[float]] = {}
    for e in phases:
        kind = "selection_nosa" if e["variant"] == "nosa" else "selection"
        if e.get("ckey_dtype", "bf16") == "fp8":
            out.setdefault(kind + "_fp8", []).append({"batch": e["batch"], **dims, "context": e["context"],
                                                      "seconds": e["selection_s"]})
            continue
        out[kind].append({"batch": e["batch"], **dims, "context": e["context"], "seconds": e["selection_s"]})
        by_rows.setdefault((e["rows"], e["k"], e["capacity"]), []).append(e["block_table_s"])
        if (e["batch"], e["k"]) in attn:
            rest = e["attend_all_hits_s"] - e["selection_s"] - e["block_table_s"] - attn[(e["batch"], e["k"])]
            glue.setdefault(e["batch"], []).append(max(rest, 1e-7))
    for (rows, k, cap), ts in sorted(by_rows.items()):
        out["block_table"].append({"rows": rows, "k": k, "capacity": cap, "seconds": sorted(ts)[len(ts) // 2]})
    for b, ts in sorted(glue.items()):
        out["attend_glue"].append({"batch": b, "kv_heads": shape.kv_heads, "seconds": sorted(ts)[len(ts) // 2]})
    return {k: v for k, v in out.items() if v}


def run_all(model: str = DEFAULT_MODEL) -> dict:
    """Every calibration microbenchmark for the shape ``model`` (a preset, JSON file or key=value shape)."""
    shape = load_model(model)
    free, total = torch.cuda.mem_get_info()
    cal = {"model": model, "reserved_bytes": max(0, total - free), "ceilings": ceilings(), "gemm": gemms(shape),
           "elementwise": elementwise(), "sparse_attention": sparse_attention(shape, LAYOUT_BATCHES, layout="runtime"),
           "sparse_attention_fp8": sparse_attention(shape, LAYOUT_BATCHES, fp8=True, layout="runtime"),
           "sparse_attention_walk": sparse_attention_walk(shape),
           "dense_attention": dense_attention(shape), "layer_glue": layer_glue(shape),
           # Every (batch, context) of PHASE_POINTS and FILL_POINTS, both variants, both key types.
           "offload_phases": offload_phases(shape, variant="infllmv2") + offload_phases(shape, variant="nosa")
           + ckey_fp8_phases(shape) + fill_phases(shape)}
    for k in ("sparse_attention", "sparse_attention_fp8", "dense_attention", "elementwise", "layer_glue"):
        for e in cal[k]:
            e["seconds"] = max(e["seconds"], 1e-9)
    return cal
