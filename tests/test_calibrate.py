"""The calibration's phase microbenchmarks run the runtime's own code paths: run them on the CPU on a tiny shape
(untimed: the timer is replaced by one call) with the kernels interpreted, and check that the profile they build
loads in nosasim with every table the cost model reads."""

import pytest

torch = pytest.importorskip("torch")

from nosasim.contract import Budget  # noqa: E402
from nosasim.hardware import Profile  # noqa: E402
from nosasim.models import ModelSpec  # noqa: E402
from runtime import calibrate  # noqa: E402

SHAPE = ModelSpec("t", layers=2, q_heads=4, kv_heads=2, head_dim=16, hidden=32, intermediate=48, vocab=11)


@pytest.fixture
def cpu_untimed(monkeypatch):
    calls = []

    def once(fn, inner=10, reps=10):
        fn()
        calls.append(fn)
        return 1e-5 * (len(calls) % 7 + 1)

    monkeypatch.setattr(calibrate, "DEVICE", "cpu")
    monkeypatch.setattr(calibrate, "time_graph", once)
    monkeypatch.setenv("NOSASIM_KERNELS_ON_CPU", "1")
    return calls


@pytest.mark.triton
def test_phases_run_the_runtime_paths(cpu_untimed):
    sparse = calibrate.sparse_attention(SHAPE, batches=(2,), ks=(4, 8))
    walk = calibrate.sparse_attention_walk(SHAPE, batches=(2,), ks=(4, 8))
    dense = calibrate.dense_attention(SHAPE, points=((2, 300),))
    glue = calibrate.layer_glue(SHAPE, batches=(2,))
    phases = []
    for variant in ("infllmv2", "nosa"):
        budget = Budget(8, 6 if variant == "nosa" else None, window=4)
        phases += calibrate.offload_phases(SHAPE, points=((2, 700),), variant=variant, budget=budget)
    assert len(sparse) == 2 and len(dense) == 1 and len(glue) == 1 and len(phases) == 2
    for e in phases:
        assert e["selection_s"] >= e["select_s"] > 0 and e["block_table_s"] > 0 and e["attend_all_hits_s"] > 0
    tables = calibrate.phase_tables(phases, sparse, SHAPE)
    assert {"selection", "selection_nosa", "block_table", "attend_glue"} <= set(tables)
    gather = {"best": [{"direction": d, "chunk_bytes": 2048, "count": n, "seconds": 1e-5 + n * 2048 / 40e9}
                       for d in ("h2d", "d2h") for n in (16, 256)],
              "peaks": {"h2d_memcpy_1GiB_Bps": 50e9, "d2h_memcpy_1GiB_Bps": 50e9}}
    cal = {"model": "layers=2,q_heads=4,kv_heads=2,head_dim=16,hidden=32,intermediate=48,vocab=11",
           "ceilings": {"hbm_Bps": 4e12, "matmul_flops": 7e14, "vector_flops": 6e13, "launch_s": 1e-6,
                        "launch_eager_s": 5e-6},
           "gemm": [{"m": 1, "n": 8, "k": 8, "seconds": 1e-5, "op": "qkv_proj"}], "elementwise": [{"bytes": 64, "seconds": 1e-6}],
           "sparse_attention": sparse, "sparse_attention_walk": walk, "dense_attention": dense, "layer_glue": glue,
           "offload_phases": phases}
    prof = calibrate.build_profile("t-pcie5", cal, gather, total_memory=80e9)
    p = Profile.from_dict(prof)
    assert {"selection", "selection_nosa", "block_table", "attend_glue", "layer_glue", "sparse_attention",
            "sparse_attention_walk"} <= set(p.ops)
