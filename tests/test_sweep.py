"""Sweeps (grid expansion, grouping, Pareto front, recall hook) and the replay / sweep / compare commands."""

import csv
import json

import numpy as np
import pytest

from nosasim.cli import main
from nosasim.models import ReplayConfig
from nosasim.sweep import expand, pareto, run_group
from nosasim.trace import Trace, write_trace
from nosasim.trace.synth import synthesize


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    tr = synthesize("nosa", 2, 2, 2, 48, 64, 8192, head_dim=64, seed=3)
    # Stand-in attention mass (the scores, renormalised) so the recall hook has something to score.
    mass = np.nan_to_num(tr.qaware_score.astype(np.float32), nan=0.0)
    mass = (mass / np.maximum(mass.sum(-1, keepdims=True), 1e-9)).astype(np.float16)
    mass[np.isnan(tr.qaware_score)] = np.nan
    tr = Trace.from_arrays(tr.sel, tr.context_len, model=tr.header.model, selection=tr.header.selection,
                           agnostic_score=tr.agnostic_score, qaware_score=tr.qaware_score, attn_mass=mass)
    path = tmp_path_factory.mktemp("sweep") / "t.nosatrace"
    write_trace(path, tr)
    return path


def test_expand_skips_impossible_and_dedupes_dense():
    base = ReplayConfig(model="llama3-8b", k=64)
    cfgs, skipped = expand(base, {"variant": ["nosa", "dense"], "k_q": [33, 80], "capacity": [32, 64, 96],
                                  "batch": [1, 4]})
    nosa = [c for c in cfgs if c.variant == "nosa"]
    assert len(nosa) == 2 * 2  # k_q 33 x C {64, 96} x 2 batches; k_q 80 and C 32 are impossible
    assert len([c for c in cfgs if c.variant == "dense"]) == 2  # one per batch: budgets do not apply
    assert skipped > 0 and all(c.k_q <= c.k <= c.capacity for c in nosa)


def test_pareto_front():
    rows = [dict(fits=True, gpu_memory_bytes=m, tokens_per_s=t, variant="nosa", policy="lru") for m, t in
            [(10, 100), (20, 90), (20, 150), (30, 140), (40, 300), (5, 50)]]
    rows.append(dict(fits=False, gpu_memory_bytes=1, tokens_per_s=1e9, variant="nosa", policy="lru"))
    # Belady's policy needs the future: a bound to plot, never a configuration on the front.
    rows.append(dict(fits=True, gpu_memory_bytes=4, tokens_per_s=1e6, variant="nosa", policy="belady"))
    rows.append(dict(fits=True, gpu_memory_bytes=50, tokens_per_s=400, variant="dense", policy="prev"))
    front = pareto(rows)
    assert [(r["gpu_memory_bytes"], r["tokens_per_s"]) for r in front] == [(5, 50), (10, 100), (20, 150), (40, 300),
                                                                           (50, 400)]


def test_group_shares_one_cache_run_and_reports_recall(trace_path):
    from nosasim.trace import read_trace

    trace = read_trace(trace_path)
    cfgs = [ReplayConfig(model="smollm2-135m", k=64, k_q=33, batch=b, microbatches=m) for b in (2, 4) for m in (1, 2)]
    rows = run_group(cfgs, trace)
    assert len(rows) == 4 and len({r["hit_rate"] for r in rows}) <= 2
    assert all(0 < r["recall"] <= 1 for r in rows)
    by_batch = {(r["batch"], r["microbatches"]): r["tokens_per_s"] for r in rows}
    assert by_batch[4, 1] > by_batch[2, 1]


def test_replay_json_keys(trace_path, capsys):
    assert main(["replay", str(trace_path), "--model", "smollm2-135m", "--batch", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("step_time_s", "tokens_per_s", "breakdown", "hit_rate", "h2d_bytes_per_step", "gpu_memory_bytes",
                "max_batch"):
        assert key in out
    assert sum(out["breakdown"].values()) == pytest.approx(out["step_time_s"], rel=0.01)
    assert out["tokens_per_s"] == pytest.approx(4 / out["step_time_s"])


def test_replay_rejects_impossible_budget(trace_path, capsys):
    assert main(["replay", str(trace_path), "--model", "smollm2-135m", "--k", "64", "--capacity", "10"]) == 2
    assert "capacity" in capsys.readouterr().err


def test_sweep_command_writes_outputs(trace_path, tmp_path):
    out = tmp_path / "out"
    code = main(["sweep", str(trace_path), "--model", "smollm2-135m", "--kq", "17,33", "--policy", "prev,lru",
                 "--capacity", "64,80", "--batch", "2,4", "--workers", "1", "--quiet", "--out", str(out)])
    assert code == 0
    with open(out / "points.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 * 2
    assert (out / "sweep.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["pareto_recall"]
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporary files


def test_sweep_dense_first_beside_fp8_element_types(trace_path, tmp_path):
    """Dense listed first with fp8 blocks and keys (and split attention) on the grid: dense points keep bf16 and no
    split, the NOSA points take every listed element type."""
    out = tmp_path / "out"
    code = main(["sweep", str(trace_path), "--model", "smollm2-135m", "--variant", "dense,nosa", "--kv-dtype", "fp8",
                 "--ckey-dtype", "bf16,fp8", "--split-attention", "true", "--batch", "2", "--workers", "1", "--quiet",
                 "--out", str(out)])
    assert code == 0
    with open(out / "points.csv") as f:
        rows = list(csv.DictReader(f))
    dense = [r for r in rows if r["variant"] == "dense"]
    nosa = [r for r in rows if r["variant"] == "nosa"]
    assert len(dense) == 1 and dense[0]["kv_dtype"] == dense[0]["ckey_dtype"] == "bf16"
    assert dense[0]["split_attention"] == "False"
    assert sorted(r["ckey_dtype"] for r in nosa) == ["bf16", "fp8"] and {r["kv_dtype"] for r in nosa} == {"fp8"}


def test_compare_command(trace_path, tmp_path, capsys):
    png = tmp_path / "c.png"
    assert main(["compare", str(trace_path), "--model", "smollm2-135m", "--batch", "4", "--plot", str(png),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"dense", "infllmv2", "nosa"}
    assert all(v["provenance"]["trace"] == str(trace_path) for v in out.values())
    assert out["dense"]["hit_rate"] is None and out["nosa"]["hit_rate"] > out["infllmv2"]["hit_rate"]
    assert png.stat().st_size > 1000


def test_compare_plot_format_follows_the_suffix(trace_path, tmp_path, capsys):
    """A .pdf gets PDF bytes (it once got PNG bytes); a suffix no format has is refused before any work."""
    args = ["compare", str(trace_path), "--model", "smollm2-135m", "--batch", "4", "--json", "--plot"]
    assert main(args + [str(tmp_path / "c.pdf")]) == 0
    assert (tmp_path / "c.pdf").read_bytes()[:5] == b"%PDF-"
    assert main(args + [str(tmp_path / "c.jpeg")]) == 2
    err = capsys.readouterr().err
    assert "--plot" in err and "must end in one of .png, .pdf, .svg" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pdf"]


def test_parallel_sweep_equals_serial(trace_path):
    from nosasim.sweep import run_sweep

    cfgs, _ = expand(ReplayConfig(model="smollm2-135m", k=64), {"policy": ["prev", "lru"], "batch": [2, 4]})
    serial = run_sweep(str(trace_path), cfgs, workers=1, progress=False)
    parallel = run_sweep(str(trace_path), cfgs, workers=2, progress=False)
    assert len(serial) == 4
    assert [r["tokens_per_s"] for r in serial] == [r["tokens_per_s"] for r in parallel]


def test_sweep_skips_and_counts_every_impossible_point(trace_path, tmp_path, capsys):
    """k_q = 5 breaks the budget rule (below sink + window), a batch of 1,000 needs more step-shifted copies than the
    48-step trace has: both are skipped and counted, and the sweep finishes with the points that are possible."""
    out = tmp_path / "skip"
    code = main(["sweep", str(trace_path), "--model", "smollm2-135m", "--kq", "5,33", "--batch", "2,1000",
                 "--workers", "1", "--quiet", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["points"] == 1  # k_q 33 at batch 2
    assert summary["skipped_impossible"] == 2  # k_q 5 at both batches
    assert summary["skipped_unreplayable"] == 1 and summary["skipped_points"][0]["batch"] == 1000
    assert "step-shifted copies" in summary["skipped_points"][0]["skipped"]
    with open(out / "points.csv") as f:
        assert [(r["k_q"], r["batch"]) for r in csv.DictReader(f)] == [("33", "2")]
    assert "2 impossible budgets and 1 points the trace cannot replay skipped" in capsys.readouterr().out


def test_sweep_folder_appears_whole_and_replaces_the_last(trace_path, tmp_path, monkeypatch, capsys):
    """``--out`` is replaced whole: an earlier run's files do not survive beside the new ones, a failure part-way
    leaves the earlier folder exactly as it was (and no temporary folder), and a file or an unwritable place is a
    one-line error."""
    out = tmp_path / "out"
    args = ["sweep", str(trace_path), "--model", "smollm2-135m", "--kq", "33", "--batch", "2", "--workers", "1",
            "--quiet", "--out", str(out)]
    assert main(args) == 0
    (out / "stale.csv").write_text("from an earlier run")
    before = sorted(p.name for p in out.iterdir())
    import nosasim.plot

    def broken(*a, **k):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(nosasim.plot, "plot_sweep", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        main(args)
    assert sorted(p.name for p in out.iterdir()) == before  # untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    monkeypatch.undo()
    assert main(args) == 0
    assert not (out / "stale.csv").exists() and (out / "points.csv").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    capsys.readouterr()
    assert main(args[:-1] + [str(afile)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(args[:-1] + [str(afile / "sub")]) == 2
    assert "--out" in capsys.readouterr().err
