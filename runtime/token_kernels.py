"""Fused per-layer "glue" kernels: RMSNorm (with the residual add), SiLU-mul, and everything the offloaded backend
does with a row's new token before selection, in one launch per layer.

Why: the torch chains for this work are ~90 small kernels per decoder layer (norms, RoPE, reshapes, residual adds,
SiLU-mul, the compressed-key update, NOSA's eviction score, the pool writes). Each costs 1-3 us even replayed from
a CUDA graph while moving only a few KiB, so a step pays for launches instead of bytes. Here a layer is four
launches: two ``rms_norm`` (each fusing the residual add before it), ``silu_mul`` and ``token_step``.

Each kernel computes the same function as the torch code it replaces (``runtime.model``, ``runtime.selection``,
``OffloadBackend._cis``), which stays the reference (``*_reference`` below) and the path without Triton. Matching it
bit for bit takes care in four places:

- fp32 rounding sequence: kernels are compiled with ``enable_fp_fusion=False``, so ``a * b - c * d`` rounds each
  product as torch's separate kernels do (an FMA would round once);
- transcendentals: on the GPU ``exp``, ``log1p``, ``cos``, ``sin`` and ``rsqrt`` are libdevice's, the functions
  torch's CUDA kernels call (``tl.exp`` and friends lower to faster approximations), without flush-to-zero
  (``enable_reflect_ftz=False``) as torch is built; division is IEEE (``div_rn``), except where torch's CUDA kernels
  multiply by a reciprocal (a mean, a division by a Python scalar): there the kernel multiplies by the same fp32
  reciprocal;
- reductions (RMSNorm's sum of squares, the eviction head's dot product) add in a different order than torch, so
  they round differently unless every partial sum is exact: this is the one difference that remains (a few fp32
  ulps before the final rounding, so a rare 1-2 ulp difference in bf16; see the tests for the tolerances);
- casts: fp32 -> bf16/fp16 round to nearest even, fp32 -> float8_e4m3fn follows torch's ``.to()`` (round to nearest
  even, overflow and inf saturate to +-448, NaN stays NaN), computed on the bits (the pool is passed as uint8). NaN
  payloads of bf16/fp16 results are not matched (torch's own CPU and CUDA casts disagree on them).

Triton's CPU interpreter (the tests) has no libdevice, rounds fp32 -> bf16 by truncation (and mangles subnormals)
and has no log1p, so there the kernels use ``tl.exp``/``tl.cos``/``tl.sin`` (numpy's), round and store bf16 on the
bits, and build log1p from log; numpy's transcendentals differ from torch's CPU ones in the last bit now and then,
so interpreted results are compared with a tolerance where they are involved and exactly everywhere else.

Launch shapes depend only on tensor shapes: per-step values (positions, destination slots, completed-tail flags)
are read from device tensors, so a captured CUDA graph replays every step correctly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .dispatch import kernels_on

try:  # Triton is only on GPU machines (and in CPU tests, interpreted); the torch references compute the same functions.
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

AVAILABLE = triton is not None
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
POOL_DTYPES = FLOAT_DTYPES + (torch.float8_e4m3fn,)
# Element kinds as the kernels see them (a constexpr each): what a value is rounded to before it is stored.
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e4m3fn: 3}
# Set before triton.jit runs (tests/conftest.py): then every kernel is interpreted, whatever the tensors' device.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
RMS_MAX_BLOCK = 8192  # columns a row keeps in registers at once; wider rows loop over chunks (two passes)

if triton is not None:
    # Helpers are few and flat on purpose: the interpreter pays milliseconds for every nested jit call.

    @triton.jit
    def _rnd(x, KIND: tl.constexpr, NATIVE: tl.constexpr):
        """``x`` (fp32) rounded to element kind KIND (0 fp32, 1 bf16, 2 fp16) to nearest even, kept as fp32.
        Interpreted, bf16 is rounded on the bits (the interpreter's own cast truncates)."""
        y = x
        if KIND == 1:
            if NATIVE:
                y = x.to(tl.bfloat16).to(tl.float32)  # cvt.rn
            else:
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                y = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # noqa: PLR0124 - NaN stays NaN
        elif KIND == 2:
            y = x.to(tl.float16).to(tl.float32)
        return y

    @triton.jit
    def _store_as(ptr, x, mask, KIND: tl.constexpr, NATIVE: tl.constexpr):
        """Store fp32 ``x`` rounded to the elements' kind: 0 fp32, 1 bf16, 2 fp16 (to nearest even), 3
        float8_e4m3fn through a uint8 pointer, encoded on the bits as torch's ``.to(torch.float8_e4m3fn)`` does:
        to nearest even, overflow and inf saturating to +-448 (0x7E), NaN -> 0x7F, the sign kept throughout.
        Interpreted, bf16 is stored as its bits too: the interpreter's fp32 -> bf16 cast truncates and mangles
        subnormals."""
        if KIND == 3:
            b = x.to(tl.int32, bitcast=True)
            mag = b & 0x7FFFFFFF
            magc = tl.minimum(mag, 0x43F00000)  # 480.0: all from there on saturates; keeps the adds below in range
            # Normal codes (|x| >= 2^-6): 3 mantissa bits, rounded at bit 20 to nearest even, the exponent rebiased
            # from 127 to 7 (120 steps of 8 codes).
            normal = ((magc + 0x7FFFF + ((magc >> 20) & 1)) >> 20) - 960
            # Subnormal codes: adding 2^14 leaves an fp32 whose ulp is 2^-9, fp8's subnormal step, so the fp32 add
            # rounds to nearest even; the bits above 2^14's are the code (8, the smallest normal, if it rounds up).
            sub = (magc.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - 0x46800000
            code = tl.where(magc < 0x3C800000, sub, tl.minimum(normal, 0x7E))
            code = tl.where(mag > 0x7F800000, 0x7F, code) | ((b >> 24) & 0x80)
            tl.store(ptr, code.to(tl.uint8), mask=mask)
        elif KIND == 1 and not NATIVE:
            bits = x.to(tl.uint32, bitcast=True)
            bits = tl.where(x != x, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # noqa: PLR0124
            tl.store(ptr, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(ptr, x, mask=mask)  # the store's cast: cvt.rn on the GPU, numpy's rounding interpreted

    @triton.jit
    def _rms_row_in(x_row, r_row, s_row, c, m, RES: tl.constexpr, STORE: tl.constexpr, KIND: tl.constexpr,
                    NATIVE: tl.constexpr):
        """One chunk of a row's input as fp32: ``x``, or ``x + residual`` rounded to the element type (and stored
        to ``s_row`` when STORE)."""
        s = tl.load(x_row + c, mask=m, other=0.0).to(tl.float32)
        if RES:
            s = _rnd(s + tl.load(r_row + c, mask=m, other=0.0).to(tl.float32), KIND, NATIVE)
            if STORE:
                _store_as(s_row + c, s, m, KIND, NATIVE)
        return s

    @triton.jit
    def _rms_norm_kernel(x_ptr, x_sr, r_ptr, r_sr, w_ptr, y_ptr, y_sr, s_ptr, s_sr, eps, inv_n, n_f,
                         N: tl.constexpr, RES: tl.constexpr, BLOCK: tl.constexpr, CHUNKED: tl.constexpr,
                         KIND: tl.constexpr, NATIVE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row, r_row = x_ptr + row * x_sr, r_ptr + row * r_sr
        y_row, s_row = y_ptr + row * y_sr, s_ptr + row * s_sr
        c = tl.arange(0, BLOCK)
        if CHUNKED:
            # Pass 1: sum of squares (and the residual sum out). Pass 2 re-reads the inputs rather than the stored
            # sum, so no thread reads what another one wrote (no barrier); the second read mostly hits L2.
            acc = tl.zeros([BLOCK], tl.float32)
            for c0 in range(0, N, BLOCK):
                s = _rms_row_in(x_row, r_row, s_row, c0 + c, c0 + c < N, RES, True, KIND, NATIVE)
                acc += s * s
            ss = tl.sum(acc, axis=0)
        else:
            m = c < N
            s = _rms_row_in(x_row, r_row, s_row, c, m, RES, True, KIND, NATIVE)
            ss = tl.sum(s * s, axis=0)
        # torch's CUDA mean multiplies the sum by an fp32 1/N; its CPU mean divides by N.
        if NATIVE:
            rstd = libdevice.rsqrt(ss * inv_n + eps)
        else:
            rstd = tl.math.rsqrt(tl.math.div_rn(ss, n_f) + eps)  # interpreted: 1 / sqrt(x), as torch's CPU rsqrt
        # As torch: the normalised row is rounded to the element type, then multiplied by w (rounded again).
        if CHUNKED:
            for c0 in range(0, N, BLOCK):
                m = c0 + c < N
                s = _rms_row_in(x_row, r_row, s_row, c0 + c, m, RES, False, KIND, NATIVE)
                w = tl.load(w_ptr + c0 + c, mask=m, other=0.0).to(tl.float32)
                _store_as(y_row + c0 + c, _rnd(s * rstd, KIND, NATIVE) * w, m, KIND, NATIVE)
        else:
            w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
            _store_as(y_row + c, _rnd(s * rstd, KIND, NATIVE) * w, m, KIND, NATIVE)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, gu_sr, y_ptr, y_sr, I, BLOCK: tl.constexpr, KIND: tl.constexpr,
                         NATIVE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < I
        gate = tl.load(gu_ptr + row * gu_sr + c, mask=m, other=0.0).to(tl.float32)
        up = tl.load(gu_ptr + row * gu_sr + I + c, mask=m, other=0.0).to(tl.float32)
        # torch: silu in fp32 as x / (1 + exp(-x)), rounded to the element type, then times up (rounded again).
        if NATIVE:
            e = libdevice.exp(-gate)
        else:
            e = tl.exp(-gate)
        act = _rnd(tl.math.div_rn(gate, 1.0 + e), KIND, NATIVE)
        _store_as(y_ptr + row * y_sr + c, act * up, m, KIND, NATIVE)

    @triton.jit
    def _token_step_kernel(
            q_ptr, q_sb, k_ptr, k_sb, v_ptr, v_sb, qo_ptr, ko_ptr, pos_ptr, freq_ptr,
            pool_ptr, pool_sr, pool_ss, pool_skv, pool_st, slot_ptr, tok_ptr, n_slots, n_tok,
            ck_ptr, ck_sr, ck_sj, ka_ptr, ka_sr, ka_sa,
            ew_ptr, ew_sh, ea_ptr, cis_ptr, cis_sr, cis_n, cs_ptr, cs_sr, sa_ptr, sa_sr, st_ptr, st_sr,
            done_ptr, old_ptr, row0, NC, NB, inv_win,
            H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
            STRIDE: tl.constexpr, PER: tl.constexpr, PERP: tl.constexpr,
            ROPE: tl.constexpr, POOL: tl.constexpr, CK: tl.constexpr, CIS: tl.constexpr,
            Q_KIND: tl.constexpr, POOL_KIND: tl.constexpr, CK_KIND: tl.constexpr, NATIVE: tl.constexpr):
        """One program per row of the part: RoPE of the row's G query heads and its key, the key and value into the
        pool, the compressed-key and eviction-score state; every vector is loaded once and stays in registers."""
        i = tl.program_id(0).to(tl.int64)  # row within the part
        r = row0 + i  # row of the layer's state
        b = i // H  # sequence within the part
        h = i % H  # KV head (parts start at a sequence, so also r % H)
        HALF: tl.constexpr = D // 2
        d = tl.arange(0, DP)
        dm = d < D
        g = tl.arange(0, GP)
        qm = (g < G)[:, None] & dm[None, :]
        q_at = b * q_sb + (h * G + g[:, None]) * D  # the row's G heads: h * G .. h * G + G - 1
        k_at = b * k_sb + h * D
        x = tl.load(q_ptr + q_at + d[None, :], mask=qm, other=0.0).to(tl.float32)
        kx = tl.load(k_ptr + k_at + d, mask=dm, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + r)
        if ROPE:
            # runtime.model.rope, cat(x1 cos - x2 sin, x2 cos + x1 sin), on whole vectors: element d pairs with
            # partner (d + D/2) % D, whose term enters with sign -1 in the first half. (-p) * sin and a + (-b) are
            # exact negations, so each element rounds as torch's: two products, one sum (no FMA).
            pd = (d + HALF) % D
            sgn = tl.where(d < HALF, -1.0, 1.0)
            ang = pos.to(tl.float32) * tl.load(freq_ptr + d % HALF, mask=dm, other=0.0)
            if NATIVE:
                cs, sn = libdevice.cos(ang), libdevice.sin(ang)
            else:
                cs, sn = tl.cos(ang), tl.sin(ang)
            xp = tl.load(q_ptr + q_at + pd[None, :], mask=qm, other=0.0).to(tl.float32)
            kp = tl.load(k_ptr + k_at + pd, mask=dm, other=0.0).to(tl.float32)
            x = x * cs[None, :] + (xp * sgn[None, :]) * sn[None, :]  # rounded by its store
            kx = _rnd(kx * cs + (kp * sgn) * sn, Q_KIND, NATIVE)
        _store_as(qo_ptr + i * (G * D) + g[:, None] * D + d[None, :], x, qm, Q_KIND, NATIVE)
        _store_as(ko_ptr + i * D + d, kx, dm, Q_KIND, NATIVE)
        if POOL or CIS:
            vx = tl.load(v_ptr + b * v_sb + h * D + d, mask=dm, other=0.0).to(tl.float32)
        if POOL:
            slot = tl.load(slot_ptr + r)
            tok = tl.load(tok_ptr + r)
            # Out-of-range destinations are skipped rather than written (no host check without a sync).
            ok = dm & (slot >= 0) & (slot < n_slots) & (tok >= 0) & (tok < n_tok)
            dst = pool_ptr + r * pool_sr + slot * pool_ss + tok * pool_st + d
            _store_as(dst, kx, ok, POOL_KIND, NATIVE)
            _store_as(dst + pool_skv, vx, ok, POOL_KIND, NATIVE)
        # selection.append_token: the token ends a stride-token chunk when (pos + 1) % s == 0; compressed key
        # pos // s - 1 is then complete. Every step writes a value (to the scratch slot NC when none completes).
        done = (pos + 1) % STRIDE == 0
        jn = pos // STRIDE - 1
        cslot = tl.where(done & (jn >= 0), jn, NC)
        if CK:
            ka = ka_ptr + r * ka_sr + d
            a0 = tl.load(ka, mask=dm, other=0.0)
            a1 = tl.load(ka + ka_sa, mask=dm, other=0.0) + kx
            # torch divides by the Python int 2s: on CUDA as a multiply by its fp32 reciprocal, on the CPU truly.
            if NATIVE:
                c = (a0 + a1) * inv_win
            else:
                c = tl.math.div_rn(a0 + a1, 2.0 * STRIDE)
            _store_as(ck_ptr + r * ck_sr + cslot * ck_sj + d, c, dm, CK_KIND, NATIVE)
            tl.store(ka, tl.where(done, a1, a0), mask=dm)
            tl.store(ka + ka_sa, tl.where(done, 0.0, a1), mask=dm)
        if CIS:
            # OffloadBackend._cis: A_h * softplus(W_h . v), torch's softplus (beta 1, threshold 20; exp of at most
            # 20, since past the threshold the other branch is taken: no lane computes inf).
            z = tl.sum(vx * tl.load(ew_ptr + h * ew_sh + d, mask=dm, other=0.0), axis=0)
            if NATIVE:
                sp = libdevice.log1p(libdevice.exp(tl.minimum(z, 20.0)))
            else:  # no log1p in the interpreter: log(u) * e / (u - 1) with u = 1 + e, accurate to a few ulps
                e = tl.exp(tl.minimum(z, 20.0))
                u = 1.0 + e
                sp = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
            cis = tl.load(ea_ptr + h) * tl.where(z > 20.0, z, sp)
            tl.store(cis_ptr + r * cis_sr + pos, cis, mask=(pos >= 0) & (pos < cis_n))
            s0 = tl.load(sa_ptr + r * sa_sr)
            s1 = tl.load(sa_ptr + r * sa_sr + 1) + cis
            if NATIVE:
                cval = (s0 + s1) * inv_win
            else:
                cval = tl.math.div_rn(s0 + s1, 2.0 * STRIDE)
            # The window of the just-completed block (selection._frozen_block_score), read before this step's
            # compressed score is stored and patched with it in registers: torch stores first, then reads.
            t = tl.arange(0, PERP)
            old = tl.load(old_ptr + r)
            j = tl.maximum(old, 0) * PER - 1 + t
            jok = (t < PER) & (j >= 0) & (j < NC)
            win = tl.load(cs_ptr + r * cs_sr + j, mask=jok, other=0.0)
            win = tl.where(j == cslot, cval, win)
            nan = tl.sum((jok & (win != win)).to(tl.int32), axis=0) > 0  # noqa: PLR0124 - torch's amax keeps NaN
            frozen = tl.max(tl.where(jok, win, float("-inf")), axis=0)
            frozen = tl.where(nan, float("nan"), frozen)
            tl.store(cs_ptr + r * cs_sr + cslot, cval)
            tl.store(sa_ptr + r * sa_sr, tl.where(done, s1, s0))
            tl.store(sa_ptr + r * sa_sr + 1, tl.where(done, 0.0, s1))
            col = tl.where(tl.load(done_ptr + r) != 0, old, NB)
            tl.store(st_ptr + r * st_sr + col, frozen, mask=(col >= 0) & (col <= NB))


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _want_triton(use_triton: bool | None, t: torch.Tensor) -> bool:
    """``None``: the kernels when triton is importable and ``t`` is on CUDA; ``True`` without triton is an error."""
    if use_triton is None:
        return AVAILABLE and kernels_on(t)
    if use_triton and not AVAILABLE:
        raise RuntimeError("token_kernels: use_triton=True, but triton is not importable")
    return bool(use_triton)


def _native(t: torch.Tensor) -> bool:
    """Compiled for the GPU (libdevice, hardware casts) rather than interpreted on the CPU."""
    return t.is_cuda and not _INTERPRETED


def _fp32_reciprocal(n: int) -> float:
    # torch's CUDA kernels form the reciprocal in fp32 (1.0f / n), not in double.
    return float(np.float32(1.0) / np.float32(n))


def _launch_opts(t: torch.Tensor) -> dict:
    # No FMA contraction: torch rounds every product of these chains on its own. libdevice without flush-to-zero:
    # torch's CUDA math keeps subnormals.
    return {"enable_fp_fusion": False, "enable_reflect_ftz": False} if _native(t) else {}


# --- RMSNorm ---------------------------------------------------------------------------------------------------------

def rms_norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None):
    """The decoder's torch code: ``runtime.model.rms_norm`` of ``x`` (or of ``x + residual``, also returned)."""
    from .model import rms_norm as torch_rms_norm

    if residual is None:
        return torch_rms_norm(x, w, eps)
    s = x + residual
    return torch_rms_norm(s, w, eps), s


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5, residual: torch.Tensor | None = None, *,
             block: int | None = None, num_warps: int | None = None, use_triton: bool | None = None):
    """RMSNorm of the rows of ``x [B, N]`` with weight ``w [N]``: ``normed``, or ``(normed, s)`` with
    ``s = x + residual`` when ``residual`` is given (the residual add fused in front of the norm).

    One program per row; rows wider than ``block`` columns (default: all of them up to 8192) loop over chunks.
    Equal to ``rms_norm_reference`` bit for bit whenever the row's sum of squares is exact in fp32; otherwise its
    different addition order can move the normalising factor by a few fp32 ulps (rarely 1-2 ulps of a bf16
    output: the normalised row and its product with ``w`` are both rounded)."""
    fn = "rms_norm"
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES or (x.numel() and x.stride(1) != 1):
        raise ValueError(f"{fn}: x must be a [B, N] float32/bfloat16/float16 tensor with unit column stride, got "
                         f"{x.dtype} {tuple(x.shape)} strides {x.stride()}")
    B, N = x.shape
    if w.shape != (N,) or w.dtype != x.dtype or w.device != x.device:
        raise ValueError(f"{fn}: w must be [{N}] {x.dtype} on {x.device}, got {w.dtype} {tuple(w.shape)} on "
                         f"{w.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device or (x.numel() and residual.stride(1) != 1)):
        raise ValueError(f"{fn}: residual must be {x.dtype} {tuple(x.shape)} on {x.device} with unit column "
                         f"stride, got {residual.dtype} {tuple(residual.shape)} on {residual.device}")
    if block is not None and (block < 16 or block & (block - 1)):
        raise ValueError(f"{fn}: block must be a power of two >= 16, got {block}")
    if not _want_triton(use_triton, x):
        return rms_norm_reference(x, w, eps, residual)
    y = torch.empty((B, N), dtype=x.dtype, device=x.device)
    s = torch.empty((B, N), dtype=x.dtype, device=x.device) if residual is not None else y
    if B and N:
        BLOCK = min(_pow2(N), block or RMS_MAX_BLOCK)
        if num_warps is None:  # 16-32 columns per thread: two or four 16-byte loads of each input
            num_warps = max(1, min(8, BLOCK // 512))
        r = residual if residual is not None else x
        _rms_norm_kernel[(B,)](x, x.stride(0), r, r.stride(0), w, y, y.stride(0), s, s.stride(0), float(eps),
                               _fp32_reciprocal(N), float(N), N=N, RES=residual is not None, BLOCK=BLOCK,
                               CHUNKED=BLOCK < N, KIND=_KIND[x.dtype], NATIVE=_native(x), num_warps=num_warps,
                               **_launch_opts(x))
    return y if residual is None else (y, s)


# --- SiLU(gate) * up -------------------------------------------------------------------------------------------------

def silu_mul_reference(gu: torch.Tensor) -> torch.Tensor:
    """The decoder's torch code: ``F.silu(gate) * up`` with ``gate, up = gu.chunk(2, -1)``."""
    gate, up = gu.chunk(2, -1)
    return F.silu(gate) * up


def silu_mul(gu: torch.Tensor, *, block: int = 1024, num_warps: int = 4, use_triton: bool | None = None):
    """``F.silu(gate) * up`` of ``gu [B, 2I]`` (gate first, as the decoder's fused gate/up GEMM writes it):
    ``[B, I]`` in gu's dtype. A ``rows x column-chunks`` grid, so even batch 1 spreads over many SMs."""
    fn = "silu_mul"
    if gu.dim() != 2 or gu.dtype not in FLOAT_DTYPES or gu.shape[1] % 2 or (gu.numel() and gu.stride(1) != 1):
        raise ValueError(f"{fn}: gu must be a [B, 2I] float32/bfloat16/float16 tensor with unit column stride, got "
                         f"{gu.dtype} {tuple(gu.shape)}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"{fn}: block must be a power of two >= 16, got {block}")
    if not _want_triton(use_triton, gu):
        return silu_mul_reference(gu)
    B, I = gu.shape[0], gu.shape[1] // 2
    y = torch.empty((B, I), dtype=gu.dtype, device=gu.device)
    if B and I:
        _silu_mul_kernel[(B, triton.cdiv(I, block))](gu, gu.stride(0), y, y.stride(0), I, BLOCK=block,
                                                     KIND=_KIND[gu.dtype], NATIVE=_native(gu), num_warps=num_warps,
                                                     **_launch_opts(gu))
    return y


# --- the new token of each row ---------------------------------------------------------------------------------------

@dataclass
class TokenBuffers:
    """One layer's per-row buffers that ``token_step`` reads and updates. Tensors are the whole layer's, indexed by
    global row ``r = b * kv_heads + h`` (a part of the batch touches only its own rows). Every group is optional:
    the pool write (``pool``, ``dst_slot``, ``dst_tok``), InfLLM-V2's compressed keys (``ckeys``, ``kacc``) and
    NOSA's eviction score (``evict_w`` through ``old_tail``)."""

    pos: torch.Tensor  # int64 [R]: position of the new token (context length - 1)
    pool: torch.Tensor | None = None  # [R, S, 2, BS, D] contiguous; float32/bfloat16/float16/float8_e4m3fn
    dst_slot: torch.Tensor | None = None  # int64 [R]: pool slot of the new token
    dst_tok: torch.Tensor | None = None  # int64 [R]: its index within the slot's block
    ckeys: torch.Tensor | None = None  # [R, NC + 1, D] compressed keys (the keys' dtype), NC: scratch slot
    kacc: torch.Tensor | None = None  # float32 [R, 2, D] running 16-token key sums
    evict_w: torch.Tensor | None = None  # float32 [H, D]: NOSA's W_delta
    evict_a: torch.Tensor | None = None  # float32 [H]: NOSA's A
    cis: torch.Tensor | None = None  # float32 [R, NB * BS] per-token eviction score
    cscore: torch.Tensor | None = None  # float32 [R, NC + 1] compressed eviction scores
    sacc: torch.Tensor | None = None  # float32 [R, 2] running score sums
    static: torch.Tensor | None = None  # float32 [R, NB + 1] frozen block scores, NB: scratch column
    tail_done: torch.Tensor | None = None  # bool [R]: the previous tail block completed with this token
    old_tail: torch.Tensor | None = None  # int64 [R]: that block's id
    stride: int = 16  # compressed-key stride (keys average 2 * stride tokens)
    block_size: int = 64  # tokens per KV block (the scoring state's, for the frozen-score windows)

    @classmethod
    def from_scores(cls, scores, layer: int, pos: torch.Tensor, **kw) -> TokenBuffers:
        """Buffers over layer ``layer`` of a ``selection.ScoreState`` (views: updates land in the state); ``kw``
        gives the rest (pool, dst_slot, dst_tok, evict_w, evict_a, tail_done, old_tail)."""
        pick = lambda t: None if t is None else t[layer]  # noqa: E731
        state = {f: pick(getattr(scores, f)) for f in ("ckeys", "kacc", "cis", "cscore", "sacc", "static")}
        return cls(pos, **state, **kw, stride=scores.stride, block_size=scores.block_size)

    @property
    def qaware(self) -> bool:
        return self.ckeys is not None

    @property
    def agnostic(self) -> bool:
        return self.cis is not None


def _check_token_args(q, k, v, buf: TokenBuffers, head_dim: int, row0: int, inv_freq) -> dict:
    """Shapes, dtypes and devices of everything ``token_step`` touches (ValueError naming the argument)."""
    fn = "token_step"
    D = head_dim
    if D < 2 or D % 2:
        raise ValueError(f"{fn}: head_dim must be even and >= 2, got {D}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 2 or t.dtype not in FLOAT_DTYPES or (t.numel() and t.stride(1) != 1):
            raise ValueError(f"{fn}: {name} must be a 2-D float32/bfloat16/float16 tensor with unit inner stride "
                             f"(a column slice of the qkv GEMM output is fine), got {t.dtype} {tuple(t.shape)} "
                             f"strides {t.stride()}")
    n = q.shape[0]
    if k.shape[0] != n or v.shape != k.shape or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{fn}: q, k, v must share their rows and dtype, and v match k; got q {q.dtype} "
                         f"{tuple(q.shape)}, k {k.dtype} {tuple(k.shape)}, v {v.dtype} {tuple(v.shape)}")
    if k.shape[1] % D or q.shape[1] % D or k.shape[1] == 0:
        raise ValueError(f"{fn}: q and k widths must be multiples of head_dim={D}, got {q.shape[1]} and {k.shape[1]}")
    H, Hq = k.shape[1] // D, q.shape[1] // D
    if Hq % H or Hq == 0:
        raise ValueError(f"{fn}: query heads ({Hq}) must be a multiple of KV heads ({H})")
    dev = q.device
    pos = buf.pos
    if pos.dim() != 1 or pos.dtype != torch.int64 or pos.device != dev:
        raise ValueError(f"{fn}: buf.pos must be an int64 [R] on {dev}, got {pos.dtype} {tuple(pos.shape)} on "
                         f"{pos.device}")
    R = pos.shape[0]
    if row0 < 0 or row0 % H or row0 + n * H > R:
        raise ValueError(f"{fn}: row0 must be a multiple of kv_heads={H} with row0 + {n * H} rows <= R={R}, got "
                         f"row0={row0}")
    if buf.block_size < 1 or buf.stride < 1 or buf.block_size % buf.stride:
        raise ValueError(f"{fn}: stride ({buf.stride}) must divide block_size ({buf.block_size})")

    def want(name, t, shape, dtypes, inner=True):
        if t is None:
            raise ValueError(f"{fn}: buf.{name} is required with the rest of its group")
        if tuple(t.shape) != tuple(shape) or t.dtype not in dtypes or t.device != dev or (
                inner and t.numel() and t.stride(-1) != 1):
            raise ValueError(f"{fn}: buf.{name} must be {'/'.join(str(x).replace('torch.', '') for x in dtypes)} "
                             f"{tuple(shape)} on {dev}{' with unit inner stride' if inner else ''}, got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
        return t

    if inv_freq is not None:
        if tuple(inv_freq.shape) != (D // 2,) or inv_freq.dtype != torch.float32 or inv_freq.device != dev:
            raise ValueError(f"{fn}: inv_freq must be float32 [{D // 2}] on {dev}, got {inv_freq.dtype} "
                             f"{tuple(inv_freq.shape)} on {inv_freq.device}")
        inv_freq = inv_freq.contiguous()
    if any(t is not None for t in (buf.pool, buf.dst_slot, buf.dst_tok)):
        pool = buf.pool
        if pool is None or pool.dim() != 5 or pool.shape[0] != R or pool.shape[2] != 2 or pool.shape[4] != D or (
                pool.dtype not in POOL_DTYPES) or not pool.is_contiguous() or pool.device != dev:
            raise ValueError(f"{fn}: buf.pool must be a contiguous [R={R}, S, 2, BS, D={D}] tensor of "
                             f"{[str(x).replace('torch.', '') for x in POOL_DTYPES]} on {dev}, got "
                             f"{None if pool is None else (pool.dtype, tuple(pool.shape))}")
        want("dst_slot", buf.dst_slot, (R,), (torch.int64,))
        want("dst_tok", buf.dst_tok, (R,), (torch.int64,))
    nc = None
    if buf.ckeys is not None or buf.kacc is not None:
        ck = buf.ckeys
        if ck is None or ck.dim() != 3 or ck.shape[0] != R or ck.shape[2] != D or ck.shape[1] < 1:
            raise ValueError(f"{fn}: buf.ckeys must be [R={R}, NC + 1, D={D}], got "
                             f"{None if ck is None else tuple(ck.shape)}")
        nc = ck.shape[1] - 1
        want("ckeys", ck, (R, nc + 1, D), POOL_DTYPES)  # float8_e4m3fn keys are encoded like the pool
        want("kacc", buf.kacc, (R, 2, D), (torch.float32,))
    nosa = ("evict_w", "evict_a", "cis", "cscore", "sacc", "static", "tail_done", "old_tail")
    if any(getattr(buf, f) is not None for f in nosa):
        cs, st = buf.cscore, buf.static
        if cs is None or cs.dim() != 2 or st is None or st.dim() != 2:
            raise ValueError(f"{fn}: buf.cscore [R, NC + 1] and buf.static [R, NB + 1] are required with the rest "
                             f"of NOSA's state")
        if nc is not None and cs.shape[1] != nc + 1:
            raise ValueError(f"{fn}: buf.cscore must have NC + 1 = {nc + 1} columns like buf.ckeys, got "
                             f"{cs.shape[1]}")
        nc = cs.shape[1] - 1
        nb = st.shape[1] - 1
        want("evict_w", buf.evict_w, (H, D), (torch.float32,))
        want("evict_a", buf.evict_a, (H,), (torch.float32,), inner=False)
        want("cis", buf.cis, (R, nb * buf.block_size), (torch.float32,))
        want("cscore", cs, (R, nc + 1), (torch.float32,))
        want("sacc", buf.sacc, (R, 2), (torch.float32,))
        want("static", st, (R, nb + 1), (torch.float32,))
        want("tail_done", buf.tail_done, (R,), (torch.bool,), inner=False)
        want("old_tail", buf.old_tail, (R,), (torch.int64,), inner=False)
    return {"n": n, "H": H, "G": Hq // H, "D": D, "R": R, "nc": nc, "inv_freq": inv_freq}


def _score_state(buf: TokenBuffers, rows: slice):
    """A one-layer ``selection.ScoreState`` over the part's rows of ``buf``, as views (updates land in buf)."""
    from .selection import ScoreState

    part = lambda t: None if t is None else t[None, rows]  # noqa: E731
    return ScoreState(part(buf.ckeys), part(buf.kacc), part(buf.cis), part(buf.cscore), part(buf.sacc),
                      part(buf.static), buf.stride, buf.block_size)


def token_step_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buf: TokenBuffers, *, head_dim: int,
                         row0: int = 0, inv_freq: torch.Tensor | None = None):
    """The torch code ``token_step`` replaces, built from the runtime's own functions: ``model.rope``, the
    backend's ``_cis``, ``selection.append_token`` and the pool write as an indexed assignment."""
    from types import SimpleNamespace

    from .backends import OffloadBackend
    from .model import rope
    from .selection import append_token

    a = _check_token_args(q, k, v, buf, head_dim, row0, inv_freq)
    n, H, G, D, R = a["n"], a["H"], a["G"], a["D"], a["R"]
    rows = slice(row0, row0 + n * H)
    pos = buf.pos[rows]
    qr, kr = q.reshape(n * H, G, D), k.reshape(n * H, 1, D)  # row b * H + h holds heads h * G .. h * G + G - 1
    if inv_freq is not None:
        ang = pos.float()[:, None, None] * a["inv_freq"]
        cos, sin = ang.cos(), ang.sin()
        qr, kr = rope(qr, cos, sin), rope(kr, cos, sin)
    q_out, k_out = qr.contiguous(), kr.reshape(n * H, D).contiguous()
    vr = v.reshape(n * H, D)
    if q_out.data_ptr() == q.data_ptr() and q_out.numel():  # a reshape that is a view: outputs are new tensors
        q_out = q_out.clone()
    if k_out.data_ptr() == k.data_ptr() and k_out.numel():
        k_out = k_out.clone()
    cis = None
    if buf.agnostic:
        be = SimpleNamespace(rows=torch.arange(R, device=q.device), H=H, all_rows=slice(0, R))
        lw = SimpleNamespace(evict_w=buf.evict_w, evict_a=buf.evict_a)
        cis = OffloadBackend._cis(be, lw, vr, rows)
    if buf.qaware or buf.agnostic:
        done = buf.tail_done[rows] if buf.tail_done is not None else torch.zeros_like(pos, dtype=torch.bool)
        old = buf.old_tail[rows] if buf.old_tail is not None else pos
        append_token(_score_state(buf, rows), 0, pos, k_out if buf.qaware else None, cis, done, old)
    if buf.pool is not None:
        r = torch.arange(row0, row0 + n * H, device=q.device)
        slot, tok = buf.dst_slot[rows], buf.dst_tok[rows]
        # Through a uint8 view for float8 (no index_put for it on every device); .to() is the cast either way.
        flat = buf.pool.view(torch.uint8) if buf.pool.dtype == torch.float8_e4m3fn else buf.pool
        cast = lambda t: t.to(buf.pool.dtype).view(flat.dtype)  # noqa: E731
        flat[r, slot, 0, tok] = cast(k_out)
        flat[r, slot, 1, tok] = cast(vr)
    return q_out, k_out


def token_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buf: TokenBuffers, *, head_dim: int,
               row0: int = 0, inv_freq: torch.Tensor | None = None, q_out: torch.Tensor | None = None,
               k_out: torch.Tensor | None = None, num_warps: int | None = None, use_triton: bool | None = None):
    """Everything the offloaded backend does with a part's new token before selection, in one launch.

    ``q [nb, Hq * D]``, ``k, v [nb, H * D]``: the projections of the part's ``nb`` sequences (column slices of one
    qkv GEMM output are fine: any row stride, unit inner stride); the part is rows ``row0 .. row0 + nb * H - 1``
    of ``buf``'s tensors. With ``inv_freq`` (float32 ``[D / 2]``) q and k are rotated like ``model.rope`` at the
    positions ``buf.pos``; without it they are taken as rotated already. Then, per row: the rotated key and the
    value into ``pool[r, dst_slot[r], 0 / 1, dst_tok[r]]`` (cast to the pool's dtype), and
    ``selection.append_token`` for the groups ``buf`` holds (compressed keys from the rotated key; NOSA's eviction
    score ``A_h * softplus(W_h . v)`` as ``OffloadBackend._cis``, its compressed score and the frozen score of the
    block that just completed).

    Returns ``(q_out [nb * H, G, D], k_out [nb * H, D])`` in q's dtype (``q_out``/``k_out`` may be given, contiguous).
    Equal to ``token_step_reference`` bit for bit, except that the eviction head's dot product adds in another
    order (exact when its partial sums are; otherwise a few fp32 ulps of ``cis`` and what is pooled from it).

    The pool write happens in this launch, before selection: a caller whose copies still read the destination slot
    this step (the completed tail leaving the tail slot) must give the token another destination, or leave ``pool``
    out and write the token after the copies. Destinations outside the pool are skipped, not checked (that would
    need a host sync)."""
    fn = "token_step"
    a = _check_token_args(q, k, v, buf, head_dim, row0, inv_freq)
    n, H, G, D = a["n"], a["H"], a["G"], a["D"]
    Rp = n * H
    for name, t, shape in (("q_out", q_out, (Rp, G, D)), ("k_out", k_out, (Rp, D))):
        if t is not None and (tuple(t.shape) != shape or t.dtype != q.dtype or not t.is_contiguous()
                              or t.device != q.device):
            raise ValueError(f"{fn}: {name} must be a contiguous {q.dtype} {shape} on {q.device}, got {t.dtype} "
                             f"{tuple(t.shape)}")
    if not _want_triton(use_triton, q):
        qr, kr = token_step_reference(q, k, v, buf, head_dim=head_dim, row0=row0, inv_freq=inv_freq)
        if q_out is not None:
            qr = q_out.copy_(qr)
        if k_out is not None:
            kr = k_out.copy_(kr)
        return qr, kr
    if q_out is None:
        q_out = torch.empty((Rp, G, D), dtype=q.dtype, device=q.device)
    if k_out is None:
        k_out = torch.empty((Rp, D), dtype=q.dtype, device=q.device)
    if Rp == 0:
        return q_out, k_out
    dummy = buf.pos  # pointer of absent groups: never dereferenced (their constexpr branch is not compiled)
    pool = buf.pool
    has_pool = pool is not None
    if has_pool:
        pool_kind = _KIND[pool.dtype]
        pool_arg = pool.view(torch.uint8) if pool.dtype == torch.float8_e4m3fn else pool
        pool_strides = (pool.stride(0), pool.stride(1), pool.stride(2), pool.stride(3))
        n_slots, n_tok = pool.shape[1], pool.shape[3]
    else:
        pool_kind, pool_arg, pool_strides, n_slots, n_tok = 0, dummy, (0, 0, 0, 0), 0, 0
    ck, ka = (buf.ckeys, buf.kacc) if buf.qaware else (dummy, dummy)
    if buf.qaware and ck.dtype == torch.float8_e4m3fn:
        ck = ck.view(torch.uint8)  # stored as its bits by _store_as (kind 3)
    ck_strides = (ck.stride(0), ck.stride(1)) if buf.qaware else (0, 0)
    ka_strides = (ka.stride(0), ka.stride(1)) if buf.qaware else (0, 0)
    if buf.agnostic:
        nosa = (buf.evict_w, buf.evict_w.stride(0), buf.evict_a, buf.cis, buf.cis.stride(0), buf.cis.shape[1],
                buf.cscore, buf.cscore.stride(0), buf.sacc, buf.sacc.stride(0), buf.static, buf.static.stride(0),
                buf.tail_done, buf.old_tail)
        nb = buf.static.shape[1] - 1
    else:
        nosa = (dummy, 0, dummy, dummy, 0, 0, dummy, 0, dummy, 0, dummy, 0, dummy, dummy)
        nb = 0
    nc = a["nc"] if a["nc"] is not None else 0
    per = buf.block_size // buf.stride
    freq = a["inv_freq"] if inv_freq is not None else dummy
    if num_warps is None:  # one warp holds a llama3-8b row (4 heads x 128) as one 16-byte load per thread and half
        num_warps = 1 if G * D <= 1024 else 2
    _token_step_kernel[(Rp,)](
        q, q.stride(0), k, k.stride(0), v, v.stride(0), q_out, k_out, buf.pos, freq,
        pool_arg, *pool_strides, buf.dst_slot if has_pool else dummy, buf.dst_tok if has_pool else dummy,
        n_slots, n_tok, ck, *ck_strides, ka, *ka_strides, *nosa, row0, nc, nb, _fp32_reciprocal(2 * buf.stride),
        H=H, G=G, GP=_pow2(G), D=D, DP=_pow2(D), STRIDE=buf.stride, PER=per, PERP=_pow2(per),
        ROPE=inv_freq is not None, POOL=has_pool, CK=buf.qaware, CIS=buf.agnostic, Q_KIND=_KIND[q.dtype],
        POOL_KIND=pool_kind,
        CK_KIND=_KIND[buf.ckeys.dtype] if buf.qaware else 0, NATIVE=_native(q), num_warps=num_warps,
        **_launch_opts(q))
    return q_out, k_out
