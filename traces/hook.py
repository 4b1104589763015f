"""The attention tap: sees every layer's real post-RoPE query, keys and values while the model runs.

It is registered as a transformers attention function (``AttentionInterface``), so the model's
own code runs unchanged and calls it where it would call SDPA. The tap returns SDPA's output
untouched (the model decodes exactly as it would) and, beside it, recomputes dense attention
(float32 matmul, explicit softmax) from the same tensors: that recomputation gives the true
attention mass per block and is checked against SDPA's output at every decode step
(``max_abs_err``), which proves that what the tap scores is what the model attends with.

The tap registers itself under one global name, so one tap is live per process at a time.

Per decode step, layer and KV head it stores the InfLLM-V2 block scores, the true attention mass
per block, and the frozen static scores of every query-agnostic proxy. Batch size must be 1.

Optionally (``ckey_roundings``) it also scores every decode step from compressed keys rounded to a
storage dtype, as a GPU kernel reading keys stored in that dtype computes: the query rounded to
bf16 (or another query rounding), the keys converted exactly, products accumulated in float32
(:func:`rounded_block_scores`). ``benchmarks/bench_ckey_precision.py`` measures with it what fp8
compressed keys do to block selection.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from nosasim import scoring

ATTN_NAME = "nosasim_tap"
PREFILL_CHUNK = 512  # prefill queries per chunk when proxies need the mass each token received
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value


def _round_via(x, dtype: torch.dtype) -> np.ndarray:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t.float().to(dtype).float().numpy()


def round_bf16(x) -> np.ndarray:
    """``x`` (float32 array or tensor) rounded to bfloat16 (round to nearest even), as float32 numpy."""
    return _round_via(x, torch.bfloat16)


def round_fp16(x) -> np.ndarray:
    """``x`` rounded to float16 (round to nearest even), as float32 numpy."""
    return _round_via(x, torch.float16)


def round_fp8_e4m3(x) -> np.ndarray:
    """``x`` rounded to float8 e4m3 (``torch.float8_e4m3fn``, no scale), saturating at +-448, as float32 numpy.

    The clamp makes the saturation explicit (some torch conversions give NaN past the largest value)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return _round_via(t.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX), torch.float8_e4m3fn)


def rounded_block_scores(query: np.ndarray, ckeys_rounded: np.ndarray, n_tokens: int, *, scale: float,
                         block_size: int = scoring.BLOCK_SIZE, query_round=round_bf16) -> np.ndarray:
    """InfLLM-V2 block scores from compressed keys already rounded to their storage dtype.

    The query is rounded with ``query_round`` (bf16 by default); keys and query are then exact float32
    values, so the float32 dot of :func:`nosasim.scoring.block_scores_from_compressed` is what a kernel
    computes with the keys converted exactly to the query's 16-bit type and float32 accumulation (a product
    of two 16-bit floats is exact in float32), up to the order of the sums."""
    q = query_round(query) if query_round is not None else np.asarray(query, np.float32)
    return scoring.block_scores_from_compressed(q, ckeys_rounded, n_tokens, scale=scale, block_size=block_size)


def _rounding_pair(name: str, spec):
    """A ``ckey_roundings`` value -> ``(key_round, query_round)``: a callable rounds the keys (query to bf16),
    a pair gives both."""
    if callable(spec):
        return spec, round_bf16
    if isinstance(spec, tuple) and len(spec) == 2 and callable(spec[0]) and (spec[1] is None or callable(spec[1])):
        return spec
    raise ValueError(f"ckey_roundings[{name!r}]: expected a callable or a (key_round, query_round) pair, got {spec!r}")


class AttentionTap:
    """Collects score arrays ``[steps, layers, kv_heads, 1, n_blocks]`` while a model decodes.

    Set :attr:`step` to the decode step index before each single-token forward, and to ``None``
    for the prefill forward.

    ``ckey_roundings`` (optional) maps a name to a function rounding float32 compressed keys (numpy array or
    tensor) to a storage dtype's values (e.g. :func:`round_bf16`, :func:`round_fp8_e4m3`), or to a pair
    ``(key_round, query_round)``; a plain function scores against the query rounded to bf16. For each name,
    :attr:`qaware_by` ``[name]`` (shaped like :attr:`qaware`) receives the block scores from the rounded keys
    (:func:`rounded_block_scores`). Without it the tap records exactly what it always did.
    """

    def __init__(self, layers: int, kv_heads: int, steps: int, n_blocks: int, proxies: dict, block_size: int = 64,
                 ckey_roundings: dict | None = None):
        self.layers, self.kv_heads, self.block_size = layers, kv_heads, block_size
        self.proxies = proxies
        self.qaware = np.full((steps, layers, kv_heads, 1, n_blocks), np.nan, np.float32)
        self.mass = np.full_like(self.qaware, np.nan)
        self.static = {name: np.full((layers, kv_heads, 1, n_blocks), np.nan, np.float32) for name in proxies}
        self.step: int | None = None
        self._ck: dict[int, np.ndarray] = {}
        self._roundings = {name: _rounding_pair(name, spec) for name, spec in (ckey_roundings or {}).items()}
        self.qaware_by = {name: np.full_like(self.qaware, np.nan) for name in self._roundings}
        self._ck_by: dict[str, dict[int, np.ndarray]] = {name: {} for name in self._roundings}
        self._frozen = [0] * layers
        self.max_abs_err = 0.0
        self.max_abs_out = 0.0
        self.checked = 0

    @property
    def rel_err(self) -> float:
        return self.max_abs_err / self.max_abs_out if self.max_abs_out else 0.0

    def install(self, model) -> None:
        """Route the model's attention through this tap (the mask builder stays SDPA's)."""
        AttentionInterface.register(ATTN_NAME, self._attention)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
        model.set_attn_implementation(ATTN_NAME)

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                              dropout=dropout, **kwargs)
        if query.shape[0] != 1:
            raise ValueError(f"the recorder traces one sequence: batch size must be 1, got {query.shape[0]}")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        with torch.no_grad():
            self._observe(module.layer_idx, query[0], key[0], value[0], float(scale), out[0])
        return out, weights

    def _observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, out) -> None:
        n_q, n_tok = q.shape[1], k.shape[1]
        kk, vv = k.float(), v.float()
        new_k = kk[:, n_tok - n_q:].numpy()
        new_v = vv[:, n_tok - n_q:].numpy()
        for proxy in self.proxies.values():
            proxy.extend(layer, new_k, new_v)
        self._grow_compressed(layer, kk, n_tok)
        if self.step is None:
            self._prefill_mass(layer, q.float(), kk, scale)
            return
        if n_q != 1:
            raise RuntimeError(f"decode step {self.step} saw {n_q} queries; the recorder decodes one token at a time")
        self._freeze(layer, n_tok)
        hkv = kk.shape[0]
        qg = q[:, 0].float().reshape(hkv, -1, q.shape[-1])  # [kv_heads, group, d]
        probs = torch.softmax(torch.matmul(qg, kk.transpose(1, 2)) * scale, dim=-1)  # [kv_heads, group, tokens]
        ref = torch.matmul(probs, vv).reshape(-1, vv.shape[-1])
        got = out[0].float()  # SDPA returns [q_len, q_heads, d]
        self.max_abs_err = max(self.max_abs_err, float((got - ref).abs().max()))
        self.max_abs_out = max(self.max_abs_out, float(ref.abs().max()))
        self.checked += 1
        received = probs.mean(dim=1).numpy()  # [kv_heads, tokens]: one query's mass sums to 1 per KV head
        nb = (n_tok - 1) // self.block_size + 1
        t = self.step
        self.mass[t, layer, :, 0, :nb] = scoring.block_attention_mass(received, self.block_size)
        self.qaware[t, layer, :, 0, :nb] = scoring.block_scores_from_compressed(
            q[:, 0].float().numpy(), self._ck[layer], n_tok, scale=scale, block_size=self.block_size)
        for name, (_, query_round) in self._roundings.items():
            self.qaware_by[name][t, layer, :, 0, :nb] = rounded_block_scores(
                q[:, 0].float().numpy(), self._ck_by[name][layer], n_tok, scale=scale, block_size=self.block_size,
                query_round=query_round)
        for proxy in self.proxies.values():
            if proxy.needs_attention:
                proxy.observe(layer, received)

    def _grow_compressed(self, layer: int, kk: torch.Tensor, n_tok: int) -> None:
        """Append the compressed keys of windows completed since the last call (they never change)."""
        have = self._ck.get(layer)
        n_old = 0 if have is None else have.shape[1]
        n_new = scoring.n_windows(n_tok)
        if n_new > n_old:
            lo, hi = n_old * scoring.STRIDE, (n_new - 1) * scoring.STRIDE + scoring.WINDOW
            fresh = scoring.compressed_keys(kk[:, lo:hi].numpy())
            self._ck[layer] = fresh if have is None else np.concatenate([have, fresh], axis=1)
            for name, (key_round, _) in self._roundings.items():  # rounding is elementwise: round only what is new
                r = np.asarray(key_round(fresh), dtype=np.float32)
                if r.shape != fresh.shape:
                    raise ValueError(f"ckey_roundings[{name!r}] returned shape {r.shape} for keys {fresh.shape}")
                old = self._ck_by[name].get(layer)
                self._ck_by[name][layer] = r if old is None else np.concatenate([old, r], axis=1)
        elif have is None:
            self._ck[layer] = np.zeros((kk.shape[0], 0, kk.shape[2]), np.float32)
            for name in self._roundings:
                self._ck_by[name][layer] = self._ck[layer]

    def _freeze(self, layer: int, n_tok: int) -> None:
        """Fix the static score of blocks completed since the last step, before this step's query
        attends: the selection of a step may only use what is known when it is made."""
        n_complete = (n_tok - 1) // self.block_size
        lo = self._frozen[layer]
        if n_complete <= lo:
            return
        for name, proxy in self.proxies.items():
            tok = proxy.scores(layer)[:, : n_complete * self.block_size]
            self.static[name][layer, :, 0, lo:n_complete] = scoring.static_block_scores(
                tok, block_size=self.block_size)[:, lo:]
        self._frozen[layer] = n_complete

    def _prefill_mass(self, layer: int, q: torch.Tensor, kk: torch.Tensor, scale: float) -> None:
        """Mass each token received from all prompt queries (causal), chunked to bound memory."""
        if not any(p.needs_attention for p in self.proxies.values()):
            return
        hkv, n_tok, d = kk.shape
        n_q = q.shape[1]
        qg = q.reshape(hkv, -1, n_q, d)
        received = torch.zeros(hkv, n_tok, dtype=torch.float64)  # float64: sums of up to n_q terms
        pos = torch.arange(n_tok)
        for lo in range(0, n_q, PREFILL_CHUNK):
            hi = min(lo + PREFILL_CHUNK, n_q)
            end = n_tok - n_q + hi  # keys any query of this chunk may see
            logits = torch.matmul(qg[:, :, lo:hi], kk[:, None, :end].transpose(2, 3)) * scale
            qpos = torch.arange(n_tok - n_q + lo, n_tok - n_q + hi)
            logits.masked_fill_(pos[None, :end] > qpos[:, None], float("-inf"))
            received[:, :end] += torch.softmax(logits, dim=-1).sum(dim=2).mean(dim=1).double()
        for proxy in self.proxies.values():
            if proxy.needs_attention:
                proxy.observe(layer, received.numpy())
