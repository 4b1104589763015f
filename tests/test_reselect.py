"""``nosasim reselect``: exact reproduction at the recorded budget, NOSA's overlap bound, recall at k = all."""

import glob
import os

import numpy as np
import pytest

from nosasim.cli import main
from nosasim.quality import recall
from nosasim.select import select_blocks
from nosasim.contract import Budget
from nosasim.trace import ModelShape, SelectionParams, Trace, read_trace, tails_of, write_trace

SAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "traces", "samples", "*.nosatrace")))


def score_trace(seed=0, steps=150, layers=2, heads=2, prompt=1900, k=12, k_q=7, window=3):
    """A score trace whose query-aware scores change every step (so only the static part is stable)."""
    rng = np.random.default_rng(seed)
    ctx = (prompt + 1 + np.arange(steps, dtype=np.int32))[:, None]
    nb = int(ctx.max() - 1) // 64 + 1
    exists = (np.arange(nb)[None, :] <= (ctx - 1) // 64)[:, None, None, None, :]
    shape = (steps, layers, heads, 1, nb)
    qaware = np.where(exists, rng.random(shape), np.nan).astype(np.float16)
    mass = np.where(exists, rng.dirichlet(np.ones(nb) * 0.2, size=shape[:-1]), np.nan).astype(np.float16)
    agn = rng.random((layers, heads, 1, nb)).astype(np.float32)
    sel = select_blocks(qaware, ctx[:, None, None, :], k=k, k_q=k_q, sink=1, window=window, agnostic=agn[None])
    return Trace.from_arrays(sel, ctx, model=ModelShape(layers, heads, 64),
                             selection=SelectionParams("nosa", Budget(k, k_q, 1, window)), agnostic_score=agn,
                             qaware_score=qaware, attn_mass=mass)


def overlap_shortfall(sel, ctx, k_e, k, block_size=64):
    """Steps where ``|S_t & (S_t-1 | {tail_t-1})| < k_e`` although step t-1 had >= k complete blocks."""
    bad = []
    tails = tails_of(ctx, block_size)
    for t in range(1, sel.shape[0]):
        if tails[t - 1, 0] < k:
            continue
        for row in np.ndindex(sel.shape[1:-1]):
            prev = set(sel[(t - 1,) + row]) | {int(tails[t - 1, 0])}
            cur = set(sel[(t,) + row])
            prev.discard(-1), cur.discard(-1)
            if len(cur & prev) < k_e:
                bad.append((t, row))
    return bad


def run_cli(*args):
    return main(["reselect", *map(str, args)])


def test_recorded_budget_is_reproduced_through_the_cli(tmp_path):
    tr = score_trace()
    src, out = tmp_path / "s.nosatrace", tmp_path / "r.nosatrace"
    write_trace(src, tr)
    assert run_cli(src, "--k", 12, "--kq", 7, "--sink", 1, "--window", 3, "-o", out) == 0
    re = read_trace(out)
    np.testing.assert_array_equal(re.sel, tr.sel)
    assert re.header.selection.method == "nosa" and re.header.provenance["reselected"]["k_q"] == 7
    # A different budget must actually change the selection, or the check above proves little.
    assert run_cli(src, "--k", 12, "--kq", 9, "--window", 3, "-o", out) == 0
    assert not np.array_equal(read_trace(out).sel, tr.sel)


@pytest.mark.parametrize("k,k_q", [(12, 7), (20, 8), (9, 9), (30, 20)])
def test_nosa_overlap_bound_holds_on_every_step(tmp_path, k, k_q):
    src, out = tmp_path / "s.nosatrace", tmp_path / "r.nosatrace"
    write_trace(src, score_trace())
    assert run_cli(src, "--k", k, "--kq", k_q, "--window", 3, "-o", out) == 0
    re = read_trace(out)
    assert overlap_shortfall(re.sel, re.context_len, k - k_q, k) == []


def test_overlap_check_catches_a_moving_agnostic_score():
    # The bound rests on the static score: redraw it every step and it must break somewhere.
    tr = score_trace()
    moving = np.random.default_rng(5).random(tr.qaware_score.shape).astype(np.float32)
    sel = select_blocks(tr.qaware_score, tr.context_len[:, None, None, :], k=20, k_q=8, sink=1, window=3,
                        agnostic=moving)
    assert overlap_shortfall(sel, tr.context_len, 12, 20) != []


def test_recall_is_one_at_k_all_blocks(tmp_path):
    tr = score_trace()
    src, out = tmp_path / "s.nosatrace", tmp_path / "r.nosatrace"
    write_trace(src, tr)
    assert run_cli(src, "--k", tr.n_blocks, "--window", 3, "-o", out) == 0  # k counts the tail: every block
    re = read_trace(out)
    assert re.header.selection.method == "infllmv2"
    np.testing.assert_array_equal(recall(re), 1.0)
    assert (recall(tr) < 1).any()


def test_k_beyond_the_trace_is_refused(tmp_path, capsys):
    """A k past every block selects nothing more and only sizes caches for blocks that never exist: refused by
    reselect, and by replay (which re-selects), with one line naming the largest k."""
    tr = score_trace()
    src, out = tmp_path / "s.nosatrace", tmp_path / "r.nosatrace"
    write_trace(src, tr)
    assert run_cli(src, "--k", tr.n_blocks + 1, "--window", 3, "-o", out) == 2
    assert f"use k <= {tr.n_blocks}" in capsys.readouterr().err and not out.exists()
    assert main(["replay", str(src), "--model", "smollm2-135m", "--batch", "2", "--k", str(tr.n_blocks + 1)]) == 2
    assert f"use k <= {tr.n_blocks}" in capsys.readouterr().err


def test_agnostic_score_by_name_from_the_sidecar(tmp_path, capsys):
    tr = score_trace()
    src, out = tmp_path / "s.nosatrace", tmp_path / "r.nosatrace"
    write_trace(src, tr)
    other = np.random.default_rng(9).random(tr.agnostic_score.shape).astype(np.float32)
    np.savez(tmp_path / "s.agnostic.npz", key_norm=other)
    assert run_cli(src, "--k", 12, "--kq", 7, "--window", 3, "--agnostic-score", "key_norm", "-o", out) == 0
    want = select_blocks(tr.qaware_score, tr.context_len[:, None, None, :], k=12, k_q=7, sink=1, window=3,
                         agnostic=other[None])
    np.testing.assert_array_equal(read_trace(out).sel, want)
    assert run_cli(src, "--k", 12, "--kq", 7, "--window", 3, "--agnostic-score", "nope", "-o", out) == 2
    assert "expected one of ['key_norm']" in capsys.readouterr().err


@pytest.mark.skipif(not SAMPLES, reason="no bundled sample traces")
@pytest.mark.parametrize("path", SAMPLES, ids=os.path.basename)
def test_bundled_samples_reselect_exactly_and_carry_provenance(path):
    tr = read_trace(path)
    s = tr.header.selection
    assert tr.qaware_score is not None and tr.attn_mass is not None and tr.agnostic_score is not None
    assert tr.steps >= 256 and tr.context_len.max() >= 8000
    re = select_blocks(tr.qaware_score, tr.context_len[:, None, None, :], k=s.k, k_q=s.k_q, sink=s.budget.sink,
                       window=s.budget.window, agnostic=tr.agnostic_score[None] if s.k_q else None)
    np.testing.assert_array_equal(re, tr.sel)
    prov = tr.header.provenance
    assert prov["hook_check"]["rel_err"] < 1e-4 and prov["command"].startswith("python -m traces.record")
    assert {"file", "sha256", "start_char", "end_char"} <= set(prov["text"])


def _mean_overlap(trace, tmp_path, name):
    from nosasim.trace.io import TraceReader
    from nosasim.trace.stats import overlap_per_layer

    path = tmp_path / name
    write_trace(path, trace)
    with TraceReader(path) as r:
        return float(np.mean(overlap_per_layer(r)))


@pytest.mark.parametrize("kind, kq_big, kq_small", [("infllmv2", None, None), ("nosa", 33, 25)])
def test_synthetic_locality_survives_reselection(tmp_path, kind, kq_big, kq_small):
    """Generator 2 keeps each block's score across steps, so re-selecting a k = 64 synthetic trace at k = 46 keeps
    the adjacent overlap of a trace synthesised at k = 46 directly (within 0.02), and both meet the overlap target.
    Generator 1 drew the scores anew every step: re-selected at k = 46 its overlap fell from 0.889 to 0.69."""
    from nosasim.select import reselect
    from nosasim.trace.synth import synthesize

    big = synthesize(kind, 2, 2, 4, 96, 64, 32768, kq=kq_big, seed=3, generator=2)
    direct = synthesize(kind, 2, 2, 4, 96, 46, 32768, kq=kq_small, seed=4, generator=2)
    again = reselect(big, Budget(46, kq_small, 1, 16))
    o_big, o_direct, o_again = (_mean_overlap(t, tmp_path, f"{n}.nosatrace")
                                for n, t in (("big", big), ("direct", direct), ("again", again)))
    assert abs(o_again - o_direct) <= 0.02, (o_big, o_direct, o_again)
    if kind == "infllmv2":  # the target (0.889) is met, not only approached; NOSA's floor of k_e / k lifts it
        assert abs(o_big - 0.889) <= 0.01 and abs(o_direct - 0.889) <= 0.01, (o_big, o_direct)
    old = reselect(synthesize(kind, 2, 2, 4, 96, 64, 32768, kq=kq_big, seed=3, generator=1),
                   Budget(46, kq_small, 1, 16))
    assert _mean_overlap(old, tmp_path, "old.nosatrace") < o_direct - 0.05  # what generator 2 fixes


def test_synthesis_generator_is_checked_and_recorded():
    from nosasim.trace.synth import synthesize

    with pytest.raises(ValueError, match="--generator must be one of"):
        synthesize("infllmv2", 1, 1, 1, 4, 8, 2048, generator=3)
    assert synthesize("infllmv2", 1, 1, 1, 4, 32, 4096, generator=2).header.provenance["recorder"] == \
        "nosasim.trace.synth v2"
    assert synthesize("infllmv2", 1, 1, 1, 4, 32, 4096).header.provenance["recorder"] == "nosasim.trace.synth v1"
