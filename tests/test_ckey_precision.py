"""The tap's rounded-compressed-key scoring (``AttentionTap(ckey_roundings=...)``) on a tiny synthetic layer, no model,
and the comparison code of ``benchmarks/bench_ckey_precision.py``."""

import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from nosasim import scoring  # noqa: E402
from traces.hook import (  # noqa: E402
    FP8_E4M3_MAX,
    AttentionTap,
    round_bf16,
    round_fp8_e4m3,
    round_fp16,
    rounded_block_scores,
)

HKV, GROUP, D, PROMPT, STEPS = 2, 3, 16, 300, 4
ROUNDINGS = {"bf16": round_bf16, "fp8": round_fp8_e4m3, "fp8_f16q": (round_fp8_e4m3, round_fp16)}


def _run_tap(roundings):
    """Feed a prefill and STEPS decode steps of one synthetic layer straight into the tap's observer."""
    g = torch.Generator().manual_seed(7)
    n = PROMPT + STEPS
    keys = torch.randn(HKV, n, D, generator=g) * 3 + torch.randn(HKV, 1, D, generator=g) * 4  # a shared offset
    values = torch.randn(HKV, n, D, generator=g)
    queries = torch.randn(HKV * GROUP, n, D, generator=g) * 2
    scale = D ** -0.5
    nb = (n - 1) // 64 + 1
    tap = AttentionTap(1, HKV, STEPS, nb, {}, ckey_roundings=roundings)
    with torch.no_grad():
        tap.step = None
        tap._observe(0, queries[:, :PROMPT], keys[:, :PROMPT], values[:, :PROMPT], scale, None)
        for t in range(STEPS):
            m = PROMPT + t + 1
            q = queries[:, m - 1: m]
            probs = torch.softmax(q.reshape(HKV, GROUP, D) @ keys[:, :m].transpose(1, 2) * scale, -1)
            out = (probs @ values[:, :m]).reshape(1, HKV * GROUP, D)
            tap.step = t
            tap._observe(0, q, keys[:, :m], values[:, :m], scale, out)
    return tap, keys.numpy(), queries.numpy(), scale


@pytest.fixture(scope="module")
def tapped():
    return _run_tap(ROUNDINGS)


def test_rounded_scores_equal_reference_scoring_on_pre_rounded_keys(tapped):
    tap, keys, queries, scale = tapped
    for t in range(STEPS):
        m = PROMPT + t + 1
        nb = (m - 1) // 64 + 1
        ck = scoring.compressed_keys(keys[:, :m])
        q = queries[:, m - 1]
        for name, key_round, q_round in (("bf16", round_bf16, round_bf16), ("fp8", round_fp8_e4m3, round_bf16),
                                         ("fp8_f16q", round_fp8_e4m3, round_fp16)):
            want = scoring.block_scores_from_compressed(q_round(q), key_round(ck), m, scale=scale)
            np.testing.assert_array_equal(tap.qaware_by[name][t, 0, :, 0, :nb], want)
            np.testing.assert_array_equal(rounded_block_scores(q, key_round(ck), m, scale=scale, query_round=q_round),
                                          want)
            assert np.isnan(tap.qaware_by[name][t, 0, :, 0, nb:]).all()
        # the unrounded path is the recorder's, unchanged
        np.testing.assert_array_equal(tap.qaware[t, 0, :, 0, :nb],
                                      scoring.block_scores_from_compressed(q, ck, m, scale=scale))


def test_fp8_rounding_changes_keys_and_scores(tapped):
    tap, keys, _, _ = tapped
    ck = tap._ck[0]
    ck8, ck16 = tap._ck_by["fp8"][0], tap._ck_by["bf16"][0]
    normal = np.abs(ck) >= 2.0 ** -6
    rel8 = np.abs(ck8 - ck)[normal] / np.abs(ck)[normal]
    rel16 = np.abs(ck16 - ck)[normal] / np.abs(ck)[normal]
    assert (ck8 != ck).mean() > 0.9 and (ck16 != ck).mean() > 0.9
    assert rel8.max() <= 2.0 ** -4 and rel16.max() <= 2.0 ** -8  # half an ulp: 3 and 7 mantissa bits
    assert rel8.mean() > 8 * rel16.mean()  # fp8 really is coarser
    # the scores move too, by more with fp8 keys than with bf16 ones
    ok = ~np.isnan(tap.qaware)
    d8 = np.abs(tap.qaware_by["fp8"] - tap.qaware)[ok]
    d16 = np.abs(tap.qaware_by["bf16"] - tap.qaware)[ok]
    assert d8.max() > 1e-4 and d8.mean() > 4 * d16.mean()


def test_round_fp8_saturates_and_rounds_to_e4m3():
    x = np.array([500.0, -1e4, 448.0, 1.0, 1.1, 0.3, 2.0 ** -9, 2.0 ** -11, 3.0e-3], np.float32)
    got = round_fp8_e4m3(x)
    np.testing.assert_array_equal(got, [FP8_E4M3_MAX, -FP8_E4M3_MAX, 448.0, 1.0, 1.125, 0.3125, 2.0 ** -9, 0.0,
                                        2.0 ** -8])
    assert round_fp8_e4m3(torch.tensor([1.1])).tolist() == [1.125]  # tensors in, numpy out
    np.testing.assert_array_equal(round_bf16(np.array([1 + 2 ** -9, 3.0], np.float32)), [1.0, 3.0])


def test_without_roundings_the_tap_records_the_same():
    plain, _, _, _ = _run_tap(None)
    rounded, _, _, _ = _run_tap({"fp8": round_fp8_e4m3})
    assert plain.qaware_by == {}
    np.testing.assert_array_equal(plain.qaware, rounded.qaware)
    np.testing.assert_array_equal(plain.mass, rounded.mass)
    assert not np.array_equal(rounded.qaware_by["fp8"], rounded.qaware, equal_nan=True)


def test_bad_rounding_spec_is_refused():
    with pytest.raises(ValueError, match="ckey_roundings"):
        AttentionTap(1, 1, 1, 1, {}, ckey_roundings={"x": "fp8"})


def _bench():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_ckey_precision.py")
    spec = importlib.util.spec_from_file_location("bench_ckey_precision", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_comparison_counts_a_changed_block():
    bench = _bench()
    rng = np.random.default_rng(3)
    T, L, H, nb = 2, 1, 2, 80
    ctx = np.array([nb * 64 - 10, nb * 64 - 9])
    s = rng.random((T, L, H, 1, nb)).astype(np.float32)
    mass = rng.random((T, L, H, 1, nb))
    mass /= mass.sum(-1, keepdims=True)
    s2 = s.copy()
    # row (0, 0, 0): make the weakest free block of the k=33 query-aware selection beat the best unselected one
    free = slice(1, nb - 16)
    order = np.argsort(-s[0, 0, 0, 0, free])
    s2[0, 0, 0, 0, 1 + order[-1]] = s[0, 0, 0, 0, free].max() + 1  # a never-selected block jumps to the top
    scores = {"fp32": s, "bf16": s, "fp8": s2, "fp8_f16q": s}
    res = bench.analyse(scores, mass.astype(np.float32), rng.random((L, H, 1, nb)).astype(np.float32), ctx)
    c = res["nosa_qaware_k33"]["comparisons"]
    assert c["fp32->bf16"]["identical_rows"] == 1.0 and c["fp32->bf16"]["kept_fraction"]["min"] == 1.0
    assert c["bf16->fp8"]["identical_rows"] == pytest.approx(1 - 1 / (T * L * H))
    assert c["bf16->fp8"]["kept_fraction"]["min"] == pytest.approx(31 / 32)
    assert c["bf16->fp8"]["blocks_changed_per_row_mean"] == pytest.approx(1 / (T * L * H))
