"""End-to-end configurations as typed records: the committed measurements still load, the configurations the
runtime measures are the committed ones, and both sides replay one assembled batch of one fingerprinted trace."""

import json
from pathlib import Path

import numpy as np
import pytest

from nosasim.contract import Budget
from nosasim.experiment import E2EConfig, fingerprint, load_source, replay_batch

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted((ROOT / "analysis" / "results").glob("e2e-*.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_measurements_load_and_round_trip(path):
    runs = json.loads(path.read_text())["runs"]
    assert runs
    for run in runs:
        cfg = E2EConfig.from_fields(run)
        assert E2EConfig.from_fields(cfg.to_fields()) == cfg
        if cfg.budget is not None:
            # Runs committed with capacity null ran the runtime's default, k - 1.
            want = run["capacity"] if run.get("capacity") is not None else run["k"] - 1
            assert cfg.budget.capacity == want and (cfg.budget.sink, cfg.budget.window) == (1, 16)


def test_runtime_configurations_are_the_committed_ones():
    pytest.importorskip("torch")
    from runtime.e2e import CONFIGS

    mine = {c.name: c for c in CONFIGS}
    for path in ("e2e-h100-run2.json", "e2e-h100-run3.json"):
        runs = json.loads((ROOT / "analysis/results" / path).read_text())["runs"]
        for run in runs:
            assert mine[run["name"]] == E2EConfig.from_fields(run), run["name"]


def test_bad_fields_are_named():
    with pytest.raises(ValueError, match="missing field 'k'"):
        E2EConfig.from_fields({"name": "x", "model": "llama3-8b", "variant": "nosa", "batch": 4, "trace": "t"})
    with pytest.raises(ValueError, match="policy"):
        E2EConfig("x", "t", "nosa", 4, Budget(64, 33), policy="belady")
    with pytest.raises(ValueError, match="budget"):
        E2EConfig("x", "t", "dense", 4, Budget(64))


def test_replay_batch_and_fingerprint():
    src = {"kind": "nosa", "layers": 2, "heads": 2, "seqs": 2, "steps": 40, "k": 20, "context": 3000, "seed": 1,
           "kq": 12, "window": 4}
    cache: dict = {}
    trace = load_source(src, cache)
    assert load_source(dict(src), cache) is trace  # the same source is read once
    assert fingerprint(trace) == fingerprint(load_source(src))  # seeded: regenerated identically
    cfg = E2EConfig("t", src, "infllmv2", 5, Budget(20, window=4))
    batch = replay_batch(trace, cfg)
    assert batch.sel.shape[3] == 5 and batch.header.selection.budget.same_selection(cfg.budget)
    assert batch.header.provenance["batch_plan"]["seq"] == [0, 1, 0, 1, 0]
    same = replay_batch(trace, E2EConfig("t", src, "nosa", 2, Budget(20, 12, window=4)))
    np.testing.assert_array_equal(same.sel, trace.sel)  # recorded budget, batch = seqs: the trace itself
    with pytest.raises(ValueError, match="no such file"):
        load_source("no/such.nosatrace")


def test_random_configurations_are_seeded_valid_and_split():
    pytest.importorskip("torch")
    from nosasim import memory
    from nosasim.contract import KV_DTYPES
    from runtime.config import PRESETS
    from runtime.e2e import CONFIGS, RANDOM, random_configs

    assert random_configs() == RANDOM and random_configs(seed=1) != RANDOM  # seeded: every machine draws these
    assert len(RANDOM) == 24 and len({c.name for c in CONFIGS}) == len(CONFIGS)
    assert sum(c.name.startswith("rand-t") for c in RANDOM) == sum(c.name.startswith("rand-h") for c in RANDOM) == 12
    assert {c.policy for c in RANDOM if c.budget} == {"prev", "lru", "lfu", "static"}
    assert {c.variant for c in RANDOM} == {"dense", "infllmv2", "nosa"}
    assert {int(c.name.split("-")[3][:-1]) for c in RANDOM} == {8, 32, 64, 128}
    shape = PRESETS["llama3-8b"]
    for c in RANDOM:
        block = shape.block(64, kv_dtype=None if c.kv_dtype == "bf16" else c.kv_dtype)
        tokens = int(c.name.split("-")[3][:-1]) * 1024 + 256
        fit = memory.largest_batch(0.9 * 150109880320, shape, c.variant, c.budget, c.policy, tokens, block,
                                   ckey_bytes=KV_DTYPES[c.ckey_dtype])
        assert c.batch <= fit, c.name


def test_validation_reports_each_split():
    from analysis.validate import splits

    rows = [{"name": n, "error": e} for n, e in (("a", 0.01), ("b", -0.03), ("rand-t00-x", 0.02),
                                                 ("rand-h01-x", -0.05), ("rand-h03-x", 0.01))]
    got = splits(rows)
    assert got["hand-picked"] == {"configurations": 2, "median_abs_error": 0.02, "max_abs_error": 0.03}
    assert got["random, tune"]["configurations"] == 1 and got["random, held out"]["max_abs_error"] == 0.05
    assert splits(rows[:2]).keys() == {"hand-picked"}
