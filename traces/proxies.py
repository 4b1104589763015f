"""Query-agnostic per-token scores for NOSA selection on models trained without an eviction head.

NOSA ranks old blocks by a learned eviction score ``cis = A * softplus(W_delta v)``: one value per
token and KV head that no later query changes. A model trained without that head has no such
score, so the recorder offers proxies behind one small interface, and a trained head plugs in the
same way (:class:`EvictionHead`). A proxy only produces *per-token* scores; pooling them into
frozen block scores is :func:`nosasim.scoring.static_block_scores`, shared by every proxy, so
proxies differ only in what they measure.

The interface, called by the recorder for every layer:

* ``extend(layer, keys, values)``: the new tokens' post-RoPE keys and values, ``[kv_heads, n, d]``;
* ``observe(layer, received)``: attention mass each cached token received from the queries just
  processed, ``[kv_heads, tokens]`` (the softmax summed over those queries and averaged over the
  query heads of a group); only proxies with ``needs_attention`` use it, and the recorder skips
  the cost of computing it during prefill when none does;
* ``scores(layer)``: the current per-token scores ``[kv_heads, tokens]``, higher means keep.

Everything is numpy: a proxy is plain arithmetic on arrays the recorder already holds.
"""

from __future__ import annotations

import numpy as np


class TokenScoreProxy:
    """Base class: stores per-layer per-token scores and appends the new tokens' scores."""

    name = "base"
    needs_attention = False
    description = ""

    def __init__(self) -> None:
        self._scores: dict[int, np.ndarray] = {}

    def token_scores_of(self, layer: int, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Scores of new tokens from their own keys/values, ``[kv_heads, n]``; 0 by default."""
        return np.zeros(keys.shape[:2], dtype=np.float32)

    def extend(self, layer: int, keys: np.ndarray, values: np.ndarray) -> None:
        keys, values = np.asarray(keys), np.asarray(values)
        if keys.ndim != 3 or values.shape[:2] != keys.shape[:2]:
            raise ValueError(f"keys and values must be [kv_heads, n, head_dim] with matching heads and tokens, "
                             f"got {keys.shape} and {values.shape}")
        new = np.asarray(self.token_scores_of(layer, keys, values), dtype=np.float32)
        old = self._scores.get(layer)
        self._scores[layer] = new if old is None else np.concatenate([old, new], axis=1)

    def observe(self, layer: int, received: np.ndarray) -> None:
        """Attention-driven proxies accumulate here; key/value proxies ignore attention."""

    def scores(self, layer: int) -> np.ndarray:
        if layer not in self._scores:
            raise ValueError(f"proxy {self.name!r} has seen no tokens of layer {layer}")
        return self._scores[layer]


class KeyNorm(TokenScoreProxy):
    """L2 norm of the key. RoPE is a rotation, so pre- and post-RoPE norms agree; large keys tend to
    draw large logits from any query, which makes the norm a cheap query-free guess of importance."""

    name = "key_norm"
    description = "L2 norm of each token's key (RoPE-invariant)"

    def token_scores_of(self, layer, keys, values):
        return np.linalg.norm(keys.astype(np.float32), axis=-1)


class ValueNorm(TokenScoreProxy):
    """L2 norm of the value: a token's contribution to the output scales with it, and NOSA's own
    eviction head is a function of the value alone, so this is its closest untrained analogue."""

    name = "value_norm"
    description = "L2 norm of each token's value"

    def token_scores_of(self, layer, keys, values):
        return np.linalg.norm(values.astype(np.float32), axis=-1)


class AccumulatedAttention(TokenScoreProxy):
    """Attention mass each token has received from every query so far (H2O's heavy-hitter score).

    It changes as queries arrive, which is why block scores are frozen when a block completes:
    the frozen value is the mass accumulated up to that moment. Early tokens are seen by more
    queries; that bias is part of the proxy and is kept, as H2O keeps it.
    """

    name = "attn_mass"
    needs_attention = True
    description = "attention mass received, accumulated over all queries so far (H2O)"

    def observe(self, layer, received):
        received = np.asarray(received, dtype=np.float32)
        cur = self.scores(layer)
        if received.shape != cur.shape:
            raise ValueError(f"received mass must be [kv_heads, tokens] = {cur.shape}, got {received.shape}")
        cur += received


class EvictionHead(TokenScoreProxy):
    """A trained NOSA eviction head: ``cis = A * softplus(W_delta v)`` per token and KV head.

    ``a`` float ``[layers, kv_heads]`` and ``w_delta`` float ``[layers, kv_heads, head_dim]`` are
    the head's parameters (``A`` starts at zero in training, which would make every score 0).
    """

    name = "eviction_head"
    description = "trained NOSA eviction head A * softplus(W_delta v)"

    def __init__(self, a: np.ndarray, w_delta: np.ndarray) -> None:
        super().__init__()
        self.a = np.asarray(a, dtype=np.float32)
        self.w = np.asarray(w_delta, dtype=np.float32)
        if self.a.ndim != 2 or self.w.shape[:2] != self.a.shape or self.w.ndim != 3:
            raise ValueError(f"eviction head: expected a [layers, kv_heads] and w_delta [layers, kv_heads, "
                             f"head_dim], got {self.a.shape} and {self.w.shape}")

    def token_scores_of(self, layer, keys, values):
        z = np.einsum("hnd,hd->hn", values.astype(np.float32), self.w[layer])
        return self.a[layer][:, None] * np.logaddexp(0.0, z)  # softplus, overflow-safe


PROXIES = {cls.name: cls for cls in (AccumulatedAttention, KeyNorm, ValueNorm)}


def make_proxy(name: str) -> TokenScoreProxy:
    """A fresh proxy by name (the names the recorder and ``nosasim reselect`` accept)."""
    if name not in PROXIES:
        raise ValueError(f"unknown query-agnostic proxy {name!r}; expected one of {sorted(PROXIES)}")
    return PROXIES[name]()
