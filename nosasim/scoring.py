"""Block scores for selection: InfLLM-V2 query-aware scores and static (query-agnostic) block scores.

This is the CPU reference the recorder uses and the GPU runtime tests its kernels against, so
every rule is spelled out here once (docs/recording.md, the method's scoring rules):

* **Compressed keys.** Keys are mean-pooled over windows of ``window`` = 32 tokens with stride
  ``stride`` = 16. Window ``i`` covers tokens ``[i * stride, i * stride + window)``; only complete
  windows exist, because a partial window's mean would change as tokens arrive (the partial tail
  is covered by the always-selected local window anyway).
* **InfLLM-V2 block scores.** Each decode query head takes a softmax (scale ``1/sqrt(head_dim)``)
  over the compressed keys of its KV head; the probabilities are summed over the query heads of
  one GQA group and max-pooled into ``block_size`` = 64-token blocks, a window counting for every
  block it overlaps.
* **Static block scores.** A per-token query-agnostic score (NOSA's eviction score, or a proxy)
  is average-pooled over the same 32/16 windows, then max-pooled into blocks. A block's score is
  *frozen* when the block completes: only windows that end inside ``[0, (b + 1) * block_size)``
  count, so the value never changes afterwards and the query-agnostic ranking of old blocks is
  stable from step to step (which is what bounds NOSA's adjacent-step overlap from below).

A block that no window reaches (a young partial tail) scores 0 for InfLLM-V2, the lowest value a
softmax probability can take; it is always inside the local window, so its score never decides a
selection. Only numpy is used: the simulator side of nosasim never imports torch.
"""

from __future__ import annotations

import numpy as np

WINDOW = 32
STRIDE = 16
BLOCK_SIZE = 64


def _check_pooling(window: int, stride: int, block_size: int) -> None:
    for name, value in (("window", window), ("stride", stride), ("block_size", block_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def n_windows(n_tokens: int, window: int = WINDOW, stride: int = STRIDE) -> int:
    """Number of complete pooling windows over ``n_tokens`` tokens."""
    return 0 if n_tokens < window else (n_tokens - window) // stride + 1


def avg_pool(x: np.ndarray, window: int = WINDOW, stride: int = STRIDE, axis: int = -1) -> np.ndarray:
    """Mean over complete windows of ``window`` entries every ``stride`` along ``axis``.

    Computed from a strided view (no prefix sums), so the result is as exact as a direct mean
    even over long contexts in float32.
    """
    _check_pooling(window, stride, 1)
    x = np.asarray(x)
    axis = axis % x.ndim
    n = x.shape[axis]
    nw = n_windows(n, window, stride)
    if nw == 0:
        shape = list(x.shape)
        shape[axis] = 0
        return np.zeros(shape, dtype=np.result_type(x.dtype, np.float32))
    view = np.lib.stride_tricks.sliding_window_view(x, window, axis=axis)
    view = np.take(view, np.arange(nw) * stride, axis=axis)
    return view.mean(axis=-1, dtype=np.float64).astype(np.result_type(x.dtype, np.float32), copy=False)


def compressed_keys(keys: np.ndarray, window: int = WINDOW, stride: int = STRIDE) -> np.ndarray:
    """``keys [..., tokens, head_dim]`` -> compressed keys ``[..., n_windows, head_dim]`` (window means)."""
    keys = np.asarray(keys)
    if keys.ndim < 2:
        raise ValueError(f"keys must have shape [..., tokens, head_dim], got {keys.shape}")
    return avg_pool(keys, window, stride, axis=-2)


def window_block_index(n_win: int, n_blocks: int, *, frozen: bool, window: int = WINDOW, stride: int = STRIDE,
                       block_size: int = BLOCK_SIZE) -> np.ndarray:
    """``int64 [n_blocks, m]``: the windows each block max-pools over, -1 padded.

    Window ``i`` overlaps block ``b`` when ``i*stride < (b+1)*block_size`` and
    ``i*stride + window > b*block_size``. With ``frozen`` only windows that also end inside
    ``[0, (b+1)*block_size)`` count: those are all the windows that exist when block ``b``
    completes, which makes the pooled value final.
    """
    _check_pooling(window, stride, block_size)
    if n_win < 0 or n_blocks < 0:
        raise ValueError(f"n_win and n_blocks must be >= 0, got {n_win}, {n_blocks}")
    m = (window + block_size - 1) // stride + 1  # most windows that can overlap one block
    b = np.arange(n_blocks)[:, None]
    # First window that can overlap block b: smallest i with i*stride + window > b*block_size.
    first = np.maximum((b * block_size - window) // stride + 1, 0)
    idx = first + np.arange(m)[None, :]
    start = idx * stride
    ok = (idx < n_win) & (start < (b + 1) * block_size) & (start + window > b * block_size)
    if frozen:
        ok &= start + window <= (b + 1) * block_size
    return np.where(ok, idx, -1)


def pool_windows_to_blocks(win_scores: np.ndarray, n_blocks: int, *, frozen: bool = False, fill: float = 0.0,
                           window: int = WINDOW, stride: int = STRIDE, block_size: int = BLOCK_SIZE) -> np.ndarray:
    """Max-pool per-window scores ``[..., n_windows]`` into ``[..., n_blocks]``.

    A block no (eligible) window reaches gets ``fill``.
    """
    win_scores = np.asarray(win_scores)
    idx = window_block_index(win_scores.shape[-1], n_blocks, frozen=frozen, window=window, stride=stride,
                             block_size=block_size)
    padded = np.concatenate([win_scores, np.full(win_scores.shape[:-1] + (1,), -np.inf, win_scores.dtype)], axis=-1)
    gathered = padded[..., np.where(idx < 0, win_scores.shape[-1], idx)]  # [..., n_blocks, m]
    out = gathered.max(axis=-1, initial=-np.inf)
    return np.where(np.isneginf(out), fill, out)


def infllmv2_block_scores(query: np.ndarray, keys: np.ndarray, *, scale: float | None = None, window: int = WINDOW,
                          stride: int = STRIDE, block_size: int = BLOCK_SIZE) -> np.ndarray:
    """InfLLM-V2 query-aware scores of every existing block for one decode step.

    ``query [..., q_heads, head_dim]`` is the post-RoPE decode query; ``keys [..., kv_heads, tokens,
    head_dim]`` the post-RoPE keys in the cache, the new token's included. Query head ``h`` belongs
    to KV head ``h // (q_heads // kv_heads)`` (the ``repeat_kv`` convention of Llama-style models).
    Returns float32 ``[..., kv_heads, n_blocks]`` with ``n_blocks = (tokens - 1) // block_size + 1``
    (the partial tail included).
    """
    keys = np.asarray(keys)
    if keys.ndim < 3:
        raise ValueError(f"keys must be [..., kv_heads, tokens, head_dim], got {keys.shape}")
    ck = compressed_keys(keys.astype(np.float32, copy=False), window, stride)
    return block_scores_from_compressed(query, ck, keys.shape[-2], scale=scale, window=window, stride=stride,
                                        block_size=block_size)


def block_scores_from_compressed(query: np.ndarray, ckeys: np.ndarray, n_tokens: int, *, scale: float | None = None,
                                 window: int = WINDOW, stride: int = STRIDE,
                                 block_size: int = BLOCK_SIZE) -> np.ndarray:
    """:func:`infllmv2_block_scores` from already compressed keys ``[..., kv_heads, n_windows, head_dim]``.

    Compressed keys only grow (one window every ``stride`` tokens), so a decoder keeps them and
    appends; this is the per-step part. ``n_tokens`` (new token included) sets ``n_blocks``.
    """
    query, ckeys = np.asarray(query), np.asarray(ckeys)
    if query.ndim < 2 or ckeys.ndim < 3:
        raise ValueError(f"query must be [..., q_heads, head_dim] and compressed keys [..., kv_heads, windows, "
                         f"head_dim], got {query.shape} and {ckeys.shape}")
    hq, d = query.shape[-2:]
    hkv, nw, dk = ckeys.shape[-3:]
    if dk != d or hq % hkv:
        raise ValueError(f"query {query.shape} and keys {ckeys.shape}: head_dim must match and q_heads must be a "
                         f"multiple of kv_heads")
    if n_tokens < 1 or nw != n_windows(n_tokens, window, stride):
        raise ValueError(f"n_tokens ({n_tokens}) must be >= 1 and give the {nw} compressed keys passed "
                         f"(expected {n_windows(max(n_tokens, 0), window, stride)})")
    scale = d ** -0.5 if scale is None else scale
    n_blocks = (n_tokens - 1) // block_size + 1
    if nw == 0:
        return np.zeros(ckeys.shape[:-3] + (hkv, n_blocks), dtype=np.float32)
    q = query.astype(np.float32, copy=False).reshape(query.shape[:-2] + (hkv, hq // hkv, d))
    logits = np.einsum("...hgd,...hwd->...hgw", q, ckeys.astype(np.float32, copy=False)) * np.float32(scale)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)
    win = p.sum(axis=-2)  # sum over the query heads of a group
    return pool_windows_to_blocks(win, n_blocks, window=window, stride=stride, block_size=block_size).astype(np.float32)


def static_block_scores(token_scores: np.ndarray, *, window: int = WINDOW, stride: int = STRIDE,
                        block_size: int = BLOCK_SIZE) -> np.ndarray:
    """Frozen static scores of the complete blocks from per-token scores ``[..., tokens]``.

    Returns float32 ``[..., tokens // block_size]``: block ``b``'s value is what it is at the
    moment ``b`` completes (windows ending after ``(b+1)*block_size`` are ignored), so calling
    this again with more tokens (and unchanged per-token scores) never changes an earlier block.
    Blocks whose frozen windows are all missing (only possible when ``window > block_size``) get NaN.
    """
    token_scores = np.asarray(token_scores, dtype=np.float32)
    n_complete = token_scores.shape[-1] // block_size
    win = avg_pool(token_scores, window, stride, axis=-1)
    out = pool_windows_to_blocks(win, n_complete, frozen=True, fill=np.nan, window=window, stride=stride,
                                 block_size=block_size)
    return out.astype(np.float32)


def block_attention_mass(probs: np.ndarray, block_size: int = BLOCK_SIZE) -> np.ndarray:
    """Sum attention probabilities ``[..., tokens]`` per block -> ``[..., (tokens - 1) // block_size + 1]``."""
    probs = np.asarray(probs)
    n = probs.shape[-1]
    if n < 1:
        raise ValueError("probs must cover at least one token")
    nb = (n - 1) // block_size + 1
    pad = nb * block_size - n
    if pad:
        probs = np.concatenate([probs, np.zeros(probs.shape[:-1] + (pad,), probs.dtype)], axis=-1)
    return probs.reshape(probs.shape[:-1] + (nb, block_size)).sum(axis=-1)
