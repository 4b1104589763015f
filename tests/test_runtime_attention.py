"""Block-sparse decode attention equals dense attention restricted to the same tokens (float64 reference, fresh
random inputs, several shapes, NOSA's logit bias, padding and partial tails)."""

import math

import pytest
import torch

from runtime.attention import AttentionPlan, reference_attention, sparse_decode_attention

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _case(device, R, G, D, slots, NE, dtype, seed, bias):
    g = torch.Generator(device=device).manual_seed(seed)
    BS = 64
    pool = torch.randn(R, slots, 2, BS, D, generator=g, device=device).to(dtype)
    q = torch.randn(R, G, D, generator=g, device=device).to(dtype)
    # Distinct slots per row, some padding entries, lengths 64 except a partial last (the tail).
    sl = torch.argsort(torch.rand(R, slots, generator=g, device=device), 1)[:, :NE]
    lens = torch.full((R, NE), BS, device=device, dtype=torch.int32)
    lens[:, -1] = torch.randint(1, BS + 1, (R,), generator=g, device=device, dtype=torch.int32)
    pad = torch.rand(R, NE, generator=g, device=device) < 0.2
    pad[:, -1] = False
    sl = torch.where(pad, -1, sl)
    lens = torch.where(pad, 0, lens)
    blocks = torch.where(pad, -1, sl + 3)  # block ids differ from slots: the bias is looked up by block
    nb = slots + 3
    b = torch.randn(R, nb * BS, generator=g, device=device) if bias else None
    return q, pool, AttentionPlan(sl, lens, blocks), b


def _dense_masked_f64(q, pool, plan, bias):
    """Dense attention over each row's whole pool, with every token outside the plan masked out."""
    R, S, _, BS, D = pool.shape
    k = pool[:, :, 0].double().reshape(R, S * BS, D)
    v = pool[:, :, 1].double().reshape(R, S * BS, D)
    mask = torch.zeros(R, S * BS, dtype=torch.bool, device=q.device)
    add = torch.zeros(R, S * BS, dtype=torch.float64, device=q.device)
    tok = torch.arange(BS, device=q.device)
    for r in range(R):
        for e in range(plan.slots.shape[1]):
            s, n, blk = int(plan.slots[r, e]), int(plan.lens[r, e]), int(plan.blocks[r, e])
            if s >= 0 and n > 0:
                mask[r, s * BS: s * BS + n] = True
                if bias is not None:
                    add[r, s * BS: s * BS + BS] = bias[r, blk * BS: blk * BS + BS].double()
    s = torch.einsum("rgd,rtd->rgt", q.double(), k) / math.sqrt(D) + add[:, None]
    return torch.einsum("rgt,rtd->rgd", torch.softmax(s.masked_fill(~mask[:, None], float("-inf")), -1), v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("R,G,D,slots,NE", [(3, 4, 64, 12, 9), (5, 1, 128, 20, 17), (2, 8, 32, 70, 65)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_equals_dense_restricted(device, R, G, D, slots, NE, dtype, tol, bias):
    for seed in range(2):  # fresh inputs each time
        q, pool, plan, b = _case(device, R, G, D, slots, NE, dtype, seed * 7 + NE, bias)
        ref = _dense_masked_f64(q, pool, plan, b)
        outs = [sparse_decode_attention(q, pool, plan, b)]
        if device == "cuda":
            outs.append(sparse_decode_attention(q, pool, plan, b, splits=3))
            outs.append(sparse_decode_attention(q, pool, plan, b, splits=1))
        for out in outs:
            assert out.shape == (R, G, D) and out.dtype == dtype
            assert not torch.isnan(out).any()
            err = ((out.double() - ref).norm() / ref.norm()).item()
            assert err < tol, err


def test_reference_rejects_bad_pool():
    q = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match="pool"):
        sparse_decode_attention(q, torch.randn(3, 4, 2, 64, 16), AttentionPlan(*(torch.zeros(2, 1, dtype=torch.long),) * 3))


def test_nan_is_caught():
    q, pool, plan, _ = _case("cpu", 2, 4, 16, 6, 4, torch.float32, 0, False)
    pool[0, plan.slots[0, -1], 0, 0, 0] = float("nan")
    out = reference_attention(q, pool, plan)
    assert torch.isnan(out).any()  # a NaN in an attended token must surface, never be masked away
