"""The fused glue kernels (runtime/token_kernels.py) against the torch code they replace.

Without CUDA the kernels run in Triton's interpreter (marker ``triton``, tests/conftest.py) on small shapes; the
``gpu`` twins run the compiled kernels, larger, and inside a CUDA graph. What is compared how:

- bit for bit wherever the kernel and torch do the same fp32 operations in the same order: the residual add, the
  RMSNorm when the row's sum of squares is exact (inputs on a 1/8 grid), RoPE's arithmetic, the pool writes and
  their casts (bf16/fp16 round to nearest even, float8_e4m3fn as torch's ``.to()``, special values included), the
  compressed keys and their running sums, NOSA's per-token and pooled scores and the frozen block scores when the
  eviction head's dot product is exact (values on a dyadic grid);
- interpreted, numpy's cos/sin/exp differ from torch's CPU ones in the last bit now and then: RoPE is then checked
  exactly against ``model.rope`` fed numpy's cos/sin (and against torch's to a tolerance), SiLU and softplus to
  fp32 rounding (NOSA's exact interpreted cases keep the dot product above softplus's threshold of 20, where it
  is the identity). On the GPU both use the same CUDA math functions, so those comparisons are exact there;
- reductions in a different order than torch's (RMSNorm's sum of squares, the eviction head's dot product) on
  random inputs: fp32 to 2e-6 relative; bf16/fp16 within 2 ulps (1 before a second rounding), in under 1% of
  the elements.

Each multi-step run crosses 16-token compressed-key and block boundaries (block sizes 32 and 64), covers parts
with ``row0 > 0`` (other rows are poisoned and must stay untouched), strided qkv views, and poisoned outputs.
"""

from dataclasses import fields, replace

import numpy as np
import pytest
import torch

from runtime import token_kernels as tk
from runtime.model import rope
from runtime.selection import ScoreState

DEVICES = [pytest.param("cpu", marks=pytest.mark.triton), pytest.param("cuda", marks=pytest.mark.gpu)]
# The interpreter computes with numpy, which warns where torch stays silent (exp and fp16 casts overflowing to inf).
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")]
F8 = torch.float8_e4m3fn


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place of a's dtype, through order-preserving integer images (so across zero
    too, +0 and -0 alike)."""
    it = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]

    def key(t):
        i = t.contiguous().view(it).long()
        return torch.where(i < 0, -(i & (2 ** (8 * t.element_size() - 1) - 1)), i)

    return (key(a) - key(b)).abs()


def _close(got: torch.Tensor, ref: torch.Tensor, exact: bool, what: str) -> None:
    """Bit-identical (NaN where NaN, whatever its payload: torch's own CPU and CUDA casts give bf16 NaNs different
    bits) or, for rounding-level differences: fp32 2e-6 relative; 16-bit dtypes at most 2 ulps apart (a 1-ulp
    difference before the second rounding of ``normed * w`` or ``silu * up`` can become 2) in under 1% of the
    elements (or 2 elements, for small tensors). float8 and integers: the codes, always."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    if got.dtype == F8:  # the code, NaN of either sign alike (torch's CPU cast keeps the sign, a hardware one may not)
        a, b = got.view(torch.uint8), ref.view(torch.uint8)
        nan_a, nan_b = (a & 0x7F) == 0x7F, (b & 0x7F) == 0x7F
        assert torch.equal(nan_a, nan_b) and torch.equal(torch.where(nan_a, 0, a), torch.where(nan_b, 0, b)), what
        return
    if not got.is_floating_point():
        assert torch.equal(got, ref), what
        return
    nan = got.isnan()
    assert torch.equal(nan, ref.isnan()), f"{what}: NaN at other places"
    if exact:
        bits = {4: torch.int32, 2: torch.int16}[got.element_size()]
        a, b = got.contiguous().view(bits), ref.contiguous().view(bits)
        bad = (a != b) & ~nan
        assert not bad.any(), f"{what}: {int(bad.sum())} of {got.numel()} differ, e.g. {got[bad][:4].tolist()} vs " \
                              f"{ref[bad][:4].tolist()}"
    elif got.dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=2e-6, atol=1e-6, equal_nan=True, msg=lambda m: f"{what}: {m}")
    else:
        u = torch.where(nan, 0, _ulps(got.cpu(), ref.cpu()).to(nan.device))
        n_diff = int((u > 0).sum())
        assert int(u.max()) <= 2 and (n_diff <= 2 or n_diff < 0.01 * u.numel()), (
            f"{what}: {n_diff} of {u.numel()} differ, by up to {int(u.max())} ulps")


# --- RMSNorm and SiLU-mul --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,block", [(48, None), (1000, 256), (16384, None)])  # one pass; chunks; default chunks
def test_rms_norm_exact_when_the_sum_is(device, dtype, N, block):
    """Inputs on a 1/8 grid: every partial sum of squares is exact in fp32, so any order gives torch's bits."""
    g = torch.Generator().manual_seed(N)
    B = 3 if device == "cpu" else 37
    x = (torch.randint(-8, 9, (B, N), generator=g) / 8).to(dtype).to(device)
    res = (torch.randint(-8, 9, (B, N), generator=g) / 8).to(dtype).to(device)
    w = torch.randn(N, generator=g).to(dtype).to(device)
    y = tk.rms_norm(x, w, block=block, use_triton=True)
    _close(y, tk.rms_norm_reference(x, w), True, "normed")
    y, s = tk.rms_norm(x, w, 1e-6, residual=res, block=block, use_triton=True)
    y_ref, s_ref = tk.rms_norm_reference(x, w, 1e-6, residual=res)
    _close(s, s_ref, True, "x + residual")
    _close(y, y_ref, True, "normed(x + residual)")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_random_inputs(device, dtype):
    """Random rows: the sum of squares adds in another order than torch's; the residual sum is still exact."""
    g = torch.Generator().manual_seed(1)
    B, N = (4, 4096) if device == "cpu" else (64, 4096)
    x, res = (torch.randn(B, N, generator=g).to(dtype).to(device) for _ in range(2))
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(dtype).to(device)
    y, s = tk.rms_norm(x, w, residual=res, use_triton=True)
    y_ref, s_ref = tk.rms_norm_reference(x, w, residual=res)
    _close(s, s_ref, True, "x + residual")
    _close(y, y_ref, False, "normed")
    xs = x[:, 100: 100 + 1500]  # a column slice: row stride != N
    _close(tk.rms_norm(xs, w[:1500], block=512, use_triton=True), tk.rms_norm_reference(xs, w[:1500]), False,
           "strided rows, chunked")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_silu_mul(device, dtype):
    """Same operations as torch; interpreted, numpy's exp may differ in the last bit from torch's CPU exp."""
    g = torch.Generator().manual_seed(2)
    B, I = (3, 700) if device == "cpu" else (33, 14336)
    gu = (3 * torch.randn(B, 2 * I + 64, generator=g)).to(dtype).to(device)[:, 32: 32 + 2 * I]  # strided rows
    gu[0, :8] = torch.tensor([0.0, -0.0, 30.0, -30.0, 100.0, -100.0, 1e-3, -1e-3], dtype=dtype)
    y = tk.silu_mul(gu, block=256 if device == "cpu" else 1024, use_triton=True)
    _close(y, tk.silu_mul_reference(gu), device == "cuda", "silu(gate) * up")


# --- the token step ---------------------------------------------------------------------------------------------------

def _buffers(g, R, H, D, dtype, pool_dtype, qaware, agnostic, bs, stride, nb, slots, device, ck_dtype=None):
    """Random state everywhere (scratch slots and rows outside the part included): poison for the kernel."""
    nc = nb * bs // stride
    f32 = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    buf = tk.TokenBuffers(
        pos=torch.zeros(R, dtype=torch.int64), pool=f32(R, slots, 2, bs, D).to(pool_dtype),
        dst_slot=torch.zeros(R, dtype=torch.int64), dst_tok=torch.zeros(R, dtype=torch.int64),
        stride=stride, block_size=bs)
    if qaware:
        buf = replace(buf, ckeys=f32(R, nc + 1, D).to(ck_dtype or dtype), kacc=f32(R, 2, D))
    if agnostic:
        buf = replace(buf, evict_w=f32(H, D) / D ** 0.5, evict_a=0.5 * torch.rand(H, generator=g), cis=f32(R, nb * bs),
                      cscore=f32(R, nc + 1), sacc=f32(R, 2), static=f32(R, nb + 1),
                      tail_done=torch.zeros(R, dtype=torch.bool), old_tail=torch.zeros(R, dtype=torch.int64))
        buf.static[:, ::3] = float("nan")  # blocks not frozen yet, as ScoreState.allocate leaves them
    return _to(buf, device)


def _to(buf, device):
    return replace(buf, **{f.name: getattr(buf, f.name).to(device) for f in fields(buf)
                           if isinstance(getattr(buf, f.name), torch.Tensor)})


def _clone(buf):
    return replace(buf, **{f.name: getattr(buf, f.name).clone() for f in fields(buf)
                           if isinstance(getattr(buf, f.name), torch.Tensor)})


def _tensors(buf):
    return {f.name: getattr(buf, f.name) for f in fields(buf) if isinstance(getattr(buf, f.name), torch.Tensor)}


def _advance(bufs, pos_seq, H, t, bs, slots):
    """Per-step inputs as the backend derives them: rows share their sequence's position; the tail completes when
    the new token is the first of a block (not at the first step); the destination slot cycles over the pool."""
    pos = pos_seq.repeat_interleave(H)
    for b in bufs:
        b.pos.copy_(pos)
        b.dst_slot.copy_(pos // bs % slots)
        b.dst_tok.copy_(pos % bs)
        if b.tail_done is not None:
            b.tail_done.copy_((pos % bs == 0) & (t > 0))
            b.old_tail.copy_(pos // bs - 1)


def _qkv(g, n, Hq, H, D, dtype, strided, device, v_grid=None):
    """The part's projections: column views of one qkv GEMM output, or separate tensors. ``v_grid``: values on
    a dyadic grid, so the eviction head's dot product is exact ('above20': and above softplus's threshold)."""
    if strided:
        qkv = torch.randn(n, (Hq + 2 * H) * D, generator=g)
        q, k, v = qkv.split([Hq * D, H * D, H * D], -1)
    else:
        q, k, v = (torch.randn(n, w * D, generator=g) for w in (Hq, H, H))
    if v_grid == "above20":
        v.copy_(torch.randint(12, 25, v.shape, generator=g) / 8)
    elif v_grid == "dyadic":
        v.copy_(torch.randint(-24, 25, v.shape, generator=g) / 8)
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    if strided:
        qkv = cast(qkv)
        return qkv.split([Hq * D, H * D, H * D], -1)
    return cast(q), cast(k), cast(v)


def _grid_weights(g, buf, grid):
    if grid == "above20":
        buf.evict_w.copy_(torch.randint(16, 33, buf.evict_w.shape, generator=g) / 16)
    elif grid == "dyadic":
        buf.evict_w.copy_(torch.randint(-32, 33, buf.evict_w.shape, generator=g) / 16)


TOKEN_CASES = {  # dtype, pool dtype, D, G, RoPE, compressed keys, NOSA, strided qkv, part (sequences), block size
    "fp32-rope-nosa-part": (torch.float32, torch.float32, 32, 4, True, True, True, True, (1, 3), 64),
    "bf16-rope-nosa-part": (torch.bfloat16, torch.bfloat16, 16, 2, True, True, True, True, (2, 4), 32),
    "bf16-keys-only": (torch.bfloat16, torch.bfloat16, 32, 4, False, True, False, False, (0, 4), 64),
    "fp16-nosa-only-part": (torch.float16, torch.float16, 16, 2, True, False, True, True, (3, 4), 32),
    "bf16-fp8-pool": (torch.bfloat16, F8, 16, 4, True, True, True, True, (1, 4), 64),
    "fp32-pool-only": (torch.float32, torch.bfloat16, 24, 3, True, False, False, False, (0, 2), 32),
    # fp8 compressed keys (and pool): the key written as e4m3 codes, the running sums in fp32.
    "bf16-fp8-keys": (torch.bfloat16, F8, 16, 4, True, True, True, True, (1, 4), 64, F8),
}


def _run_token_steps(device, case, steps=6, grid=None, large=None):
    """Drive kernel and reference through ``steps`` decode steps from equal random state; compare every output
    and the whole state after each step, and the rows outside the part with their initial values at the end.
    ``large`` (default: on the GPU) scales the shapes up: 8 KV heads, 12 sequences, 4x the head dim."""
    dtype, pool_dtype, D, G, use_rope, qaware, agnostic, strided, (b0, b1), bs, *ck = TOKEN_CASES[case]
    g = torch.Generator().manual_seed(sum(map(ord, case)))
    large = device == "cuda" if large is None else large
    H, nseq = (8, 12) if large else (2, 4)
    if large:
        D, b0, b1 = 4 * D, b0 * 3, b1 * 3
    R, Hq, stride, nb, slots = nseq * H, H * G, 16, 5, 3
    if grid is None:
        grid = "above20" if device == "cpu" else "dyadic"
    got = _buffers(g, R, H, D, dtype, pool_dtype, qaware, agnostic, bs, stride, nb, slots, device, *ck)
    if agnostic:
        _grid_weights(g, got, grid)
    ref = _clone(got)
    before = {k: t.clone() for k, t in _tensors(got).items()}
    inv_freq = (1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)).to(device) if use_rope else None
    # Starts just before 16-token chunk ends and block ends (one exactly at a block start: no completed tail at t=0)
    base = torch.tensor([bs - 3, 2 * bs - 1, 3 * stride - 2, 2 * bs, 3 * bs - 4, bs + 5])
    starts = base[torch.arange(nseq) % len(base)].to(device)
    rows = slice(b0 * H, b1 * H)
    n = b1 - b0
    for t in range(steps):
        _advance((got, ref), starts + t, H, t, bs, slots)
        q, k, v = _qkv(g, n, Hq, H, D, dtype, strided, device, grid if agnostic else None)
        q_out = torch.full((n * H, G, D), float("nan"), dtype=dtype, device=device) if t % 2 == 0 else None
        k_out = torch.full((n * H, D), float("nan"), dtype=dtype, device=device) if t % 2 == 0 else None
        qo, ko = tk.token_step(q, k, v, got, head_dim=D, row0=b0 * H, inv_freq=inv_freq, q_out=q_out, k_out=k_out,
                               use_triton=True)
        if q_out is not None:
            assert qo.data_ptr() == q_out.data_ptr() and ko.data_ptr() == k_out.data_ptr()
        if use_rope and device == "cpu":
            # The interpreter's cos/sin are numpy's: the reference's RoPE with the same values must give the kernel's
            # bits, then the rest of the reference runs on those rotated q and k.
            ang = ref.pos[rows].float()[:, None, None] * inv_freq
            cos, sin = torch.from_numpy(np.cos(ang.numpy())), torch.from_numpy(np.sin(ang.numpy()))
            q_rot = rope(q.reshape(n * H, G, D), cos, sin)
            k_rot = rope(k.reshape(n * H, 1, D), cos, sin).reshape(n * H, D)
            qr, kr = tk.token_step_reference(q_rot.reshape(n, Hq * D), k_rot.reshape(n, H * D), v, ref, head_dim=D,
                                             row0=b0 * H)
            q_torch = rope(q.reshape(n * H, G, D), ang.cos(), ang.sin())  # torch's cos/sin: rounding-level apart
            _close(qo, q_torch, False, f"step {t}: q_out vs torch's cos/sin")
        else:
            qr, kr = tk.token_step_reference(q, k, v, ref, head_dim=D, row0=b0 * H, inv_freq=inv_freq)
        _close(qo, qr, True, f"step {t}: q_out")
        _close(ko, kr, True, f"step {t}: k_out")
        for name, tensor in _tensors(got).items():
            _close(tensor, getattr(ref, name), True, f"step {t}: {name}")
    for name, tensor in _tensors(got).items():
        if name in ("evict_w", "evict_a", "pos", "dst_slot", "dst_tok", "tail_done", "old_tail"):  # inputs
            continue
        _close(tensor[: rows.start], before[name][: rows.start], True, f"{name}: rows before the part")
        _close(tensor[rows.stop:], before[name][rows.stop:], True, f"{name}: rows after the part")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_token_step_matches_reference(device, case):
    _run_token_steps(device, case)


@pytest.mark.parametrize("device", DEVICES)
def test_token_step_random_eviction_scores(device):
    """Random values and eviction weights: softplus on its log1p branch, a dot product that rounds. The per-token
    and pooled scores then agree to fp32 rounding (interpreted: numpy's exp/log also differ in the last bit)."""
    dtype, D, G, H, bs = torch.float32, 32, 2, 2, 32
    nseq = 3 if device == "cpu" else 16
    g = torch.Generator().manual_seed(9)
    R, stride, nb = nseq * H, 16, 4
    got = _buffers(g, R, H, D, dtype, dtype, True, True, bs, stride, nb, 2, device)
    ref = _clone(got)
    starts = torch.tensor([bs - 2, 2 * bs - 3, stride - 1] * nseq)[:nseq].to(device)
    for t in range(5):
        _advance((got, ref), starts + t, H, t, bs, 2)
        q, k, v = _qkv(g, nseq, G * H, H, D, dtype, True, device)
        tk.token_step(q, k, v, got, head_dim=D, use_triton=True)
        tk.token_step_reference(q, k, v, ref, head_dim=D)
        for name in ("pool", "ckeys", "kacc", "tail_done", "old_tail"):
            _close(getattr(got, name), getattr(ref, name), True, f"step {t}: {name}")
        for name in ("cis", "cscore", "sacc", "static"):
            _close(getattr(got, name), getattr(ref, name), False, f"step {t}: {name}")


def _cast_values(dtype) -> torch.Tensor:
    """fp32 values at and around every rounding decision of ``dtype``: its representable values, the midpoints
    between neighbours (ties go to the even one), one fp32 ulp either side, the overflow edge, inf, NaN, zeros."""
    if dtype == F8:
        codes = torch.arange(256, dtype=torch.uint8).view(F8).float()
        codes = codes[torch.isfinite(codes)].unique()  # sorted: neighbours in value
        lo, hi = codes[:-1], codes[1:]
    else:  # a sample of the 2^16 codes, each with the next one in magnitude
        bits = torch.arange(0, 2 ** 16 - 1, 97, dtype=torch.int32)
        lo, hi = (b.to(torch.int16).view(dtype).float() for b in (bits, bits + 1))
        ok = torch.isfinite(lo) & torch.isfinite(hi)
        lo, hi = lo[ok], hi[ok]
        codes = lo
    mids = (lo + hi) / 2  # exact in fp32: one bit more than the codes have
    up, down = (torch.nextafter(mids, torch.full_like(mids, s)) for s in (float("inf"), float("-inf")))
    edge = [440.0, 448.0, 455.0, 456.0, 460.0, 464.0, 464.1, 470.0, 479.9, 480.0, 1e6, 3.4e38, float("inf"),
            float("nan"), 0.0, -0.0, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -140]
    edge = torch.tensor(edge + [-e for e in edge])
    if dtype == F8 and torch.tensor([1e6]).to(F8).float().item() != 448.0:
        edge = edge[edge.abs() < 464]  # an older torch whose cast does not saturate: its overflow is not ours
    return torch.cat([codes, mids, up, down, edge])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pool_dtype", [F8, torch.bfloat16, torch.float16])
def test_pool_casts_match_torch(device, pool_dtype):
    """fp32 keys and values into a narrower pool: every element's bits as torch's ``.to(pool_dtype)``."""
    vals = _cast_values(pool_dtype)
    D, H = 64, 2
    nseq = -(-vals.numel() // (2 * H * D))
    flat = torch.cat([vals, torch.zeros(2 * nseq * H * D - vals.numel())])
    g = torch.Generator().manual_seed(4)
    flat = flat[torch.randperm(flat.numel(), generator=g)]
    k, v = flat.view(2, nseq, H * D).to(device)
    q = torch.zeros(nseq, H * D, device=device)
    R = nseq * H
    buf = tk.TokenBuffers(pos=torch.arange(R, device=device), pool=torch.zeros(R, 1, 2, 4, D, device=device).to(
        pool_dtype), dst_slot=torch.zeros(R, dtype=torch.int64, device=device),
        dst_tok=torch.arange(R, device=device) % 4)
    ref = _clone(buf)
    tk.token_step(q, k, v, buf, head_dim=D, use_triton=True)
    tk.token_step_reference(q, k, v, ref, head_dim=D)
    _close(buf.pool, ref.pool, True, f"{pool_dtype} pool")


@pytest.mark.triton
def test_out_of_range_destinations_are_skipped():
    """A destination slot or token outside the pool writes nothing (the torch indexing would raise instead)."""
    D, H, G = 16, 2, 2
    buf = tk.TokenBuffers(pos=torch.zeros(4, dtype=torch.int64), pool=torch.zeros(4, 2, 2, 8, D),
                          dst_slot=torch.tensor([0, 2, -1, 1]), dst_tok=torch.tensor([3, 0, 0, 8]))
    q, k, v = torch.randn(2, H * G * D), torch.randn(2, H * D), torch.randn(2, H * D)
    tk.token_step(q, k, v, buf, head_dim=D, use_triton=True)
    assert torch.equal(buf.pool[0, 0, 0, 3], k[0, :D]) and torch.equal(buf.pool[0, 0, 1, 3], v[0, :D])
    buf.pool[0, 0, :, 3] = 0
    assert not buf.pool.any()


@pytest.mark.triton
def test_from_scores_updates_the_score_state():
    """Buffers built over a ScoreState layer are views: the kernel's updates land in the state."""
    R, D, H, G = 4, 16, 2, 2
    st = ScoreState.allocate(2, R, D, 256, 4, qaware=True, agnostic=True, dtype=torch.float32, device="cpu")
    ref = ScoreState(*(t.clone() for t in (st.ckeys, st.kacc, st.cis, st.cscore, st.sacc, st.static)))
    pos = torch.full((R,), 15)
    extra = dict(evict_w=torch.randn(H, D), evict_a=torch.rand(H), tail_done=torch.zeros(R, dtype=torch.bool),
                 old_tail=torch.full((R,), -1))
    q, k, v = torch.randn(2, H * G * D), torch.randn(2, H * D), 3 + torch.rand(2, H * D)
    tk.token_step(q, k, v, tk.TokenBuffers.from_scores(st, 1, pos, **extra), head_dim=D, use_triton=True)
    tk.token_step_reference(q, k, v, tk.TokenBuffers.from_scores(ref, 1, pos, **extra), head_dim=D)
    for a, b in zip((st.ckeys, st.kacc, st.cis, st.cscore, st.sacc, st.static),
                    (ref.ckeys, ref.kacc, ref.cis, ref.cscore, ref.sacc, ref.static)):
        _close(a, b, False, "state")
    assert st.ckeys[1].any() and not st.ckeys[0].any() and st.cis[1, :, 15].any() and not st.cis[0].any()


def test_bad_arguments_raise_value_error():
    D, H, G, n = 16, 2, 2, 2
    q, k, v = torch.randn(n, H * G * D), torch.randn(n, H * D), torch.randn(n, H * D)
    buf = tk.TokenBuffers(pos=torch.zeros(n * H, dtype=torch.int64))
    bad = [
        dict(head_dim=15),
        dict(row0=1),  # not at a sequence boundary
        dict(row0=2),  # past the end
        dict(inv_freq=torch.ones(D)),
        dict(buf=replace(buf, pos=buf.pos.int())),
        dict(buf=replace(buf, pool=torch.zeros(n * H, 2, 2, 8, D))),  # no dst_slot / dst_tok
        dict(buf=replace(buf, ckeys=torch.zeros(n * H, 5, D))),  # no kacc
        dict(buf=replace(buf, cscore=torch.zeros(n * H, 5), static=torch.zeros(n * H, 3))),  # half of NOSA's state
        dict(v=v[:, :D]),
        dict(q=q.t().contiguous().t()),  # inner stride != 1
    ]
    for kw in bad:
        args = {"q": q, "k": k, "v": v, "buf": buf, "head_dim": D, **kw}
        with pytest.raises(ValueError):
            tk.token_step(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("buf"), **args, use_triton=False)
    with pytest.raises(ValueError):
        tk.rms_norm(torch.randn(2, 8), torch.randn(7))
    with pytest.raises(ValueError):
        tk.rms_norm(torch.randn(2, 8), torch.randn(8), residual=torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError):
        tk.silu_mul(torch.randn(2, 7))


def test_without_triton_the_wrappers_are_the_references(monkeypatch):
    x, w, gu = torch.randn(3, 64), torch.randn(64), torch.randn(3, 32)
    monkeypatch.setattr(tk, "AVAILABLE", False)
    assert torch.equal(tk.rms_norm(x, w), tk.rms_norm_reference(x, w))
    assert torch.equal(tk.silu_mul(gu), tk.silu_mul_reference(gu))
    with pytest.raises(RuntimeError):
        tk.silu_mul(gu, use_triton=True)


@pytest.mark.gpu
def test_glue_replays_in_a_cuda_graph():
    """Static launches, per-step values from device tensors: one captured graph replays every step."""
    dtype, D, G, H, nseq, bs, N, I = torch.bfloat16, 128, 4, 8, 6, 64, 512, 384
    g = torch.Generator().manual_seed(12)
    R = nseq * H
    got = _buffers(g, R, H, D, dtype, dtype, True, True, bs, 16, 5, 3, "cuda")
    _grid_weights(g, got, "dyadic")
    ref = _clone(got)
    inv_freq = (1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)).cuda()
    qkv = torch.zeros(nseq, (G * H + 2 * H) * D, dtype=dtype, device="cuda")
    q, k, v = qkv.split([G * H * D, H * D, H * D], -1)
    x, res = (torch.zeros(nseq, N, dtype=dtype, device="cuda") for _ in range(2))
    w = torch.randn(N, generator=g).to("cuda", dtype)
    gu = torch.zeros(nseq, 2 * I, dtype=dtype, device="cuda")
    starts = torch.tensor([bs - 3, 2 * bs - 1, 45, 2 * bs, 3 * bs - 4, bs + 5], device="cuda")

    def glue(buf):
        return (tk.token_step(q, k, v, buf, head_dim=D, inv_freq=inv_freq), tk.rms_norm(x, w, residual=res),
                tk.silu_mul(gu))

    glue(_clone(got))  # compile outside the capture, on a copy of the state
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (qo, ko), (y, s), act = glue(got)
    for t in range(6):
        _advance((got, ref), starts + t, H, t, bs, 3)
        qkv.copy_(torch.randn(qkv.shape, generator=g))
        v.copy_(torch.randint(-24, 25, v.shape, generator=g) / 8)
        x.copy_(torch.randint(-8, 9, x.shape, generator=g) / 8)
        res.copy_(torch.randint(-8, 9, x.shape, generator=g) / 8)
        gu.copy_(torch.randn(gu.shape, generator=g))
        graph.replay()
        qr, kr = tk.token_step_reference(q, k, v, ref, head_dim=D, inv_freq=inv_freq)
        y_ref, s_ref = tk.rms_norm_reference(x, w, residual=res)
        for a, b, what in ((qo, qr, "q_out"), (ko, kr, "k_out"), (y, y_ref, "normed"), (s, s_ref, "sum"),
                           (act, tk.silu_mul_reference(gu), "silu_mul")):
            _close(a, b, True, f"step {t}: {what}")
        for name, tensor in _tensors(got).items():
            _close(tensor, getattr(ref, name), True, f"step {t}: {name}")
