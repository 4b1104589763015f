"""Hardware profiles: bundled ones load and match the reference figures; bad profiles fail naming the field."""

import copy
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nosasim.hardware import PROFILE_DIR, Profile, bundled_profiles, load_profile


def _raw(name="h100-pcie5"):
    return json.loads((PROFILE_DIR / f"{name}.json").read_text())


def test_bundled_profiles_load():
    assert {"h100-pcie5", "a100-pcie4"} <= set(bundled_profiles())
    for name in bundled_profiles():
        p = load_profile(name)
        assert p.provenance and p.gpu_memory_bytes > p.reserved_bytes


@pytest.mark.parametrize("name", ["h100-pcie5", "h100-pcie5-reference"])
def test_h100_gather_reproduces_measured_points(name):
    # The efficiency grid is derived from the measured gather table, so the model must give those times back.
    p = load_profile(name)
    for e in _raw(name)["ops"]["gather_h2d"]:
        got = float(p.h2d.time(e["chunk_bytes"], e["count"]))
        assert got == pytest.approx(e["seconds"], rel=1e-9)


def test_h100_reference_profile_matches_the_reference_probe():
    p = load_profile("h100-pcie5-reference")
    for e in _raw("h100-pcie5-reference")["ops"]["gather_h2d"]:
        got = float(p.h2d.time(e["chunk_bytes"], e["count"]))
        assert got == pytest.approx(e["seconds"], rel=1e-9)
    # 8 KiB chunks at 4,096: 48.6 GB/s, as measured.
    assert 8192 * 4096 / float(p.h2d.time(8192, 4096)) / 1e9 == pytest.approx(48.6, abs=0.1)


def test_zero_chunks_cost_nothing_and_small_gathers_pay_latency():
    p = load_profile("h100-pcie5")
    t = p.h2d.time(16384, np.array([0, 1, 2]))
    assert t[0] == 0.0
    assert t[1] >= p.h2d.latency_s and t[2] > t[1]


@settings(max_examples=40, deadline=None)
@given(count=st.integers(1, 50_000), chunk=st.sampled_from([4096, 8192, 16384, 32768]),
       faster=st.floats(1.0, 8.0))
def test_transfer_monotone_in_count_and_bandwidth(count, chunk, faster):
    p = load_profile("h100-pcie5")
    t = float(p.h2d.time(chunk, count))
    assert float(p.h2d.time(chunk, count + 1)) > t
    assert float(p.scaled(pcie=faster).h2d.time(chunk, count)) <= t


@pytest.mark.parametrize("field", ["hbm_Bps", "h2d", "launch_s", "gpu_memory_bytes", "provenance"])
def test_missing_field_is_named(field):
    d = _raw()
    del d[field]
    with pytest.raises(ValueError, match=field):
        Profile.from_dict(d)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(hbm_Bps=-1), "hbm_Bps"),
    (lambda d: d.update(typo_field=1), "typo_field"),
    (lambda d: d.update(reserved_bytes=d["gpu_memory_bytes"] * 2), "reserved_bytes"),
    (lambda d: d["d2h"]["efficiency"].update(values=[[0.5, 1.5, 0.9], [0.5, 0.9, 0.9]]), "efficiencies"),
    (lambda d: d["d2h"]["efficiency"].update(values=[[0.5, 0.9]]), "shape"),
    (lambda d: d["d2h"]["efficiency"].update(counts=[4096, 256, 16384]), "ascending"),
    (lambda d: d["ops"]["gather_h2d"].pop(), "full grid"),
    (lambda d: d["ops"]["gemm"][0].pop("k"), r"ops.gemm\[0\]: missing k"),
    (lambda d: d["ops"].update(flash=[{"seconds": 1}]), "unknown operator"),
    (lambda d: d["h2d"].update(latency_s=1.0), "inconsistent"),
    (lambda d: d["ops"]["gather_h2d"][0].update(seconds=1e-7), "inconsistent|not above"),
    # Wrong JSON types: each once gave a TypeError traceback or was taken as a number (True as 1 s per launch).
    (lambda d: d.update(launch_s=True), "launch_s"),
    (lambda d: d.update(launch_s=None), "launch_s"),
    (lambda d: d.update(launch_s=5.0), "launch_s"),
    (lambda d: d.update(hbm_Bps=[1e12]), "hbm_Bps"),
    (lambda d: d.update(reserved_bytes="0"), "reserved_bytes"),
    (lambda d: d["h2d"].update(latency_s=None), "h2d.latency_s"),
    (lambda d: d.update(name=5), "field name"),
    (lambda d: d.update(device={"gpu": 1}), "field device"),
    (lambda d: d["d2h"]["efficiency"].update(values=[[0.5, None, 0.9], [0.5, 0.9, 0.9]]), "list of lists of numbers"),
    (lambda d: d["d2h"]["efficiency"].update(counts=4096), "counts: expected a list"),
    (lambda d: d.update(hbm_Bps=1e308), "hbm_Bps"),
    (lambda d: d["ops"]["gemm"][0].update(m=1.5), r"ops.gemm\[0\].m: expected an integer"),
    (lambda d: d["ops"]["gemm"][0].update(seconds=1e6), r"ops.gemm\[0\].seconds"),
])
def test_bad_profiles_raise_clear_errors(mutate, match):
    d = copy.deepcopy(_raw("h100-pcie5-reference"))  # the profile with an efficiency grid rather than a table
    mutate(d)
    with pytest.raises(ValueError, match=match):
        Profile.from_dict(d)


def test_unknown_profile_name_lists_bundled():
    with pytest.raises(ValueError, match="h100-pcie5"):
        load_profile("h200-nvlink")


@pytest.mark.parametrize("bad", [-0.1, "fast", True, 12.0])
def test_bad_overlap_slowdown_is_named(bad):
    d = _raw()
    d["overlap_slowdown"] = bad
    with pytest.raises(ValueError, match="overlap_slowdown"):
        Profile.from_dict(d)


def test_overlap_slowdown_defaults_to_none_and_loads():
    d = _raw()
    assert Profile.from_dict(d).overlap_slowdown == pytest.approx(d["overlap_slowdown"])
    del d["overlap_slowdown"]
    assert Profile.from_dict(d).overlap_slowdown == 0.0
