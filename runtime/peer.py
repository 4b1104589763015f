"""Peer baseline: the same model shape decoded by transformers' ``generate`` with a static cache.

Per-token time is ``(t(1 + N new tokens) - t(1 new token)) / N``: both calls run the same prefill, so the
difference is N decode steps including generate's own per-step overhead, which is what a user of it pays.
``torch.compile`` is off (``disable_compile``): compiling 32 layers costs minutes of device time per shape.
"""

from __future__ import annotations

import time

import torch


def transformers_generate(batch: int, context: int, new_tokens: int = 32, shape=None) -> dict:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from .config import PRESETS

    s = shape or PRESETS["llama3-8b"]
    cfg = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                      num_attention_heads=s.q_heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                      vocab_size=s.vocab, max_position_embeddings=context + new_tokens + 8, rope_theta=500000.0,
                      attn_implementation="sdpa")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    ids = torch.randint(0, s.vocab, (batch, context), device="cuda")
    mask = torch.ones_like(ids)

    def gen(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, cache_implementation="static", disable_compile=True,
                                 pad_token_id=0, eos_token_id=None)
        torch.cuda.synchronize()
        assert out.shape[1] == context + n, out.shape
        return time.perf_counter() - t0

    gen(2)  # warm-up: kernels, cache allocation
    t1 = gen(1)
    tn = gen(1 + new_tokens)
    per = (tn - t1) / new_tokens
    del model
    torch.cuda.empty_cache()
    return {"library": "transformers", "version": transformers.__version__, "batch": batch, "context": context,
            "new_tokens": new_tokens, "prefill_plus_one_s": t1, "per_token_step_ms": per * 1e3,
            "tokens_per_s": batch / per, "cache": "static", "compile": False, "attn": "sdpa"}
