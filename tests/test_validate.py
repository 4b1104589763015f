"""The simulator held to committed GPU measurements, on any CPU.

Two runtime versions, each with the profile calibrated on it: run2 (selection and block-table update as torch op
chains) and run3 (fused Triton bookkeeping kernels, plus micro-batched steps whose transfers overlap compute).
Every later change to the simulator is re-checked here: the runtime's loaded-block counts must equal the
simulator's misses exactly, and the prediction error must stay where the calibrated profile put it.
"""

import json
from pathlib import Path

import pytest

from analysis.validate import to_markdown, validate

ROOT = Path(__file__).resolve().parents[1]
RUN = "analysis/results/e2e-h100-run2.json"
PROFILE = "analysis/results/runtime_h100-pcie5-calibrated-v2.json"


RUN3 = "analysis/results/e2e-h100-run3.json"
PROFILE3 = "analysis/results/runtime_h100-pcie5-calibrated.json"


@pytest.fixture(scope="module")
def report():
    return validate(RUN, PROFILE)


@pytest.fixture(scope="module")
def report3():
    return validate(RUN3, PROFILE3)


def test_runtime_loads_exactly_what_the_simulator_misses(report):
    offloaded = [r for r in report["rows"] if r["variant"] != "dense"]
    assert len(offloaded) >= 10
    for r in offloaded:
        assert r["measured_loaded_blocks_per_step"] == r["predicted_loaded_blocks_per_step"], r["name"]


def test_prediction_error_on_committed_measurements(report):
    # Median |error| was 0.9% when committed; the 32K synthetic configurations are the known outliers (~11-14%).
    assert report["median_abs_error"] < 0.03
    assert report["max_abs_error"] < 0.2
    assert "Median |error|" in to_markdown(report)


def test_fused_runtime_with_microbatches(report3):
    # Committed: median 2.3%, max 3.7% (before the profile carried overlap_slowdown, the four micro-batched
    # configurations were under-predicted by 7-9%: validation-h100-run3-nooverlap.md).
    offloaded = [r for r in report3["rows"] if r["variant"] != "dense"]
    assert sum(1 for r in report3["rows"] if r.get("name", "").endswith("-mb2")) == 4
    for r in offloaded:
        assert r["measured_loaded_blocks_per_step"] == r["predicted_loaded_blocks_per_step"], r["name"]
    assert report3["median_abs_error"] < 0.03
    assert report3["max_abs_error"] < 0.06
    mb = [r for r in report3["rows"] if r["name"].endswith("-mb2")]
    assert max(abs(r["error"]) for r in mb) < 0.05


def test_bad_measurement_file_is_named(tmp_path):
    bad = tmp_path / "e2e-bad.json"
    bad.write_text(json.dumps({"runs": [{"name": "x", "variant": "nosa"}]}))
    with pytest.raises(ValueError, match="missing field 'model'"):
        validate(str(bad), PROFILE)
    other = json.loads((ROOT / RUN).read_text())
    other["runs"] = other["runs"][:1]
    other["runs"][0]["trace_sel_sha256"] = "0" * 64
    tampered = tmp_path / "e2e-tampered.json"
    tampered.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="not the one the GPU decoded"):
        validate(str(tampered), PROFILE)


def _one_run(edit):
    data = json.loads((ROOT / RUN).read_text())
    data["runs"] = data["runs"][:1]
    edit(data)
    return data


# Each breaks one thing the comparison reads from a measurement file; before these checks each was a traceback or
# (a NaN or negative median, a timed window past the batch) a report with nonsense errors.
BAD_MEASUREMENTS = {
    "not an object": (lambda d: d.clear() or d.update(runs=[1]), "'runs\\[0\\]' must be an object"),
    "median NaN": (lambda d: d["runs"][0]["measured"].update(median_step_s=float("nan")), "median_step_s"),
    "median negative": (lambda d: d["runs"][0]["measured"].update(median_step_s=-1e-3), "median_step_s"),
    "median a string": (lambda d: d["runs"][0]["measured"].update(median_step_s="6 ms"), "median_step_s"),
    "median a bool": (lambda d: d["runs"][0]["measured"].update(median_step_s=True), "median_step_s"),
    "measured not an object": (lambda d: d["runs"][0].update(measured=0.0067), "'measured' must be an object"),
    "steps reversed": (lambda d: d["runs"][0].update(steps=[74, 10]), "'steps' must be"),
    "steps floats": (lambda d: d["runs"][0].update(steps=[10.0, 74.0]), "'steps' must be"),
    "steps past the batch": (lambda d: d["runs"][0].update(steps=[10, 100000]), "ends at step 100000"),
    "loaded blocks negative": (lambda d: d["runs"][0].update(loaded_blocks_per_step=[3.0, -1]),
                               r"loaded_blocks_per_step\[1\]"),
    "loaded blocks not a list": (lambda d: d["runs"][0].update(loaded_blocks_per_step=7),
                                 "'loaded_blocks_per_step' must be a list"),
    "sha not a string": (lambda d: d["runs"][0].update(trace_sel_sha256=5), "'trace_sel_sha256'"),
    "synth with unknown argument": (lambda d: d["runs"][0].update(trace=None, synth={"kind": "nosa", "bogus": 1}),
                                    "field 'synth'"),
}


@pytest.mark.parametrize("name", list(BAD_MEASUREMENTS))
def test_bad_measurement_values_are_named(tmp_path, name):
    edit, message = BAD_MEASUREMENTS[name]
    path = tmp_path / "e2e-bad.json"
    path.write_text(json.dumps(_one_run(edit)))
    with pytest.raises(ValueError, match=message):
        validate(str(path), PROFILE)


def test_unreadable_measurement_files_are_one_line_errors(tmp_path, capsys):
    from analysis.validate import main

    (tmp_path / "e2e-broken.json").write_text('{"runs": [')
    (tmp_path / "e2e-list.json").write_text("[]")
    for name, message in (("e2e-missing.json", "cannot read"), ("e2e-broken.json", "not valid JSON"),
                          ("e2e-list.json", "must be a JSON object")):
        assert main([str(tmp_path / name), "--profile", PROFILE, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_validate_report_into_a_file_is_a_one_line_error(tmp_path, capsys):
    """An output folder that cannot be made gives one line, exit 1, and no report beside it."""
    from analysis.validate import main

    good = tmp_path / "e2e-one.json"
    good.write_text(json.dumps(_one_run(lambda d: None)))
    (tmp_path / "afile").write_text("x")
    assert main([str(good), "--profile", PROFILE, "--out", str(tmp_path / "afile" / "out")]) == 1
    err = capsys.readouterr().err
    assert "cannot write" in err and err.count("\n") == 1


# The H200 (this repository's fourth runtime: fused per-token, table-plan, one-launch gather and attention kernels).
# run1: with the fused one-launch selection kernel; run2: with the three-launch selection, the default since (the
# fused kernel measured 2.5x slower at 64K-128K). Each against the profile calibrated on that runtime.
RUN_H200_1, PROFILE_H200_1 = "analysis/results/e2e-h200-run1.json", "analysis/results/runtime_h200-pcie5-calibrated-fused.json"
RUN_H200_2, PROFILE_H200_2 = "analysis/results/e2e-h200-run2.json", "analysis/results/runtime_h200-pcie5-calibrated.json"
# Run 3's profile (the bundled one until the selection kernels changed after run 4; analysis/h200_profile.py).
RUN_H200_3, PROFILE_H200_3 = "analysis/results/e2e-h200-run3.json", "analysis/results/runtime_h200-pcie5-calibrated-run3.json"


@pytest.fixture(scope="module")
def report_h200_1():
    return validate(RUN_H200_1, PROFILE_H200_1)


def test_h200_fused_runtime(report_h200_1):
    rows = report_h200_1["rows"]
    assert len(rows) >= 40
    for r in rows:
        if r["variant"] != "dense":
            assert r["measured_loaded_blocks_per_step"] == r["predicted_loaded_blocks_per_step"], r["name"]
    assert report_h200_1["median_abs_error"] < 0.025  # committed: 1.9%
    # Known, documented outliers (validation-h200-run1.md): attention split around the copies (its misses pass
    # costs more than the walk model gives) and the fused selection beside a gather at 64K-128K; every other
    # configuration, 8K to 128K, dense and offloaded, every policy, within 6%.
    outliers = [r for r in rows if r["name"].endswith("-split") or (r["name"].endswith("-mb2") and
                                                                  int(r["name"].split("k-")[0].split("-")[-1]) >= 64)]
    rest = [r for r in rows if r not in outliers]
    assert len(rest) >= 30 and max(abs(r["error"]) for r in rest) < 0.08


def test_h200_run2():
    report = validate(RUN_H200_2, PROFILE_H200_2)
    for r in report["rows"]:
        assert r["measured_loaded_blocks_per_step"] == r["predicted_loaded_blocks_per_step"], r["name"]
    assert report["max_abs_error"] < 0.09  # committed: max 8.9% over the 4 runs measured


def test_h200_run3():
    """Run 3 against the profile calibrated on its runtime (the selection kernels changed after run 4)."""
    report = validate(RUN_H200_3, PROFILE_H200_3)
    rows = report["rows"]
    assert len(rows) >= 45
    for r in rows:
        if r["variant"] != "dense":
            assert r["measured_loaded_blocks_per_step"] == r["predicted_loaded_blocks_per_step"], r["name"]
    assert report["median_abs_error"] < 0.02  # committed: 1.6%
    # Known, documented outliers (validation-h200-run3.md, docs/runtime.md): attention split around the copies,
    # fp8 blocks with two micro-batches (under-predicted by 5-12%), and 64K batch 16 with C = 128 (-9.0%): the
    # in-step selection runs ~10% slower than the same kernels alone at 64K-128K (diag_fp8_gap-h200.json), which
    # the denser selection tables of runtime_calibration-h200-fill.json no longer interpolate away. Every other
    # configuration within 7%.
    outliers = [r for r in rows if r["name"].endswith("-split") or "-fp8-" in r["name"]
                or r["name"] == "floor-nosa-64k-b16-k64-lru128"]
    rest = [r for r in rows if r not in outliers]
    assert len(rest) >= 36 and max(abs(r["error"]) for r in rest) < 0.07
    assert all(-0.125 < r["error"] < 0 for r in outliers if "-fp8-" in r["name"] or "64k-b16" in r["name"])


RUN_H200_4 = "analysis/results/e2e-h200-run4.json"  # fp8 compressed keys, beside their baselines, one call


def test_h200_fp8_compressed_keys():
    """Run 4 (the runtime of run 3 with fp8 compressed keys) against run 3's profile, whose fp8-key selection
    tables come from their own calibration call: loaded blocks exact; dense and 64K within 6%; fp8 blocks with
    two micro-batches at 128K under-predicted by 7-11%, the known gap of validation-h200-run3.md, grown with the
    batch (documented in docs/runtime.md)."""
    report = validate(RUN_H200_4, PROFILE_H200_3)
    rows = {r["name"]: r for r in report["rows"]}
    assert len(rows) == 8 and sum("-ck8-" in n for n in rows) == 4
    for r in rows.values():
        if r["variant"] != "dense":
            assert r["measured_loaded_blocks_per_step"] == r["predicted_loaded_blocks_per_step"], r["name"]
    assert all(abs(r["error"]) < 0.06 for n, r in rows.items() if "128k" not in n or r["variant"] == "dense")
    long = [r for n, r in rows.items() if "128k" in n and r["variant"] != "dense"]
    assert len(long) == 3 and all(-0.11 < r["error"] < 0 for r in long)  # committed: -7.2 to -10.5%


RUN_H200_5 = "analysis/results/e2e-h200-run5.json"  # the runtime after the selection kernels changed, one call
RUN_H200_6 = "analysis/results/e2e-h200-run6.json"  # the 21 random configurations runs 3-5 left, same runtime, two calls


def test_h200_run5_current_runtime():
    """Run 5, the current runtime (scoring's pool pass split over programs, the top-k at radix 1), against the
    bundled H200 profile, whose selection tables were re-measured in the same call: loaded blocks exact, the bf16
    configurations and the random ones within 5%; the known gap of fp8 blocks and keys with two micro-batches
    (under-predicted, now 5.3-9.1%) and of 64K batch 16 with C = 128 (-7.1%) stays where it was measured."""
    report = validate(RUN_H200_5, "h200-pcie5")
    rows = {r["name"]: r for r in report["rows"]}
    assert len(rows) == 16 and sum(n.startswith("rand-") for n in rows) == 3
    for r in rows.values():
        if r["variant"] != "dense":
            assert r["measured_loaded_blocks_per_step"] == r["predicted_loaded_blocks_per_step"], r["name"]
    assert report["median_abs_error"] < 0.02  # committed: 1.2%
    gap = [n for n in rows if "-ck8-mb2" in n or n == "floor-nosa-64k-b16-k64-lru128"]
    assert all(abs(r["error"]) < 0.05 for n, r in rows.items() if n not in gap)  # committed: max 4.5%
    assert all(-0.1 < rows[n]["error"] < 0.01 for n in gap)  # committed: -9.1% to +0.7%


def test_h200_run6_random_configurations():
    """Run 6, the 21 random configurations runs 3-5 left unmeasured, on the same runtime and bundled profile:
    loaded blocks exact in every offloaded one; dense and InfLLM-V2 within 4%; NOSA's known gap (under-predicted
    where a micro-batch holds few sequences or the pool is fp8, down to -15.8%) stays where it was measured, so a
    change of the model that moves it shows here."""
    report = validate(RUN_H200_6, "h200-pcie5")
    rows = {r["name"]: r for r in report["rows"]}
    assert len(rows) == 21 and all(n.startswith("rand-") for n in rows)
    for r in rows.values():
        if r["variant"] != "dense":
            assert r["measured_loaded_blocks_per_step"] == r["predicted_loaded_blocks_per_step"], r["name"]
    assert report["median_abs_error"] < 0.03  # committed: 2.2%
    assert all(abs(r["error"]) < 0.04 for r in rows.values() if r["variant"] != "nosa")  # committed: max 3.5%
    nosa = [r["error"] for r in rows.values() if r["variant"] == "nosa"]
    assert all(-0.17 < e < 0.08 for e in nosa) and min(nosa) < -0.1  # committed: -15.8% to +7.1%
    held = report["splits"]["random, held out"]
    assert held["configurations"] == 10 and held["max_abs_error"] < 0.08  # committed: 7.1%
