"""nosasim.scoring against brute-force loop references written straight from the method's rules (docs/recording.md)."""

import numpy as np
import pytest

from nosasim import scoring


def ref_windows(n_tok, window, stride):
    """Complete windows as (start, end) token ranges, by enumeration."""
    return [(s, s + window) for s in range(0, n_tok, stride) if s + window <= n_tok]


def ref_compressed(keys, window=32, stride=16):
    wins = ref_windows(keys.shape[-2], window, stride)
    return np.stack([keys[..., s:e, :].mean(axis=-2) for s, e in wins], axis=-2) if wins else None


def ref_block_scores(query, keys, window=32, stride=16, bs=64):
    hq, d = query.shape
    hkv, n_tok, _ = keys.shape
    g = hq // hkv
    wins = ref_windows(n_tok, window, stride)
    nb = (n_tok - 1) // bs + 1
    out = np.zeros((hkv, nb))
    for h in range(hkv):
        ck = [keys[h, s:e].astype(np.float64).mean(axis=0) for s, e in wins]
        wsum = np.zeros(len(wins))
        for qh in range(h * g, (h + 1) * g) if wins else ():
            logits = np.array([query[qh].astype(np.float64) @ c for c in ck]) / np.sqrt(d)
            p = np.exp(logits - logits.max())
            wsum += p / p.sum()
        for b in range(nb):
            vals = [wsum[i] for i, (s, e) in enumerate(wins) if s < (b + 1) * bs and e > b * bs]
            out[h, b] = max(vals) if vals else 0.0
    return out


def ref_static(tok, window=32, stride=16, bs=64):
    n_tok = tok.shape[-1]
    wins = ref_windows(n_tok, window, stride)
    out = np.full(tok.shape[:-1] + (n_tok // bs,), np.nan)
    for b in range(n_tok // bs):
        # Frozen at completion: the windows that overlap b and already exist when b completes.
        idx = [i for i, (s, e) in enumerate(wins) if s < (b + 1) * bs and e > b * bs and e <= (b + 1) * bs]
        if idx:
            out[..., b] = np.max([tok[..., s:e].mean(axis=-1) for s, e in (wins[i] for i in idx)], axis=0)
    return out


@pytest.mark.parametrize("n_tok", [1, 31, 32, 47, 48, 64, 65, 200, 257])
def test_compressed_keys_match_loop(n_tok):
    rng = np.random.default_rng(n_tok)
    keys = rng.standard_normal((3, n_tok, 8)).astype(np.float32)
    ck = scoring.compressed_keys(keys)
    ref = ref_compressed(keys)
    if ref is None:
        assert ck.shape == (3, 0, 8)
    else:
        np.testing.assert_allclose(ck, ref, rtol=1e-6, atol=1e-6)
    assert ck.shape[1] == scoring.n_windows(n_tok)


@pytest.mark.parametrize("n_tok,hq,hkv", [(20, 4, 2), (33, 2, 2), (130, 6, 3), (300, 4, 2), (513, 9, 3)])
def test_infllmv2_block_scores_match_loop(n_tok, hq, hkv):
    rng = np.random.default_rng(n_tok + hq)
    query = rng.standard_normal((hq, 16)).astype(np.float32) * 3
    keys = rng.standard_normal((hkv, n_tok, 16)).astype(np.float32) * 3
    got = scoring.infllmv2_block_scores(query, keys)
    assert got.shape == (hkv, (n_tok - 1) // 64 + 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref_block_scores(query, keys), rtol=1e-5, atol=1e-6)


def test_block_scores_leading_batch_axes_and_other_pooling():
    rng = np.random.default_rng(1)
    query = rng.standard_normal((2, 4, 8)).astype(np.float32)
    keys = rng.standard_normal((2, 2, 100, 8)).astype(np.float32)
    got = scoring.infllmv2_block_scores(query, keys, window=8, stride=4, block_size=16)
    for b in range(2):
        np.testing.assert_allclose(got[b], ref_block_scores(query[b], keys[b], 8, 4, 16), rtol=1e-5, atol=1e-6)


def test_window_maps_to_every_block_it_overlaps():
    # Window 3 covers tokens 48..79: it straddles blocks 0 and 1, so a peak there lifts both.
    idx = scoring.window_block_index(8, 2, frozen=False)
    assert 3 in idx[0] and 3 in idx[1]
    assert sorted(i for i in idx[1] if i >= 0) == [3, 4, 5, 6, 7]
    frozen = scoring.window_block_index(8, 2, frozen=True)
    assert 3 not in frozen[0] and 3 in frozen[1]


def test_incremental_compressed_keys_give_same_scores():
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((2, 300, 16)).astype(np.float32)
    q = rng.standard_normal((4, 16)).astype(np.float32)
    ck = np.concatenate([scoring.compressed_keys(keys[:, :160]), scoring.compressed_keys(keys[:, 144:300])], axis=1)
    np.testing.assert_allclose(scoring.block_scores_from_compressed(q, ck, 300),
                               scoring.infllmv2_block_scores(q, keys), rtol=1e-6)


@pytest.mark.parametrize("n_tok", [63, 64, 100, 128, 300])
def test_static_block_scores_match_loop_and_are_frozen(n_tok):
    rng = np.random.default_rng(n_tok)
    tok = rng.random((3, n_tok)).astype(np.float32)
    got = scoring.static_block_scores(tok)
    np.testing.assert_allclose(got, ref_static(tok), rtol=1e-6)
    # More tokens later (prefix unchanged) must not move any block that was already complete.
    more = np.concatenate([tok, rng.random((3, 200)).astype(np.float32) * 100], axis=1)
    np.testing.assert_array_equal(scoring.static_block_scores(more)[:, : got.shape[1]], got)


def test_block_attention_mass_sums_blocks_and_keeps_total():
    p = np.random.default_rng(3).random((2, 130))
    m = scoring.block_attention_mass(p)
    assert m.shape == (2, 3)
    np.testing.assert_allclose(m[:, 1], p[:, 64:128].sum(axis=1))
    np.testing.assert_allclose(m.sum(axis=1), p.sum(axis=1))


def test_bad_shapes_raise_valueerror_naming_the_problem():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        scoring.infllmv2_block_scores(np.zeros((3, 8)), np.zeros((2, 64, 8)))
    with pytest.raises(ValueError, match="head_dim"):
        scoring.infllmv2_block_scores(np.zeros((4, 8)), np.zeros((2, 64, 16)))
    with pytest.raises(ValueError, match="n_tokens"):
        scoring.block_scores_from_compressed(np.zeros((4, 8)), np.zeros((2, 3, 8)), 200)
    with pytest.raises(ValueError, match="stride"):
        scoring.avg_pool(np.zeros(10), window=4, stride=0)
