"""Per-layer glue of a decode step: the decoder's and the offloaded backend's torch chains against the fused kernels.

Run: ``PYTHONPATH=. python benchmarks/bench_glue.py [out.json]``, or as a device-suite stage
(``python -m runtime.device_suite --stages bench:glue --out $OUT``). llama3-8b shape (32 query heads, 8 KV heads,
head dim 128, hidden 4096, MLP 14336), bf16, NOSA's state (compressed keys and eviction scores) at 8K context,
batch 1, 8, 32, 64, 128. One layer's glue, GEMMs and attention left out:

- torch: the decoder's ``rms_norm``, RoPE of q and k, the reshapes, ``OffloadBackend._cis``, ``append_token``, the
  new token's K/V into the pool as the backend writes it, the residual add and second ``rms_norm``, SiLU(gate) * up,
  the second residual add (cos/sin, computed once per step for all layers, are inputs);
- fused: ``rms_norm(down, w, residual=x)`` (the residual add of the layer before, fused into this layer's first
  norm), ``token_step`` (one launch), ``rms_norm(o, w, residual=x)``, ``silu_mul``: four launches.

Each is captured in a CUDA graph (10 layers per graph) and replayed (``runtime.timing.time_graph``); the three pieces
(norms, token step, SiLU-mul) are also timed alone, and the fused kernels at other launch parameters. ``bytes`` is
what the fused kernels must move at least (each input read once, each output written once); the share of the HBM
peak divides that rate by a 1 GiB device copy's (bytes read + written) measured in the same run. Correctness, in
the same run and recorded per batch: each fused result against the torch result from equal inputs and state
(bit-identical or not, and how far apart), and once more with inputs on which the reductions are exact (a 1/8 grid
for the norms, a dyadic grid for NOSA's dot product), where every output should be bit-identical.
"""

from __future__ import annotations

import sys
from dataclasses import fields, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from runtime import token_kernels as tk
from runtime.backends import OffloadBackend
from runtime.config import PRESETS
from runtime.model import rms_norm, rope
from runtime.selection import ScoreState, append_token
from runtime.timing import environment, hbm_copy_peak, time_graph, write_json

SHAPE = PRESETS["llama3-8b"]
BATCHES = (1, 8, 32, 64, 128)
CONTEXT, BLOCK, STRIDE, SLOTS = 8192, 64, 16, 4  # the tail is slot SLOTS - 1; other slots are never read here
DT = torch.bfloat16


def make_inputs(B: int, dev="cuda", seed: int = 0) -> dict:
    """One layer's inputs and state at batch B: positions spread over a block (so some rows complete a block, some
    finish a compressed key), random activations and state."""
    s, D, H = SHAPE, SHAPE.head_dim, SHAPE.kv_heads
    g = torch.Generator(device=dev).manual_seed(seed)
    R = B * H
    rnd = lambda *shape, dtype=DT: torch.randn(shape, generator=g, device=dev).to(dtype)  # noqa: E731
    max_tokens = CONTEXT + BLOCK
    nb = (max_tokens - 1) // BLOCK + 1
    st = ScoreState.allocate(1, R, D, max_tokens, nb, qaware=True, agnostic=True, dtype=DT, device=dev,
                             stride=STRIDE, block_size=BLOCK)
    for t in (st.ckeys, st.kacc, st.cis, st.cscore, st.sacc, st.static):
        t.copy_(torch.randn(t.shape, generator=g, device=dev))
    ctx = CONTEXT + 1 + torch.randint(0, BLOCK, (B,), generator=g, device=dev)
    pos = (ctx - 1).repeat_interleave(H)
    x = {
        "x": rnd(B, s.hidden), "o": rnd(B, s.hidden), "down": rnd(B, s.hidden),
        "attn_norm": (1 + 0.1 * rnd(s.hidden, dtype=torch.float32)).to(DT),
        "mlp_norm": (1 + 0.1 * rnd(s.hidden, dtype=torch.float32)).to(DT),
        "qkv": rnd(B, (s.q_heads + 2 * H) * D), "gu": rnd(B, 2 * s.intermediate),
        "inv_freq": 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D),
        "evict_w": rnd(H, D, dtype=torch.float32) / D ** 0.5,
        "evict_a": 0.5 * torch.rand(H, generator=g, device=dev),
        "state": st, "pool": rnd(R, SLOTS, 2, BLOCK, D), "pos": pos, "B": B, "R": R,
    }
    ang = pos.view(B, H)[:, 0].float()[:, None, None] * x["inv_freq"]  # the decoder's per-step cos/sin
    x["cos"], x["sin"] = ang.cos(), ang.sin()
    x["tail"], x["fill"] = pos // BLOCK, pos % BLOCK + 1
    x["tail_done"], x["old_tail"] = pos % BLOCK == 0, pos // BLOCK - 1
    x["dst_slot"] = torch.full_like(pos, SLOTS - 1)
    x["dst_tok"] = x["fill"] - 1
    return x


def clone_state(x: dict) -> dict:
    """Inputs with their own copy of everything the glue writes (state and pool)."""
    st = x["state"]
    return dict(x, state=replace(st, **{f.name: getattr(st, f.name).clone() for f in fields(st)
                                        if isinstance(getattr(st, f.name), torch.Tensor)}), pool=x["pool"].clone())


def _qkv(x):
    s, D, H = SHAPE, SHAPE.head_dim, SHAPE.kv_heads
    return x["qkv"].split([s.q_heads * D, H * D, H * D], -1)


def torch_pieces(x: dict) -> dict:
    """The torch chains, piece by piece, as the decoder and the backend run them today."""
    s, D, H, G = SHAPE, SHAPE.head_dim, SHAPE.kv_heads, SHAPE.group
    B, R = x["B"], x["R"]
    be = SimpleNamespace(rows=torch.arange(R, device=x["pos"].device), H=H, all_rows=slice(0, R))
    lw = SimpleNamespace(evict_w=x["evict_w"], evict_a=x["evict_a"])
    rows = torch.arange(R, device=x["pos"].device)
    C = SLOTS - 1

    def norms():
        x1 = x["x"] + x["down"]  # the residual add closing the layer before
        h = rms_norm(x1, x["attn_norm"])
        x2 = x1 + x["o"]
        return h, rms_norm(x2, x["mlp_norm"]), x2

    def token():
        q, k, v = _qkv(x)
        q = rope(q.view(B, s.q_heads, D), x["cos"], x["sin"])
        k = rope(k.view(B, H, D), x["cos"], x["sin"])
        q, k, v = q.view(R, G, D), k.reshape(R, D), v.reshape(R, D)
        cis = OffloadBackend._cis(be, lw, v)
        append_token(x["state"], 0, x["pos"], k, cis, x["tail_done"], x["old_tail"])
        x["pool"][rows, C, 0, x["fill"] - 1] = k
        x["pool"][rows, C, 1, x["fill"] - 1] = v
        return q, k

    def silu():
        gate, up = x["gu"].chunk(2, -1)
        return F.silu(gate) * up

    return {"norms": norms, "token": token, "silu": silu}


def token_buffers(x: dict) -> tk.TokenBuffers:
    st = x["state"]
    return tk.TokenBuffers.from_scores(st, 0, x["pos"], pool=x["pool"], dst_slot=x["dst_slot"], dst_tok=x["dst_tok"],
                                       evict_w=x["evict_w"], evict_a=x["evict_a"], tail_done=x["tail_done"],
                                       old_tail=x["old_tail"])


def fused_pieces(x: dict, token_warps=None, rms_warps=None, silu_block=1024, silu_warps=4) -> dict:
    buf = token_buffers(x)
    D = SHAPE.head_dim

    def norms():
        h, x1 = tk.rms_norm(x["down"], x["attn_norm"], residual=x["x"], num_warps=rms_warps)
        h2, x2 = tk.rms_norm(x["o"], x["mlp_norm"], residual=x1, num_warps=rms_warps)
        return h, h2, x2

    def token():
        q, k, v = _qkv(x)
        return tk.token_step(q, k, v, buf, head_dim=D, inv_freq=x["inv_freq"], num_warps=token_warps)

    def silu():
        return tk.silu_mul(x["gu"], block=silu_block, num_warps=silu_warps)

    return {"norms": norms, "token": token, "silu": silu}


def layer(pieces: dict):
    def run():
        for fn in pieces.values():
            fn()
    return run


def glue_bytes(B: int) -> dict:
    """Least bytes the fused kernels move per layer: every input read once, every output written once (bf16
    activations, fp32 scoring state; per-row indices int64)."""
    s, D, H, e = SHAPE, SHAPE.head_dim, SHAPE.kv_heads, 2
    R, per = B * H, BLOCK // STRIDE
    norm = 4 * B * s.hidden * e + s.hidden * e  # x, residual in; sum, normed out; w
    silu = 3 * B * s.intermediate * e
    token = (B * (s.q_heads + 2 * H) * D * e  # q, k, v
             + B * s.q_heads * D * e + R * D * e  # rotated q and k out
             + 2 * R * D * e  # K and V into the pool
             + R * D * e + 2 * 2 * R * D * 4  # compressed key out, running key sums in and out
             + H * D * 4 + H * 4 + D // 2 * 4  # eviction head, inverse frequencies
             + R * (4 * 8 + 1)  # pos, dst_slot, dst_tok, old_tail; tail_done
             + R * 4 * (1 + 1 + per + 1 + 4))  # cis, compressed score out, its window in, frozen score, sums
    return {"norms": 2 * norm, "token": token, "silu": silu, "layer": 2 * norm + token + silu}


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Bit-identical? Else the largest absolute and relative difference (NaN where both are NaN counts as equal)."""
    a, b = a.float(), b.float()
    both_nan = a.isnan() & b.isnan()
    same = bool(torch.equal(torch.where(both_nan, 0, a), torch.where(both_nan, 0, b)))
    d = torch.where(both_nan, 0, (a - b).abs())
    rel = d / b.abs().clamp(min=1e-30)
    return {"identical": same, "max_abs": float(d.max()) if d.numel() else 0.0,
            "max_rel": float(torch.where(d > 0, rel, 0).max()) if d.numel() else 0.0}


def check(x: dict, exact_inputs: bool = False) -> dict:
    """Fused against torch from equal inputs and state: every output and every state tensor the glue writes."""
    x = clone_state(x)
    if exact_inputs:  # reductions exact: norms' inputs on a 1/8 grid, NOSA's values and weights dyadic
        g = torch.Generator(device=x["pos"].device).manual_seed(7)

        def grid(t, lo, hi, den):
            return torch.randint(lo, hi, t.shape, generator=g, device=t.device).to(t.dtype) / den

        x = dict(x, x=grid(x["x"], -8, 9, 8), o=grid(x["o"], -8, 9, 8), down=grid(x["down"], -8, 9, 8),
                 qkv=x["qkv"].clone(), evict_w=grid(x["evict_w"], -32, 33, 16))
        _qkv(x)[2].copy_(grid(_qkv(x)[2], -24, 25, 8))
    xt, xf = clone_state(x), clone_state(x)
    t, f = torch_pieces(xt), fused_pieces(xf)
    out = {}
    h_t, h2_t, x2_t = t["norms"]()
    h_f, h2_f, x2_f = f["norms"]()
    out["attn_norm"], out["mlp_norm"], out["residual"] = _maxdiff(h_f, h_t), _maxdiff(h2_f, h2_t), _maxdiff(x2_f, x2_t)
    out["silu_mul"] = _maxdiff(f["silu"](), t["silu"]())
    (q_t, k_t), (q_f, k_f) = t["token"](), f["token"]()
    out["q_rot"], out["k_rot"] = _maxdiff(q_f, q_t), _maxdiff(k_f, k_t)
    out["pool"] = _maxdiff(xf["pool"], xt["pool"])
    for name in ("ckeys", "kacc", "cis", "cscore", "sacc", "static"):
        out[name] = _maxdiff(getattr(xf["state"], name), getattr(xt["state"], name))
    out["all_identical"] = all(v["identical"] for v in out.values())
    return out


def time_batch(B: int, peak: float, inner: int = 10, reps: int = 10) -> dict:
    x = make_inputs(B)
    row = {"batch": B, "rows": x["R"], "timing": f"cuda graph replay, {inner} layers per graph"}
    row["check"] = check(x)
    row["check_exact_inputs"] = check(x, exact_inputs=True)
    nbytes = glue_bytes(B)
    row["bytes"] = nbytes
    xt, xf = clone_state(x), clone_state(x)
    t, f = torch_pieces(xt), fused_pieces(xf)
    row["torch_s"] = time_graph(layer(t), inner=inner, reps=reps)
    row["fused_s"] = time_graph(layer(f), inner=inner, reps=reps)
    for name in t:
        row[f"{name}_torch_s"] = time_graph(t[name], inner=inner, reps=reps)
        row[f"{name}_fused_s"] = time_graph(f[name], inner=inner, reps=reps)
        row[f"{name}_hbm_share"] = nbytes[name] / row[f"{name}_fused_s"] / peak
    row["speedup"] = row["torch_s"] / row["fused_s"]
    row["fused_Bps"] = nbytes["layer"] / row["fused_s"]
    row["fused_hbm_share"] = row["fused_Bps"] / peak
    row["torch_hbm_share"] = nbytes["layer"] / row["torch_s"] / peak
    return row


def variants(B: int, inner: int = 10, reps: int = 10) -> list[dict]:
    """The fused kernels at other launch parameters than the wrappers' defaults."""
    x = make_inputs(B)
    out = []
    for w in (1, 2, 4):
        fn = fused_pieces(clone_state(x), token_warps=w)["token"]
        out.append({"kernel": "token_step", "num_warps": w, "seconds": time_graph(fn, inner=inner, reps=reps)})
    for w in (4, 8, 16):
        fn = fused_pieces(x, rms_warps=w)["norms"]
        out.append({"kernel": "rms_norm x2", "num_warps": w, "seconds": time_graph(fn, inner=inner, reps=reps)})
    for blk, w in ((512, 4), (1024, 4), (2048, 8), (4096, 8)):
        fn = fused_pieces(x, silu_block=blk, silu_warps=w)["silu"]
        out.append({"kernel": "silu_mul", "block": blk, "num_warps": w,
                    "seconds": time_graph(fn, inner=inner, reps=reps)})
    return [dict(r, batch=B) for r in out]


def kernel_count(B: int = 8) -> dict:
    """Kernels one layer's glue launches, torch chain and fused (torch profiler, one eager call each)."""
    from torch.profiler import ProfilerActivity, profile

    x = make_inputs(B)
    out = {}
    for name, pieces in (("torch", torch_pieces(clone_state(x))), ("fused", fused_pieces(clone_state(x)))):
        fn = layer(pieces)
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        out[name] = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    return out


def run(out_path: str | None = None, batches=BATCHES, experiments: bool = True) -> dict:
    peak = hbm_copy_peak()
    res = {"env": environment(), "hbm_peak_Bps": peak,
           "shape": {"q_heads": SHAPE.q_heads, "kv_heads": SHAPE.kv_heads, "head_dim": SHAPE.head_dim,
                     "hidden": SHAPE.hidden, "intermediate": SHAPE.intermediate, "dtype": "bfloat16",
                     "context": CONTEXT, "block_size": BLOCK, "stride": STRIDE, "state": "nosa (compressed keys + "
                     "eviction scores)"},
           "rows": [time_batch(B, peak) for B in batches]}
    res["all_exact_inputs_identical"] = all(r["check_exact_inputs"]["all_identical"] for r in res["rows"])
    if experiments:
        res["variants"] = variants(64) + variants(128)
        try:
            res["kernels_per_layer"] = kernel_count()
        except Exception as exc:  # noqa: BLE001 - a profiler problem must not lose the timings
            res["kernels_per_layer"] = {"error": f"{type(exc).__name__}: {exc}"}
    if out_path:
        write_json(out_path, res)
    return res


def _diffs(chk: dict) -> str:
    bad = [f"{k} {v['max_rel']:.1e}" for k, v in chk.items() if isinstance(v, dict) and not v["identical"]]
    return "identical" if not bad else "differ: " + ", ".join(bad)


def table(res: dict) -> str:
    us = 1e6
    lines = [f"{res['env'].get('device', '?')}; HBM peak (1 GiB copy, read + write) {res['hbm_peak_Bps'] / 1e12:.2f} "
             f"TB/s; per-layer glue, llama3-8b, bf16, NOSA state; us per layer (torch / fused)",
             "batch  layer torch  fused  speedup  | norms x2         token step       silu*mul        | "
             "fused KiB  %HBM (torch)"]
    for r in res["rows"]:
        pieces = "  ".join(f"{r[f'{p}_torch_s'] * us:6.1f} /{r[f'{p}_fused_s'] * us:6.1f}" for p in
                           ("norms", "token", "silu"))
        lines.append(f"{r['batch']:5d}  {r['torch_s'] * us:11.1f} {r['fused_s'] * us:6.1f}  {r['speedup']:6.1f}x  | "
                     f"{pieces} | {r['bytes']['layer'] / 1024:9.0f}  {100 * r['fused_hbm_share']:4.1f}% "
                     f"({100 * r['torch_hbm_share']:.1f}%)")
    for r in res["rows"]:
        shares = ", ".join(f"{p} {r['bytes'][p] / 1024:.0f} KiB {100 * r[f'{p}_hbm_share']:.1f}%"
                           for p in ("norms", "token", "silu"))
        lines.append(f"  batch {r['batch']:3d} fused bytes and share of HBM peak: {shares}")
    for r in res["rows"]:
        lines.append(f"  batch {r['batch']:3d} random inputs: {_diffs(r['check'])}; exact-sum inputs: "
                     f"{_diffs(r['check_exact_inputs'])}")
    lines.append(f"all outputs bit-identical on exact-sum inputs: {res['all_exact_inputs_identical']}")
    kc = res.get("kernels_per_layer")
    if kc:
        lines.append(f"kernels per layer (batch 8): {kc}")
    for v in res.get("variants", []):
        params = ", ".join(f"{k}={v[k]}" for k in ("num_warps", "block") if k in v)
        lines.append(f"  {v['kernel']:11s} b{v['batch']} {params}: {v['seconds'] * us:.1f} us")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run(sys.argv[1] if len(sys.argv) > 1 else None)))
