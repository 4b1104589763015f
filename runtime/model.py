"""One Llama-shaped decoder (RMSNorm, RoPE, GQA, SwiGLU) for every attention variant.

The decoder owns the weights and the token path; everything about where K/V live and which blocks are attended is
the attention backend's (``backends.DenseBackend`` or ``backends.OffloadBackend``), passed in. A decode step is
pure device work reading device state (token ids, context lengths, the step counter), so it can be captured once
in a CUDA graph and replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nosasim.contract import microbatch_groups, program  # the simulator's split and issue order themselves
from nosasim.models import ModelSpec

from . import token_kernels


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    wqkv: torch.Tensor  # [hidden, (q_heads + 2 kv_heads) * head_dim]
    wo: torch.Tensor  # [q_heads * head_dim, hidden]
    mlp_norm: torch.Tensor
    w13: torch.Tensor  # [hidden, 2 * mlp]: gate and up in one GEMM
    w2: torch.Tensor  # [mlp, hidden]
    evict_w: torch.Tensor  # float32 [kv_heads, head_dim]: NOSA's W_delta (one score per token and KV head)
    evict_a: torch.Tensor  # float32 [kv_heads]: NOSA's A


@dataclass
class Weights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor

    @classmethod
    def random(cls, shape: ModelSpec, dtype=torch.bfloat16, device="cpu", seed: int = 0) -> "Weights":
        """Random weights scaled by 1/sqrt(fan-in), so activations stay O(1) through every layer."""
        g = torch.Generator(device=device).manual_seed(seed)

        def w(rows, cols):
            return (torch.randn(rows, cols, generator=g, device=device, dtype=dtype) / rows ** 0.5)

        s, d = shape, shape.head_dim
        layers = [LayerWeights(
            attn_norm=torch.ones(s.hidden, device=device, dtype=dtype),
            wqkv=w(s.hidden, (s.q_heads + 2 * s.kv_heads) * d), wo=w(s.q_heads * d, s.hidden),
            mlp_norm=torch.ones(s.hidden, device=device, dtype=dtype),
            w13=w(s.hidden, 2 * s.intermediate), w2=w(s.intermediate, s.hidden),
            evict_w=torch.randn(s.kv_heads, d, generator=g, device=device) / d ** 0.5,
            evict_a=0.5 * torch.rand(s.kv_heads, generator=g, device=device),
        ) for _ in range(s.layers)]
        return cls(torch.randn(s.vocab, s.hidden, generator=g, device=device, dtype=dtype), layers,
                   torch.ones(s.hidden, device=device, dtype=dtype), w(s.hidden, s.vocab))


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm in torch: the reference of ``runtime.token_kernels.rms_norm``."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (Llama's convention); ``x [B, heads, D]``, ``cos/sin [B, 1, D/2]``. The reference of the
    rotation inside ``runtime.token_kernels.token_step``."""
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class Decoder:
    """Token path of one decode step; the backend's ``prepare``/``finish`` do everything KV-related.

    Per layer and micro-batch: RMSNorm with the previous layer's residual add fused in, the QKV GEMM, then the
    backend's ``prepare`` (RoPE, the K/V append and the scoring-state update in one kernel, selection, block
    table, copies); later ``finish`` (attention), the O projection, RMSNorm with its residual add, the gate/up
    GEMM, SiLU-mul, the down GEMM. The norms and SiLU-mul are ``runtime.token_kernels``'s (one launch each, torch
    on the CPU), so a layer is about a dozen launches."""

    def __init__(self, shape: ModelSpec, weights: Weights, backend, tokens: torch.Tensor, theta: float = 500000.0,
                 microbatches: int = 1):
        self.shape, self.w, self.backend, self.tokens = shape, weights, backend, tokens
        # The simulator's split of the batch: contiguous, nearly equal groups of sequences.
        self.groups = [(g.start, g.stop) for g in microbatch_groups(tokens.shape[0], microbatches)]
        d = shape.head_dim
        self.inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=tokens.device, dtype=torch.float32) / d)

    def step(self) -> None:
        """One decode step in the micro-batch schedule of ``nosasim.contract.program``: for each layer, a
        micro-batch's "pre" half (norm, QKV, RoPE, selection, table update, transfers issued) runs after the other
        micro-batches' "post" half of the layer before (attention, O projection, MLP), so its transfers overlap
        their compute. With one micro-batch this is the plain layer-by-layer step."""
        s, w, be = self.shape, self.w, self.backend
        be.begin_step()
        H, D = s.kv_heads, s.head_dim
        parts = [(b0, b1, be.part_rows(b0, b1)) for b0, b1 in self.groups]
        # Per part: the residual stream and the last layer's output still to be added to it (None at layer 0).
        xs = [w.embed[self.tokens[b0:b1]] for b0, b1, _ in parts]
        pending: list = [None] * len(parts)

        def pre(li: int, j: int) -> None:
            _, _, rows = parts[j]
            lw = w.layers[li]
            if pending[j] is None:
                h = token_kernels.rms_norm(xs[j], lw.attn_norm)
            else:
                h, xs[j] = token_kernels.rms_norm(xs[j], lw.attn_norm, residual=pending[j])
            qkv = h @ lw.wqkv
            q, k, v = qkv.split([s.q_heads * D, H * D, H * D], -1)
            be.prepare(li, rows, q, k, v, lw, inv_freq=self.inv_freq)

        def post(li: int, j: int) -> None:
            b0, b1, rows = parts[j]
            lw = w.layers[li]
            o = be.finish(li, rows).reshape(b1 - b0, s.q_heads * D) @ lw.wo
            h, xs[j] = token_kernels.rms_norm(xs[j], lw.mlp_norm, residual=o)
            pending[j] = token_kernels.silu_mul(h @ lw.w13) @ lw.w2

        for kind, li, j in program(s.layers, len(parts)):
            (pre if kind == "pre" else post)(li, j)
        be.end_step()
        for (b0, b1, _), x, delta in zip(parts, xs, pending):
            h, _ = token_kernels.rms_norm(x, w.norm, residual=delta)
            self.tokens[b0:b1].copy_((h @ w.lm_head).argmax(-1))
