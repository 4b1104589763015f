"""A quick seeded run of the trace fuzzer (``nosasim.trace.fuzz``): 1,000 mutated traces, each must read as a valid
trace or be refused with a TraceError, and the reader must agree with the independent oracle on which (the full run
is ``benchmarks/fuzz_traces.py``)."""

from pathlib import Path

from nosasim.trace import fuzz, read_trace

REAL = Path(__file__).resolve().parents[1] / "traces" / "samples" / "smollm2-argparse-8k.nosatrace"


def test_mutated_traces_read_or_are_refused(tmp_path):
    sources = fuzz.make_sources(str(tmp_path), str(REAL))
    for s in sources:  # the unmutated traces read
        read_trace(s)
    res = fuzz.run(sources, 1000, seed=1)
    assert res["failures"] == []
    for category, counts in res["counts"].items():
        assert set(counts) <= {"read", "unchanged", "refused"}, (category, counts)
        assert counts.get("refused", 0) > 0, category  # every category produced damage that was caught
    # Some mutations leave another valid trace (a provenance edit, a plausible header value, a shifted context
    # the selections still fit): the reader must read those, not refuse everything.
    assert sum(c.get("read", 0) for c in res["counts"].values()) > 0
    assert sum(sum(c.values()) for c in res["counts"].values()) == 1000


def test_mutated_profiles_build_or_are_refused():
    res = fuzz.run_profiles(500, seed=2)
    assert res["failures"] == []
    assert set(res["counts"]) <= {"built", "refused"} and res["counts"].get("refused", 0) > 0
