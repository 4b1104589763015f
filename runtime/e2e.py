"""End-to-end decode measurements that the simulator must predict (the validation protocol, docs/validation.md).

Each configuration decodes a real (or seeded synthetic) nosasim trace on the GPU: the offloaded variants run their
full selection and then use the trace's selections, so the transfers are the trace's; the batch is assembled and
the trace retargeted to the model shape exactly as ``nosasim.batch`` does it (same sequences, same step shifts,
layers and heads mapped cyclically), so simulator and runtime replay the same selections. Step time is the median
of 64 CUDA-graph-replayed steps after warm-up (CUDA events).

The results are written as ``analysis/results/e2e-*.json`` and scored by ``python -m analysis.validate``; nothing
here feeds the simulator's calibration.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import torch

from nosasim.contract import Budget
from nosasim.experiment import E2EConfig, fingerprint, load_source, replay_batch

from .config import PRESETS, RuntimeConfig
from .decode import Runner
from .kvstore import HostStore
from .model import Weights
from .timing import environment, write_json

WARMUP, TIMED = 8, 64
# Host rows shared across the batch: the same bytes cross the link, in a fraction of the host memory. A 128K-token
# sequence holds 32 GiB of llama3-8b KV, so long contexts share fewer rows.
HOST_BYTES = 40 << 30

REAL = "traces/samples/smollm2-topics-8k.nosatrace"
SYNTH_32K = {"layers": 32, "heads": 8, "seqs": 4, "steps": 160, "k": 64, "context": 32768, "seed": 7,
             "head_dim": 128}
# Long contexts: 4 layers x 2 KV heads of synthetic rows, retargeted cyclically to the model's 32 x 8 (as
# nosasim.batch does on both sides), 8 sequences so that a batch of 128 has 16 step-shifted copies of each.
SYNTH_LONG = {"layers": 4, "heads": 2, "seqs": 8, "steps": 170, "k": 64, "seed": 7, "head_dim": 128}
NOSA, INFLLMV2 = Budget(64, 33), Budget(64)


def _synth(kind: str, context: int, base: dict = SYNTH_LONG) -> dict:
    return {"kind": kind, **({"kq": 33} if kind == "nosa" else {}), **base, "context": context}


S32N, S32I = _synth("nosa", 32768, SYNTH_32K), _synth("infllmv2", 32768, SYNTH_32K)  # the H100 runs' traces
L32N, L32I, L64N, L64I, L128N, L128I = (_synth(k, c) for c in (32768, 65536, 131072) for k in ("nosa", "infllmv2"))
MB2 = {"microbatches": 2, "gather_programs": 33}

# The hand-picked validation list (runs 1-3 committed on the H100 measured these, with the names kept).
VALIDATION = [
    *[E2EConfig(f"dense-8k-b{b}", REAL, "dense", b) for b in (8, 16, 32)],
    *[E2EConfig(f"infllmv2-8k-b{b}", REAL, "infllmv2", b, INFLLMV2) for b in (16, 32, 64, 96)],
    *[E2EConfig(f"nosa-8k-b{b}", REAL, "nosa", b, NOSA) for b in (16, 32, 64, 96)],
    E2EConfig("nosa-8k-b32-lru96", REAL, "nosa", 32, NOSA.with_capacity(96), "lru"),
    E2EConfig("infllmv2-8k-b64-k32", REAL, "infllmv2", 64, Budget(32)),
    E2EConfig("nosa-8k-b64-k32", REAL, "nosa", 64, Budget(32, 24)),
    E2EConfig("dense-32k-b8", S32I, "dense", 8),
    E2EConfig("infllmv2-32k-b32", S32I, "infllmv2", 32, INFLLMV2),
    E2EConfig("nosa-32k-b32", S32N, "nosa", 32, NOSA),
    # Micro-batches: one group's transfers overlap the others' compute (the simulator's schedule, measured). The
    # copies run as 33 persistent programs: a program per entry, or one per SM, keeps the GEMMs beside them off the
    # SMs until the copy ends (benchmarks/bench_overlap.py: overlap 0.01 and 0.09, against 0.85 with 33 programs).
    *[E2EConfig(f"{v}-8k-b{b}-mb2", REAL, v, b, INFLLMV2 if v == "infllmv2" else NOSA, **MB2)
      for v, b in (("infllmv2", 64), ("nosa", 64), ("nosa", 96))],
    E2EConfig("nosa-32k-b32-mb2", S32N, "nosa", 32, NOSA, **MB2),
    # Every policy the runtime implements, on the real trace (its agnostic score ranks blocks for 'static').
    E2EConfig("nosa-8k-b32-lfu96", REAL, "nosa", 32, NOSA.with_capacity(96), "lfu"),
    E2EConfig("nosa-8k-b32-static96", REAL, "nosa", 32, NOSA.with_capacity(96), "static"),
    # Attention split around the copies: resident blocks first, the copied ones after, merged by log-sum-exp.
    E2EConfig("nosa-8k-b32-lru96-split", REAL, "nosa", 32, NOSA.with_capacity(96), "lru", split_attention=True),
    E2EConfig("nosa-8k-b64-split", REAL, "nosa", 64, NOSA, split_attention=True),
    E2EConfig("infllmv2-8k-b64-split", REAL, "infllmv2", 64, INFLLMV2, split_attention=True),
]

# The floor grid (benchmarks/results/floor-*.json): batch 16-128, context 8K-128K, k 32 and 64, C from k - 1 to 2k,
# prev and lru, and dense at each context.
FLOOR = [
    E2EConfig("floor-nosa-8k-b16-k64-prev", REAL, "nosa", 16, NOSA),
    E2EConfig("floor-nosa-8k-b64-k64-lru128", REAL, "nosa", 64, NOSA.with_capacity(128), "lru"),
    E2EConfig("floor-nosa-8k-b128-k64-prev", REAL, "nosa", 128, NOSA),
    E2EConfig("floor-nosa-8k-b64-k32-lru64", REAL, "nosa", 64, Budget(32, 24, capacity=64), "lru"),
    E2EConfig("floor-infllmv2-8k-b32-k64-lru96", REAL, "infllmv2", 32, INFLLMV2.with_capacity(96), "lru"),
    E2EConfig("floor-nosa-32k-b64-k64-prev", L32N, "nosa", 64, NOSA),
    E2EConfig("floor-nosa-32k-b128-k32-lru64", L32N, "nosa", 128, Budget(32, 24, capacity=64), "lru"),
    E2EConfig("floor-nosa-64k-b16-k64-lru128", L64N, "nosa", 16, NOSA.with_capacity(128), "lru"),
    E2EConfig("floor-nosa-64k-b128-k64-prev-mb2", L64N, "nosa", 128, NOSA, **MB2),
    E2EConfig("floor-infllmv2-64k-b64-k64-prev-mb2", L64I, "infllmv2", 64, INFLLMV2, **MB2),
    E2EConfig("floor-nosa-128k-b32-k32-prev", L128N, "nosa", 32, Budget(32, 24)),
    E2EConfig("floor-nosa-128k-b96-k64-prev-mb2", L128N, "nosa", 96, NOSA, **MB2),
    E2EConfig("floor-nosa-128k-b64-k64-lru128", L128N, "nosa", 64, NOSA.with_capacity(128), "lru"),
    E2EConfig("floor-dense-8k-b8", REAL, "dense", 8),
    E2EConfig("floor-dense-32k-b8", L32I, "dense", 8),
    E2EConfig("floor-dense-64k-b14", L64I, "dense", 14),
    E2EConfig("floor-dense-128k-b7", L128I, "dense", 7),
]

# Equal GPU memory at long contexts (analysis/results/equal-memory-*.json): dense at its largest batch (the floor
# grid's dense runs) against NOSA offload at budgets that fit, among which the sweep picks: bf16 or fp8 blocks,
# NOSI's prev or a larger lru cache, two micro-batches (grouped by block type: one pinned store each).
# (The bf16 candidates at 64K batch 128 and 128K batch 96, two micro-batches, are the floor grid's runs.)
EQUAL = [
    E2EConfig("equal-nosa-64k-b176-fp8-mb2", L64N, "nosa", 176, NOSA, kv_dtype="fp8", **MB2),
    E2EConfig("equal-nosa-64k-b128-fp8-lru128-mb2", L64N, "nosa", 128, NOSA.with_capacity(128), "lru",
              kv_dtype="fp8", **MB2),
    E2EConfig("equal-nosa-128k-b120-fp8-mb2", L128N, "nosa", 120, NOSA, kv_dtype="fp8", **MB2),
    E2EConfig("equal-nosa-128k-b96-fp8-lru128-mb2", L128N, "nosa", 96, NOSA.with_capacity(128), "lru",
              kv_dtype="fp8", **MB2),
    # fp8 compressed keys too: half the bytes scoring reads (the 128K step's largest part) and half their memory,
    # so larger batches fit; at the batches above for the side-by-side, and at larger ones.
    *[E2EConfig(f"equal-nosa-{c}k-b{b}-fp8-ck8-mb2", src, "nosa", b, NOSA, kv_dtype="fp8", ckey_dtype="fp8", **MB2)
      for c, src, b in ((64, L64N, 176), (64, L64N, 240), (128, L128N, 120), (128, L128N, 168))],
]

# fp8 blocks and keys without micro-batches: whether the fp8 steps' under-prediction with two micro-batches
# (validation-h200-run4.md) belongs to the overlap or to the fp8 kernels themselves.
FP8 = [E2EConfig(f"nosa-{c}k-b{b}-fp8-ck8", src, "nosa", b, NOSA, kv_dtype="fp8", ckey_dtype="fp8")
       for c, src, b in ((64, L64N, 176), (128, L128N, 120))]



def random_configs(seed: int = 2026, n: int = 24, usable_bytes: float = 0.9 * 150109880320) -> list[E2EConfig]:
    """Validation configurations drawn at random (seeded, so every machine draws the same list) from the space the
    CLI accepts: variant, context 8K-128K (and its trace), batch, k, k_q, C, policy, micro-batches, block and key
    types; each one fits ``usable_bytes`` of GPU memory (default: an H200's, with headroom) and its trace. Names
    alternate between two splits: ``rand-t..`` (tune: may be looked at while the model changes) and ``rand-h..``
    (held out: reported, never used to change the model)."""
    from nosasim import memory
    from nosasim.batch import plan_batch
    from nosasim.contract import KV_DTYPES

    rng = np.random.default_rng(seed)
    shape = PRESETS["llama3-8b"]
    need = WARMUP + 2 + TIMED + 1
    sources = {8192: ({"nosa": REAL, "infllmv2": REAL, "dense": REAL}, 1, 256),
               32768: ({"nosa": L32N, "infllmv2": L32I, "dense": L32I}, SYNTH_LONG["seqs"], SYNTH_LONG["steps"]),
               65536: ({"nosa": L64N, "infllmv2": L64I, "dense": L64I}, SYNTH_LONG["seqs"], SYNTH_LONG["steps"]),
               131072: ({"nosa": L128N, "infllmv2": L128I, "dense": L128I}, SYNTH_LONG["seqs"], SYNTH_LONG["steps"])}
    out: list[E2EConfig] = []
    while len(out) < n:
        context = int(rng.choice(list(sources)))
        srcs, seqs, steps = sources[context]
        variant = str(rng.choice(["dense", "infllmv2", "nosa", "nosa"]))
        budget, policy, kv, ck = None, "prev", "bf16", "bf16"
        if variant != "dense":
            k = int(rng.choice([32, 64]))
            k_q = int(rng.integers(18, k + 1)) if variant == "nosa" else None
            capacity = int(rng.choice([k - 1, k + k // 2, 2 * k]))
            budget = Budget.for_variant(variant, k, k_q, capacity=capacity)
            policy = str(rng.choice(["prev", "lru", "lfu"] + (["static"] if variant == "nosa" else [])))
            kv = str(rng.choice(["bf16", "fp8"]))
            ck = str(rng.choice(["bf16", "fp8"]))
        tokens = context + 256
        block = shape.block(64, kv_dtype=None if kv == "bf16" else kv)
        fit = memory.largest_batch(usable_bytes, shape, variant, budget, policy, tokens, block,
                                   ckey_bytes=KV_DTYPES[ck])
        top = min(fit, 128 if seqs == 1 else 192)
        if top < 4:
            continue
        batch = int(rng.integers(4, top + 1))
        try:
            if plan_batch(seqs, steps, batch).steps < need:
                continue
        except ValueError:
            continue
        mb = int(rng.choice([1, 2])) if variant != "dense" and batch >= 16 else 1
        split = "t" if len(out) % 2 == 0 else "h"
        name = f"rand-{split}{len(out):02d}-{variant}-{context // 1024}k-b{batch}"
        out.append(E2EConfig(name, srcs[variant], variant, batch, budget, policy,
                             **({"microbatches": 2, "gather_programs": 33} if mb == 2 else {}),
                             kv_dtype=kv, ckey_dtype=ck if variant != "dense" else "bf16"))
    return out


RANDOM = random_configs()
CONFIGS = VALIDATION + FLOOR + EQUAL + FP8 + RANDOM


def host_store(cfg: RuntimeConfig, stores: dict) -> HostStore:
    """One pinned store per (longest context, KV dtype) class, reused by every configuration that fits it: pinning
    tens of GiB takes seconds, so it is not redone per configuration. Sequences share host rows (``b % rows``)."""
    key = (cfg.kv_dtype, cfg.max_tokens <= 40000)
    have = stores.get(key)
    if have is None or have.kv.shape[3] < cfg.n_blocks:
        stores.clear()  # one store at a time: pinned memory is the host's, and a long one is tens of GiB
        gc.collect()
        tokens = max(cfg.max_tokens, 40000 if key[1] else 131072 + 256)
        one = RuntimeConfig(cfg.shape, cfg.variant, batch=1, context=tokens - cfg.steps, steps=cfg.steps,
                            budget=cfg.budget, kv_dtype=cfg.kv_dtype)
        rows = max(1, min(4, HOST_BYTES // one.host_bytes()))
        have = HostStore.allocate(one.with_(batch=rows), pin=True)
        have.fill_random(1, "cuda")
        stores[key] = have
    return have


def load_trace_static(backend, batch_trace) -> None:
    """The block table's 'static' keep score of a trace-driven run: the trace's agnostic score of each row, with
    layers and heads mapped cyclically as the selections are (row ``b * kv_heads + h`` of layer ``l`` takes the
    trace's ``[l % Lt, h % Ht, b]``)."""
    agn = batch_trace.agnostic_score
    if agn is None:
        raise ValueError("policy 'static': the trace has no agnostic_score to rank blocks by")
    table = backend.table
    L, R, nb1 = table.static.shape
    Lt, Ht, B, nbt = agn.shape
    nb = min(nb1 - 1, nbt)
    rows = torch.arange(R)
    h, b = rows % backend.H, rows // backend.H
    src = torch.from_numpy(agn[:, :, :, :nb].astype(np.float32))
    for layer in range(L):
        table.static[layer, :, :nb] = src[layer % Lt][h % Ht, b].to(table.static.device)


def build_runner(cfg: E2EConfig, weights, stores: dict, traces: dict, copies: bool = True):
    """The runner of one configuration, its assembled batch and runtime configuration: ``(runner, batch, rcfg)``."""
    trace = load_source(cfg.source, traces)
    batch_trace = replay_batch(trace, cfg)
    steps = WARMUP + 2 + TIMED + 1
    if batch_trace.steps < steps:
        raise ValueError(f"{cfg.name}: the assembled batch has {batch_trace.steps} steps, fewer than the {steps} "
                         f"needed")
    ctx = batch_trace.context_len
    rcfg = RuntimeConfig(PRESETS[cfg.model], cfg.variant, batch=cfg.batch, context=int(ctx[0].max()) - 1,
                         steps=steps, budget=cfg.budget, policy=cfg.policy, microbatches=cfg.microbatches,
                         gather_programs=cfg.gather_programs, split_attention=cfg.split_attention,
                         kv_dtype=None if cfg.kv_dtype == "bf16" else cfg.kv_dtype,
                         ckey_dtype=None if cfg.ckey_dtype == "bf16" else cfg.ckey_dtype)
    kw = {}
    if cfg.budget is not None:
        host = host_store(rcfg, stores)
        rcfg = rcfg.with_(host_seqs=min(cfg.batch, host.kv.shape[1]))
        kw = dict(host=host, trace_sel=torch.from_numpy(batch_trace.sel[:steps].astype(np.int64)).cuda(),
                  ctx0=torch.from_numpy(ctx[0].astype(np.int64)).cuda(), copies=copies)
    r = Runner(rcfg, "cuda", weights=weights, **kw)
    if cfg.policy == "static":  # trace-driven 'static' ranks by the trace's agnostic score, as the simulator does
        load_trace_static(r.backend, batch_trace)
    return r, trace, rcfg


def run_config(cfg: E2EConfig, weights, stores: dict, traces, copies: bool = True) -> dict:
    r, trace, rcfg = build_runner(cfg, weights, stores, traces, copies)
    t = r.measure(steps=TIMED, warmup=WARMUP)
    out = {
        **cfg.to_fields(), "trace_sel_sha256": fingerprint(trace),
        "steps": [WARMUP + 2, WARMUP + 2 + TIMED],
        "measured": {"median_step_s": t.median_ms / 1e3, "p10_step_s": float(np.percentile(t.ms, 10)) / 1e3,
                     "p90_step_s": float(np.percentile(t.ms, 90)) / 1e3, "timed_steps": len(t.ms)},
        "step_ms": t.ms, "host_seqs": rcfg.n_host_seqs if cfg.budget else None,
        "runtime": {"selection": rcfg.selection, "gather_block": rcfg.gather_block},
    }
    if cfg.budget is not None:
        lo = WARMUP + 2
        out["loaded_blocks_per_step"] = r.backend.loaded[lo: lo + TIMED].sum((1, 2)).tolist()
    del r
    gc.collect()
    torch.cuda.empty_cache()
    return out


def profile_config(cfg: E2EConfig, weights, stores: dict, traces: dict, steps: int = 3, copies: bool = True) -> dict:
    """GPU time per kernel of one configuration's eager decode steps (torch.profiler), per step: where a step's
    time goes, kernel by kernel (launch gaps excluded: a replayed graph has few)."""
    r, _, _ = build_runner(cfg, weights, stores, traces, copies)
    rows = kernel_times(r, steps)
    del r
    gc.collect()
    torch.cuda.empty_cache()
    return {"name": cfg.name, "steps": steps, "kernels": rows,
            "total_us_per_step": sum(x["us_per_step"] for x in rows),
            "launches_per_step": sum(x["calls_per_step"] for x in rows)}


def kernel_times(r: Runner, steps: int = 3) -> list[dict]:
    """GPU time and calls per kernel name, per step, of ``steps`` eager steps of ``r`` after two warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        r.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            r.step()
        torch.cuda.synchronize()
    kernels: dict = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(ev.name, [0, 0.0])
            k[0] += 1
            k[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    return sorted(({"kernel": n[:120], "calls_per_step": c / steps, "us_per_step": t / steps}
                   for n, (c, t) in kernels.items()), key=lambda x: -x["us_per_step"])


def run(out_path: str, budget_s: float = 300.0, configs=CONFIGS) -> dict:
    t0 = time.time()
    shape = PRESETS["llama3-8b"]
    weights = Weights.random(shape, torch.bfloat16, "cuda", 0)
    stores: dict = {}
    res = {"env": environment(), "date": environment()["date"], "protocol": {"warmup": WARMUP, "timed": TIMED,
           "graph": True, "host_bytes": HOST_BYTES}, "runs": [], "skipped": []}
    res["device"] = {"name": res["env"].get("device"), "driver": res["env"].get("driver"),
                     "torch": res["env"].get("torch"), "triton": res["env"].get("triton")}
    traces: dict = {}
    for entry in configs:
        if time.time() - t0 > budget_s:
            res["skipped"].append({"name": entry.name, "why": "time budget"})
            continue
        try:
            r = run_config(entry, weights, stores, traces)
            res["runs"].append(r)
            print(f"{r['name']:22s} {1e3 * r['measured']['median_step_s']:8.2f} ms  "
                  f"{r['batch'] / r['measured']['median_step_s']:8.1f} tok/s", flush=True)
        except Exception as exc:  # noqa: BLE001 - one configuration's failure must not lose the others
            res["skipped"].append({"name": entry.name, "why": f"{type(exc).__name__}: {exc}"[:400]})
            gc.collect()
            torch.cuda.empty_cache()
        write_json(out_path, res)
    return res


def table(res: dict) -> str:
    lines = ["e2e: name                  ms/step    tok/s   p10-p90 ms"]
    for r in res["runs"]:
        m = r["measured"]
        lines.append(f"e2e: {r['name']:22s} {1e3 * m['median_step_s']:8.2f} {r['batch'] / m['median_step_s']:8.1f}"
                     f"   {1e3 * m['p10_step_s']:.2f}-{1e3 * m['p90_step_s']:.2f}")
    lines += [f"e2e skipped {s['name']}: {s['why'][:120]}" for s in res["skipped"]]
    return "\n".join(lines)

