"""Tests for the independent trace oracle (nosasim.trace.oracle.violation).

Valid traces come from the project's synthesiser and writer; every invalid one is a valid file rewritten with one
member or header field changed, so each test isolates one rule of docs/trace-format.md.
"""

import io
import json
import os
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from nosasim.trace import write_trace
from nosasim.trace.oracle import violation
from nosasim.trace.synth import synthesize

SAMPLES = Path(__file__).resolve().parent.parent / "traces" / "samples"

# The small synthetic cases the fuzzer works on: one per kind (NOSA with k_q and a window, InfLLM-V2 in one
# chunk, random with two chunks).
SYNTH = {
    "nosa": (("nosa", 2, 2, 2, 30, 24, 700), dict(seed=0, kq=12, window=4, chunk_steps=16)),
    "infllmv2": (("infllmv2", 1, 2, 2, 20, 10, 3000), dict(seed=3, window=4)),
    "random": (("random", 2, 2, 2, 30, 24, 700), dict(seed=1, chunk_steps=16)),
    # Long enough that k does not cover every complete block, so the NOSA selections change between steps.
    "nosa-long": (("nosa", 2, 2, 2, 30, 24, 3000), dict(seed=2, kq=12, window=4, chunk_steps=16)),
}


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("oracle")
    out = {}
    for name, (args, kw) in SYNTH.items():
        p = d / f"{name}.nosatrace"
        write_trace(p, synthesize(*args, **kw))
        out[name] = p
    return out


# ---------------------------------------------------------------------------------------------------------------
# helpers that rewrite a valid file with one thing changed


def members(path):
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def write_members(path, ms, compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as z:
        for n, b in ms.items():
            z.writestr(n, b)
    return path


def arr(b):
    return np.lib.format.read_array(io.BytesIO(b), allow_pickle=False)


def npy(a):
    f = io.BytesIO()
    np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)
    return f.getvalue()


def edit(src, dst, header=None, **changes):
    """Copy `src` to `dst`; `header(h)` edits the parsed header in place; each keyword `name=fn` maps member
    `name.npy`'s array (or raw bytes when fn returns bytes) to a replacement, or None to drop it."""
    ms = members(src)
    if header is not None:
        h = json.loads(ms["header.json"])
        header(h)
        ms["header.json"] = json.dumps(h).encode()
    for name, fn in changes.items():
        key = name + ".npy"
        new = fn(arr(ms[key]).copy())
        if new is None:
            del ms[key]
        else:
            ms[key] = new if isinstance(new, bytes) else npy(new)
    return write_members(dst, ms)


def header_of(path):
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("header.json"))


def setter(path, value):
    """A header editor setting the dotted field `path` to `value`."""
    def f(h):
        *outer, last = path.split(".")
        for p in outer:
            h = h[p]
        h[last] = value
    return f


# ---------------------------------------------------------------------------------------------------------------
# valid traces


@pytest.mark.parametrize("name", list(SYNTH))
def test_synthetic_traces_are_valid(traces, name):
    assert violation(traces[name]) is None
    assert violation(str(traces[name])) is None


@pytest.mark.parametrize("name", ["smollm2-argparse-8k.nosatrace", "smollm2-topics-8k.nosatrace"])
def test_bundled_traces_are_valid(name):
    assert violation(SAMPLES / name) is None


def test_rewritten_copy_stays_valid(traces, tmp_path):
    # The test helpers themselves must not invalidate a file (else every "invalid" case below proves nothing).
    for name, p in traces.items():
        assert violation(edit(p, tmp_path / f"{name}.nosatrace")) is None
        assert violation(write_members(tmp_path / f"{name}-stored.nosatrace", members(p), zipfile.ZIP_STORED)) is None


def test_nan_beyond_the_tail_is_allowed(traces, tmp_path):
    # nosa: context 700 at step 0 -> tail block 10, n_blocks 12: block 11 does not exist yet at step 0.
    def f(x):
        x[0, :, :, :, 11] = np.nan
        return x
    assert violation(edit(traces["nosa"], tmp_path / "t.nosatrace", qaware_score_00000=f)) is None


def test_small_trailing_slack_is_allowed(traces, tmp_path):
    assert violation(edit(traces["nosa"], tmp_path / "t.nosatrace", context_len=lambda x: npy(x) + b"\0" * 100)) \
        is None


# ---------------------------------------------------------------------------------------------------------------
# header rules


@pytest.mark.parametrize("field,value,words", [
    ("version", 1.0, "version"),
    ("version", True, "version"),
    ("version", 2, "version"),
    ("format", "nosasim-trace2", "format"),
    ("k", 23, "selection.k"),
    ("selection.k", 23, "selection.k"),
    ("block_size", 64.0, "block_size"),
    ("block_size", 0, "block_size"),
    ("steps", True, "steps"),
    ("seqs", (1 << 20) + 1, "seqs"),
    ("chunk_steps", (1 << 20) + 1, "chunk_steps"),
    ("model.layers", 4097, "layers"),
    ("model.head_dim", 65537, "head_dim"),
    ("model.dtype_bytes", 3, "dtype_bytes"),
    ("model.q_heads", 3, "q_heads"),
    ("model.q_heads", 0, "q_heads"),
    ("model.name", 7, "name"),
    ("selection.method", "greedy", "method"),
    ("selection.method", ["nosa"], "method"),
    ("selection.sink_blocks", -1, "sink_blocks"),
    ("selection.window_blocks", 24, "exceeds"),
    ("selection.k_q", 4, "k_q"),
    ("selection.k_q", 25, "k_q"),
    ("selection.k_q", 12.0, "k_q"),
    ("arrays", ["agnostic_score", "bogus"], "arrays"),
    ("arrays", "agnostic_score", "arrays"),
    ("provenance", "synthetic", "provenance"),
    ("model", None, "model"),
])
def test_bad_header_fields(traces, tmp_path, field, value, words):
    v = violation(edit(traces["nosa"], tmp_path / "t.nosatrace", header=setter(field, value)))
    assert v is not None and words in v, v


@pytest.mark.parametrize("field", ["block_size", "model", "selection", "steps", "k", "n_blocks", "arrays",
                                   "provenance", "version", "selection.sink_blocks", "model.kv_heads"])
def test_missing_header_field(traces, tmp_path, field):
    def drop(h):
        *outer, last = field.split(".")
        for p in outer:
            h = h[p]
        del h[last]
    v = violation(edit(traces["nosa"], tmp_path / "t.nosatrace", header=drop))
    assert v is not None and "missing" in v, v


def test_optional_header_fields(traces, tmp_path):
    # q_heads absent or null, name absent, k_q null are all fine (k_q null means "all k are query-aware").
    def f(h):
        del h["model"]["q_heads"], h["model"]["name"]
        h["selection"]["k_q"] = None
    assert violation(edit(traces["nosa"], tmp_path / "t.nosatrace", header=f)) is None
    assert violation(edit(traces["nosa"], tmp_path / "u.nosatrace", header=setter("model.q_heads", 6))) is None


def test_header_not_json_or_not_object_or_too_big(traces, tmp_path):
    ms = members(traces["nosa"])
    for raw, words in ((b"{not json", "JSON"), (b"[1, 2]", "object"),
                       (ms["header.json"].replace(b'"seed": 0', b'"seed": NaN'), "JSON")):
        v = violation(write_members(tmp_path / "t.nosatrace", {**ms, "header.json": raw}))
        assert v is not None and words in v, v
    h = json.loads(ms["header.json"])
    h["provenance"]["pad"] = "x" * (1 << 20)
    v = violation(write_members(tmp_path / "t.nosatrace", {**ms, "header.json": json.dumps(h).encode()}))
    assert v is not None and "1 MiB" in v, v


def test_raised_sink_or_window_is_not_honoured(traces, tmp_path):
    # The synthetic InfLLM-V2 and long NOSA traces force 1 sink and a 4-block window; a header claiming more forced blocks than the
    # selections hold would replay them under a budget they were not made with.
    for name in ("infllmv2", "nosa-long"):
        for field, value in (("selection.sink_blocks", 3), ("selection.window_blocks", 8)):
            v = violation(edit(traces[name], tmp_path / "t.nosatrace", header=setter(field, value)))
            assert v is not None and "forces" in v, (name, field, v)


def test_huge_n_blocks_returns_fast_without_allocating(traces, tmp_path):
    p = edit(traces["nosa"], tmp_path / "t.nosatrace", header=setter("n_blocks", 10 ** 9))
    tracemalloc.start()
    t = time.perf_counter()
    v = violation(p)
    dt = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert v is not None and "n_blocks" in v
    assert dt < 10.0 and peak < 4 << 20  # a hang guard: listing or allocating 10**9 of anything takes far longer


def test_huge_row_count_is_refused_before_allocating(traces, tmp_path):
    # 4096 x 4096 heads x 2 seqs = 33.5M rows; the members are tiny, so the keyframe's shape must be checked
    # before anything [rows]-sized is allocated.
    def f(h):
        h["model"]["layers"], h["model"]["kv_heads"], h["arrays"] = 4096, 4096, []
    p = edit(traces["nosa"], tmp_path / "t.nosatrace", header=f,
             agnostic_score=lambda x: None, qaware_score_00000=lambda x: None, qaware_score_00001=lambda x: None)
    tracemalloc.start()
    v = violation(p)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert v is not None and "sel_key_00000.npy" in v and "shape" in v, v
    assert peak < 4 << 20


def test_huge_chunk_count_returns_fast(traces, tmp_path):
    # 2^31 one-step chunks would be 12.9e9 member names; the member-count guard must refuse before listing them.
    def f(h):
        h["steps"], h["chunk_steps"] = 1 << 31, 1
    p = edit(traces["nosa"], tmp_path / "t.nosatrace", header=f)
    t = time.perf_counter()
    v = violation(p)
    assert v is not None and "missing" in v and time.perf_counter() - t < 10.0  # a hang guard, as above


def test_n_blocks_off_by_one(traces, tmp_path):
    nb = header_of(traces["nosa"])["n_blocks"]
    v = violation(edit(traces["nosa"], tmp_path / "t.nosatrace", header=setter("n_blocks", nb + 1)))
    assert v is not None and "n_blocks" in v, v


# ---------------------------------------------------------------------------------------------------------------
# file and member-set rules


def test_not_a_regular_file_or_not_a_zip(traces, tmp_path):
    assert "regular file" in violation(tmp_path)
    assert "cannot be accessed" in violation(tmp_path / "nothing-here.nosatrace")
    raw = traces["nosa"].read_bytes()
    (tmp_path / "half.nosatrace").write_bytes(raw[: len(raw) // 2])
    assert "zip" in violation(tmp_path / "half.nosatrace")
    (tmp_path / "empty.nosatrace").write_bytes(b"")
    assert violation(tmp_path / "empty.nosatrace") is not None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_refused_without_opening(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    assert "regular file" in violation(tmp_path / "fifo")  # opening it would block: this must not hang


def test_extra_missing_and_duplicate_members(traces, tmp_path):
    ms = members(traces["nosa"])
    v = violation(write_members(tmp_path / "t.nosatrace", {**ms, "junk.npy": npy(np.zeros(3))}))
    assert v is not None and "junk.npy" in v and "not declared" in v
    v = violation(write_members(tmp_path / "t.nosatrace", {n: b for n, b in ms.items() if n != "sel_del_00001.npy"}))
    assert v is not None and "sel_del_00001.npy" in v and "missing" in v
    v = violation(write_members(tmp_path / "t.nosatrace", {n: b for n, b in ms.items() if n != "header.json"}))
    assert v is not None and "header.json" in v
    # An array dropped from `arrays` while its members stay is an undeclared member, not something to ignore.
    v = violation(edit(traces["nosa"], tmp_path / "t.nosatrace", header=setter("arrays", ["agnostic_score"])))
    assert v is not None and "qaware_score_00000.npy" in v
    # A declared array whose members are absent.
    v = violation(edit(traces["nosa"], tmp_path / "t.nosatrace",
                       header=setter("arrays", ["agnostic_score", "qaware_score", "attn_mass"])))
    assert v is not None and "attn_mass_00000.npy" in v and "missing" in v
    # A second entry with an existing name.
    p = write_members(tmp_path / "t.nosatrace", ms)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name, which is the point
        with zipfile.ZipFile(p, "a") as z:
            z.writestr("context_len.npy", ms["context_len.npy"])
    v = violation(p)
    assert v is not None and "more than once" in v


def test_damaged_member_is_corrupt(traces, tmp_path):
    ms = members(traces["nosa"])
    p = write_members(tmp_path / "t.nosatrace", ms, zipfile.ZIP_STORED)
    with zipfile.ZipFile(p) as z:
        info = z.getinfo("context_len.npy")
    raw = bytearray(p.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    data = info.header_offset + 30 + name_len + extra_len
    raw[data + info.compress_size - 1] ^= 0x01  # the last byte of the array data: only the CRC can notice
    p.write_bytes(bytes(raw))
    v = violation(p)
    assert v is not None and "corrupt" in v and "context_len.npy" in v, v


def test_member_inflating_beyond_its_shape(traces, tmp_path):
    v = violation(edit(traces["nosa"], tmp_path / "t.nosatrace", context_len=lambda x: npy(x) + b"\0" * 5000))
    assert v is not None and "inflates" in v, v


# ---------------------------------------------------------------------------------------------------------------
# member dtype/shape rules


@pytest.mark.parametrize("member,fn,words", [
    ("context_len", lambda x: x.astype(np.int64), "dtype"),
    ("sel_key_00000", lambda x: x.astype(np.int32), "dtype"),
    ("sel_nadd_00001", lambda x: x.astype(np.uint16), "dtype"),
    ("sel_addlo_00000", lambda x: x.astype(np.int8), "dtype"),
    ("agnostic_score", lambda x: x.astype(np.float64), "dtype"),
    ("qaware_score_00001", lambda x: x.astype(np.float32), "dtype"),
    ("context_len", lambda x: x[:-1], "shape"),
    ("sel_key_00000", lambda x: x[:, :-1], "shape"),
    ("sel_del_00000", lambda x: x.reshape(1, -1), "shape"),
    ("agnostic_score", lambda x: x[..., :-1], "shape"),
    ("sel_key_00000", lambda x: npy(x)[:-3], "decoded"),
    ("sel_key_00000", lambda x: b"not an npy file", "decoded"),
])
def test_bad_member_dtype_or_shape(traces, tmp_path, member, fn, words):
    v = violation(edit(traces["nosa"], tmp_path / "t.nosatrace", **{member: fn}))
    assert v is not None and words in v and member in v, v


def test_pickled_member_is_refused_not_unpickled(traces, tmp_path):
    f = io.BytesIO()
    np.lib.format.write_array(f, np.array([1, 2], object), allow_pickle=True)
    v = violation(edit(traces["nosa"], tmp_path / "t.nosatrace", sel_key_00001=lambda x: f.getvalue()))
    assert v is not None and "dtype" in v and "sel_key_00001" in v, v


def test_big_endian_is_not_the_table_dtype(traces, tmp_path):
    # The table says int32; '>i4' is a different dtype to numpy (the oracle compares dtypes exactly).
    v = violation(edit(traces["nosa"], tmp_path / "t.nosatrace", context_len=lambda x: x.astype(">i4")))
    assert v is not None and "dtype" in v


def test_counts_and_flat_lengths(traces, tmp_path):
    k = header_of(traces["infllmv2"])["k"]

    def big(x):
        x[0, 0] = k + 1
        return x
    v = violation(edit(traces["infllmv2"], tmp_path / "t.nosatrace", sel_nadd_00000=big))
    assert v is not None and "more than k" in v, v
    v = violation(edit(traces["infllmv2"], tmp_path / "t.nosatrace", sel_addlo_00000=lambda x: x[:-1]))
    assert v is not None and "sel_addlo_00000.npy" in v, v
    v = violation(edit(traces["infllmv2"], tmp_path / "t.nosatrace", sel_addhi_00000=lambda x: x[:-1]))
    assert v is not None and "sel_addhi_00000.npy" in v, v
    v = violation(edit(traces["infllmv2"], tmp_path / "t.nosatrace", sel_del_00000=lambda x: np.r_[x, x[:1]]))
    assert v is not None and "sel_del_00000.npy" in v, v


# ---------------------------------------------------------------------------------------------------------------
# context_len


def test_context_len_rules(traces, tmp_path):
    def bump(x):
        x[5, 0] += 1
        return x
    v = violation(edit(traces["nosa"], tmp_path / "t.nosatrace", context_len=bump))
    assert v is not None and "grow" in v, v

    def zero(x):
        x[:, 1] = x[:, 1] - x[0, 1]
        return x
    v = violation(edit(traces["nosa"], tmp_path / "t.nosatrace", context_len=zero))
    assert v is not None and "less than 1" in v, v


# ---------------------------------------------------------------------------------------------------------------
# selection decoding


def chunk0(path):
    ms = members(path)
    g = lambda n: arr(ms[n + "_00000.npy"]).astype(np.int64)  # noqa: E731
    return g("sel_key"), g("sel_nadd"), g("sel_ndel"), g("sel_del"), g("sel_addlo") | g("sel_addhi") << 8


def test_duplicate_id_in_keyframe(traces, tmp_path):
    def f(x):
        x[0, 1] = x[0, 0]
        return x
    v = violation(edit(traces["nosa"], tmp_path / "t.nosatrace", sel_key_00000=f))
    assert v is not None and "twice" in v and "sel_key_00000" in v, v


def test_keyframe_unsorted_padding_range_and_future_block(traces, tmp_path):
    key = chunk0(traces["nosa"])[0]
    cnt = int((key[0] >= 0).sum())

    def swap(x):
        x[0, [1, 2]] = x[0, [2, 1]]
        return x

    def gap(x):
        x[0, cnt - 2] = -1
        return x

    def neg(x):
        x[0, cnt] = -2
        return x

    def future(x):
        x[0, cnt] = 11  # context 700 at step 0: complete blocks 0..9, partial tail 10, n_blocks 12
        return x

    def tailblock(x):
        x[0, cnt] = 10  # the partial tail block itself is never listed
        return x
    for fn, words in ((swap, "sorted"), (gap, "padding"), (neg, "-1"), (future, "not complete"),
                      (tailblock, "not complete")):
        v = violation(edit(traces["nosa"], tmp_path / "t.nosatrace", sel_key_00000=fn))
        assert v is not None and words in v, (fn.__name__, v)


def test_removing_a_forced_block_is_caught(traces, tmp_path):
    # Drop the sink (block 0) from row 0's keyframe by shifting it out: the selection lacks a forced block.
    def f(x):
        row = x[0][x[0] >= 0]
        assert row[0] == 0
        x[0] = -1
        x[0, :row.size - 1] = row[1:]
        return x
    v = violation(edit(traces["nosa"], tmp_path / "t.nosatrace", sel_key_00000=f))
    assert v is not None and "forces" in v and "block 0" in v, v


def test_added_id_already_present(traces, tmp_path):
    key, nadd, ndel, dele, add = chunk0(traces["infllmv2"])
    r = int(np.flatnonzero(nadd[0] == 1)[0])           # a row adding exactly one block at step 1
    i = int(nadd[0, :r].sum())                          # its index in the flat add members
    removed = set(dele[int(ndel[0, :r].sum()):int(ndel[0, :r + 1].sum())].tolist())
    j = next(j for j in range(key.shape[1]) if key[r, j] >= 0 and j not in removed)
    present = int(key[r, j])

    def lo(x):
        x[i] = present & 0xFF
        return x

    def hi(x):
        x[i] = present >> 8
        return x
    v = violation(edit(traces["infllmv2"], tmp_path / "t.nosatrace", sel_addlo_00000=lo, sel_addhi_00000=hi))
    assert v is not None and "already" in v, v


def test_added_id_beyond_n_blocks(traces, tmp_path):
    def f(x):
        x[0] = 3
        return x
    v = violation(edit(traces["infllmv2"], tmp_path / "t.nosatrace", sel_addhi_00000=f))
    assert v is not None and "n_blocks" in v, v


def test_removal_positions(traces, tmp_path):
    key, nadd, ndel, dele, add = chunk0(traces["infllmv2"])
    k = key.shape[1]
    r = int(np.flatnonzero(ndel[0] >= 1)[0])
    i = int(ndel[0, :r].sum())

    def at(pos):
        def f(x):
            x[i] = pos
            return x
        return f
    assert key[r, k - 1] == -1  # the tail block counts towards k, so k - 1 listed ids leave one padding slot
    v = violation(edit(traces["infllmv2"], tmp_path / "t.nosatrace", sel_del_00000=at(k - 1)))
    assert v is not None and "padding" in v, v
    v = violation(edit(traces["infllmv2"], tmp_path / "t.nosatrace", sel_del_00000=at(k)))
    assert v is not None and "not below k" in v, v


# ---------------------------------------------------------------------------------------------------------------
# scores


@pytest.mark.parametrize("member,index,value,words", [
    ("qaware_score_00000", (0, 0, 0, 0, 0), np.inf, "infinite"),
    ("qaware_score_00001", (-1, 1, 1, 1, -1), -np.inf, "infinite"),      # inf even where NaN would be allowed
    ("qaware_score_00000", (0, 0, 0, 0, 0), np.nan, "not finite"),        # block 0 exists
    ("qaware_score_00000", (0, 0, 0, 0, 10), np.nan, "not finite"),       # the partial tail block is scored
    ("agnostic_score", (0, 0, 0, 0), np.inf, "infinite"),
    ("agnostic_score", (1, 1, 1, 3), np.nan, "not finite"),
])
def test_bad_scores(traces, tmp_path, member, index, value, words):
    def f(x):
        x[index] = value
        return x
    v = violation(edit(traces["nosa"], tmp_path / "t.nosatrace", **{member: f}))
    assert v is not None and words in v, v


def test_bad_attn_mass_on_the_bundled_trace(tmp_path):
    # The bundled traces are the only ones with attn_mass; also exercises a k = 64 trace with 90 rows.
    def f(x):
        x[3, 0, 0, 0, 2] = np.nan
        return x
    v = violation(edit(SAMPLES / "smollm2-argparse-8k.nosatrace", tmp_path / "t.nosatrace", attn_mass_00001=f))
    assert v is not None and "attn_mass_00001.npy" in v, v


# ---------------------------------------------------------------------------------------------------------------
# robustness


@pytest.mark.parametrize("name", list(SYNTH))
def test_random_byte_flips_never_raise(traces, tmp_path, name):
    raw = traces[name].read_bytes()
    rng = np.random.default_rng(hash(name) % 2 ** 32)
    p = tmp_path / "t.nosatrace"
    for _ in range(40):
        b = bytearray(raw)
        for pos in rng.integers(0, len(b), size=int(rng.integers(1, 4))):
            b[pos] = int(rng.integers(0, 256))
        p.write_bytes(bytes(b))
        v = violation(p)
        assert v is None or (isinstance(v, str) and v)


def test_random_member_value_edits_never_raise(traces, tmp_path):
    # Value-level mutations that keep the zip intact reach the decoder, where an unchecked index would raise.
    ms = members(traces["infllmv2"])
    rng = np.random.default_rng(7)
    names = [n for n in ms if n.endswith(".npy")]
    for _ in range(60):
        n = names[int(rng.integers(len(names)))]
        x = arr(ms[n]).copy()
        if x.size == 0:
            continue
        flat = x.reshape(-1)
        i = int(rng.integers(flat.size))
        if x.dtype.kind == "f":
            flat[i] = rng.choice([np.nan, np.inf, -1.0, 1e4])
        else:
            info = np.iinfo(x.dtype)
            flat[i] = int(rng.integers(info.min, int(info.max) + 1))
        v = violation(write_members(tmp_path / "t.nosatrace", {**ms, n: npy(x)}))
        assert v is None or (isinstance(v, str) and v)
