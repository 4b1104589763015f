"""The contract shared by the simulator and the runtime: one budget validation, one capacity rule, one block size,
one schedule, and every configuration type holding the same Budget (so they accept and refuse the same budgets)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nosasim import contract
from nosasim.contract import BlockShape, Budget, default_capacity, microbatch_groups, min_capacity, program
from nosasim.models import ReplayConfig, load_model
from nosasim.trace import SelectionParams


def test_budget_defaults_and_derived_fields():
    b = Budget(64, 33)
    assert (b.k, b.k_q, b.sink, b.window, b.capacity, b.k_e, b.agnostic) == (64, 33, 1, 16, 63, 31, True)
    inf = Budget(64)
    assert inf.k_q == 64 and not inf.agnostic and inf.k_e == 0
    assert Budget.for_variant("nosa", 64).k_q == 33 and Budget.for_variant("nosa", 64, sink=2, window=8).k_q == 26
    assert Budget.for_variant("infllmv2", 48).k_q == 48
    assert Budget(64, 33).same_selection(Budget(64, 33, capacity=96))
    assert not Budget(64, 33).same_selection(Budget(64, 33, window=8))


@pytest.mark.parametrize("kwargs, field", [
    (dict(k=0), "k"), (dict(k=True), "k"), (dict(k=5), "k"), (dict(k=64, k_q=65), "k_q"),
    (dict(k=64, k_q=16), "k_q"), (dict(k=64, sink=-1), "sink"), (dict(k=64, window=2.0), "window"),
    (dict(k=64, capacity=62), "capacity"), (dict(k=64, capacity=-1), "capacity"),
])
def test_budget_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as info:
        Budget(**kwargs)
    assert str(info.value).split(" ", 1)[0].rstrip(":") == field


def test_capacity_rule():
    assert [min_capacity(k) for k in (1, 2, 17, 64)] == [1, 1, 16, 63]
    assert default_capacity(64) == 63 and default_capacity(64, "reselect") == 63
    # An imported trace's selections may fill all k ids of the format; every generator's hold at most k - 1.
    assert default_capacity(64, "import") == 64
    assert all(default_capacity(12, m) == 11 for m in contract.RULE_METHODS)
    assert Budget(64, capacity=63).capacity == 63


def test_block_shape_is_the_one_size():
    b = BlockShape(128)
    assert (b.block_bytes, b.chunk_bytes, b.chunks_per_block) == (32768, 32768, 1)
    s = BlockShape(64, layout="split")
    assert (s.block_bytes, s.chunk_bytes, s.chunks_per_block) == (16384, 8192, 2)
    assert BlockShape(128, dtype_bytes=1).block_bytes == 16384
    m = load_model("llama3-8b")
    assert m.block() == b and m.block_bytes() == b.block_bytes
    assert m.block(kv_dtype="fp8").block_bytes == 16384
    with pytest.raises(ValueError, match="kv_layout"):
        BlockShape(128, layout="interleaved")


def test_schedule():
    groups = microbatch_groups(10, 3)
    assert [(g.start, g.stop) for g in groups] == [(0, 4), (4, 7), (7, 10)]
    assert program(2, 1) == [("pre", 0, 0), ("post", 0, 0), ("pre", 1, 0), ("post", 1, 0)]
    order = program(3, 2)
    assert order[:2] == [("pre", 0, 0), ("pre", 0, 1)] and order[-2:] == [("post", 2, 0), ("post", 2, 1)]
    assert sorted(order) == sorted({(k, layer, j) for k in ("pre", "post") for layer in range(3) for j in range(2)})
    with pytest.raises(ValueError, match="microbatches"):
        microbatch_groups(2, 3)


def _accepts(make) -> bool:
    try:
        make()
    except ValueError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(k=st.integers(0, 80), k_q=st.one_of(st.none(), st.integers(0, 90)), sink=st.integers(0, 3),
       window=st.integers(0, 20), capacity=st.one_of(st.none(), st.integers(0, 100)))
def test_every_configuration_accepts_the_same_budgets(k, k_q, sink, window, capacity):
    """The simulator's ReplayConfig, the runtime's RuntimeConfig, the recorder's RecordConfig and the trace header
    hold one Budget: none of them accepts a budget another refuses (the sweep bug: k_q = 5 accepted by one and
    refused later by another)."""
    pytest.importorskip("torch")
    from runtime.config import PRESETS, RuntimeConfig
    from traces.record import RecordConfig

    ref = _accepts(lambda: Budget(k, k_q, sink, window, capacity))
    sim = _accepts(lambda: ReplayConfig(variant="nosa", k=k, k_q=k_q, sink=sink, window=window, capacity=capacity))
    rt = _accepts(lambda: RuntimeConfig(PRESETS["tiny"], "nosa", budget=Budget(k, k_q, sink, window, capacity)))
    rec = _accepts(lambda: RecordConfig(budget=Budget(k, k_q, sink, window, capacity)))
    hdr = _accepts(lambda: SelectionParams.from_dict(
        {"method": "nosa", "k": k, "k_q": k_q, "sink_blocks": sink, "window_blocks": window}))
    assert sim == rt == rec == ref
    assert hdr == _accepts(lambda: Budget(k, k_q, sink, window))  # a header has no capacity
    if ref:
        b = Budget.for_variant("nosa", k, k_q, sink, window, capacity)  # NOSA's default split when k_q is None
        assert ReplayConfig(variant="nosa", k=k, k_q=k_q, sink=sink, window=window, capacity=capacity).budget == b
        assert RuntimeConfig(PRESETS["tiny"], "nosa", budget=b).slots == b.capacity


def test_infllmv2_rule_is_shared():
    pytest.importorskip("torch")
    from runtime.config import PRESETS, RuntimeConfig

    with pytest.raises(ValueError, match="k_q must equal k"):
        ReplayConfig(variant="infllmv2", k=64, k_q=33)
    with pytest.raises(ValueError, match="k_q must equal k"):
        RuntimeConfig(PRESETS["tiny"], "infllmv2", budget=Budget(64, 33))


def test_policy_codes_are_shared():
    pytest.importorskip("torch")
    from nosasim.cache.policies import POLICY_CODES
    from runtime.table_kernel import POLICY_CODES as KERNEL_CODES

    assert POLICY_CODES == contract.POLICY_CODES
    assert KERNEL_CODES == {p: contract.POLICY_CODES[p] for p in contract.ONLINE_POLICIES}
