"""Model presets, custom shapes and the replay configuration's validation."""

import json

import pytest

from nosasim.models import ReplayConfig, load_model, presets


def test_presets_have_documented_shapes():
    assert {"smollm2-135m", "llama3-8b", "nosa-1b"} <= set(presets())
    s = load_model("smollm2-135m")
    assert (s.layers, s.q_heads, s.kv_heads, s.head_dim, s.hidden, s.intermediate, s.vocab) == \
        (30, 9, 3, 64, 576, 1536, 49152)
    assert s.params == pytest.approx(134.5e6, rel=0.01)
    ll = load_model("llama3-8b")
    assert (ll.layers, ll.q_heads, ll.kv_heads, ll.head_dim, ll.hidden, ll.intermediate, ll.vocab) == \
        (32, 32, 8, 128, 4096, 14336, 128256)
    assert ll.params == pytest.approx(8.03e9, rel=0.01)
    assert ll.block_bytes() == 32 * 1024 and s.block_bytes() == 16 * 1024
    assert load_model("nosa-1b").source


def test_custom_shapes_from_options_and_json(tmp_path):
    m = load_model("layers=2,q_heads=4,kv_heads=2,head_dim=16,hidden=64,intermediate=128,vocab=100")
    assert m.layers == 2 and m.name == "custom"
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"layers": 3, "q_heads": 2, "kv_heads": 1, "head_dim": 8, "hidden": 16,
                                "intermediate": 32, "vocab": 50}))
    assert load_model(str(path)).name == "tiny"


@pytest.mark.parametrize("spec, match", [
    ("gpt5", "unknown preset"),
    ("layers=2,q_heads=3,kv_heads=2,head_dim=16,hidden=64,intermediate=128,vocab=100", "multiple"),
    ("layers=2,q_heads=4,head_dim=16,hidden=64,intermediate=128,vocab=100", "kv_heads"),
    ("layers=x,q_heads=4,kv_heads=2,head_dim=16,hidden=64,intermediate=128,vocab=100", "layers"),
])
def test_bad_models(spec, match):
    with pytest.raises(ValueError, match=match):
        load_model(spec)


def test_config_defaults_per_variant():
    assert ReplayConfig(variant="nosa", k=64).k_q == 33
    assert ReplayConfig(variant="infllmv2", k=64).k_q == 64
    assert ReplayConfig(variant="nosa", k=64).capacity == 63  # k counts the tail, which has its own slot
    assert ReplayConfig(variant="dense").k is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=64, k_q=65), "impossible"),
    (dict(k=64, capacity=62), "capacity"),
    (dict(variant="infllmv2", k=64, k_q=33), "k_q must equal k"),
    (dict(variant="sparse"), "variant"),
    (dict(policy="fifo"), "policy"),
    (dict(batch=2, microbatches=3), "microbatches"),
    (dict(batch=0), "batch"),
])
def test_impossible_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReplayConfig(**kwargs)
