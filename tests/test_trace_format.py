"""Trace format v1: lossless round trip, streaming by step range, and every corruption rejected clearly."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nosasim.cli import main
from nosasim.trace import ModelShape, SelectionParams, Trace, TraceError, TraceReader, read_trace, write_trace
from nosasim.trace.synth import synthesize


def small_trace(seed=0, steps=40, seqs=2):
    return synthesize("nosa", 2, 2, seqs, steps, 24, 700, kq=12, seed=seed, window=4, chunk_steps=16)


def rewrite(src, dst, change):
    """Copy a trace zip, letting ``change(name, bytes) -> bytes | None`` edit or drop members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)


def npy_bytes(arr):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr)
    return buf.getvalue()


def header_edit(fn):
    def change(name, data):
        if name == "header.json":
            d = json.loads(data)
            fn(d)
            return json.dumps(d).encode()
        return data
    return change


@st.composite
def random_traces(draw):
    steps = draw(st.integers(1, 30))
    layers, heads, seqs = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    k = draw(st.integers(1, 9))
    block = draw(st.sampled_from([4, 8]))
    prompt = np.array(draw(st.lists(st.integers(0, 60), min_size=seqs, max_size=seqs)))
    ctx = prompt[None, :] + 1 + np.arange(steps)[:, None]
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    sel = np.full((steps, layers, heads, seqs, k), -1)
    for t in range(steps):
        for b in range(seqs):
            n_complete = (ctx[t, b] - 1) // block
            for l in range(layers):
                for h in range(heads):
                    m = rng.integers(0, min(k, n_complete) + 1)
                    sel[t, l, h, b, :m] = rng.choice(n_complete, size=m, replace=False)
    chunk = draw(st.integers(1, 8))
    return Trace.from_arrays(sel, ctx, block_size=block, model=ModelShape(layers, heads, 16), k=k, chunk_steps=chunk,
                             agnostic_score=rng.random((layers, heads, seqs, (ctx.max() - 1) // block + 1)))


@settings(max_examples=40, deadline=None)
@given(random_traces())
def test_round_trip_is_lossless(tmp_path_factory, trace):
    path = tmp_path_factory.mktemp("rt") / "t.nosatrace"
    write_trace(path, trace)
    back = read_trace(path)
    assert np.array_equal(back.sel, trace.sel)
    assert np.array_equal(back.context_len, trace.context_len)
    assert np.array_equal(back.agnostic_score, trace.agnostic_score)
    assert back.header == trace.header


def test_score_arrays_round_trip_and_step_ranges(tmp_path):
    tr = small_trace()
    path = tmp_path / "t.nosatrace"
    write_trace(path, tr)
    back = read_trace(path)
    assert np.array_equal(back.qaware_score, tr.qaware_score, equal_nan=True)
    part = read_trace(path, 13, 35)  # crosses chunk boundaries at 16 and 32
    assert part.step0 == 13 and np.array_equal(part.sel, tr.sel[13:35])
    assert np.array_equal(part.qaware_score, tr.qaware_score[13:35], equal_nan=True)
    with TraceReader(path) as reader:
        chunks = list(reader.iter_chunks(steps=7))
    assert [c.step0 for c in chunks] == list(range(0, 40, 7))
    assert np.array_equal(np.concatenate([c.sel for c in chunks]), tr.sel)


def test_tail_ids_are_dropped_and_rows_sorted():
    ctx = np.array([[130], [131]])  # tail block 2 at both steps
    sel = np.array([[5, 2, 0, -1], [-1, 1, 2, 0]]).reshape(2, 1, 1, 1, 4)
    # 5 is a future block: rejected, not repaired.
    with pytest.raises(ValueError, match="beyond the last complete block"):
        Trace.from_arrays(sel, ctx, k=4, model=ModelShape(1, 1, 64))
    ok = np.array([[2, 0, -1, -1], [-1, 1, 2, 0]]).reshape(2, 1, 1, 1, 4)
    tr = Trace.from_arrays(ok, ctx, k=4, model=ModelShape(1, 1, 64))
    assert tr.sel[:, 0, 0, 0].tolist() == [[0, -1, -1, -1], [0, 1, -1, -1]]


@pytest.mark.parametrize(
    "sel, ctx, message",
    [
        (np.array([[1, 1]]), np.array([[200]]), "duplicate block id 1"),
        (np.array([[0, 1, 2]]), np.array([[300]]), "more than k=2"),
        (np.array([[0], [0]]), np.array([[200], [202]]), "increase by exactly one"),
        (np.array([[0.5]]), np.array([[200]]), "integer array"),
    ],
)
def test_bad_arrays_raise(sel, ctx, message):
    steps, k = sel.shape
    with pytest.raises(ValueError, match=message):
        Trace.from_arrays(sel.reshape(steps, 1, 1, 1, k), ctx, k=2, model=ModelShape(1, 1, 64))


def with_duplicate(npy):
    key = np.lib.format.read_array(io.BytesIO(npy)).copy()
    key[0, 1] = key[0, 0]
    return key


CORRUPTIONS = {
    "missing version": (header_edit(lambda d: d.pop("version")), "missing field 'version'"),
    "wrong version": (header_edit(lambda d: d.update(version=7)), "'version' is 7"),
    "missing header field": (header_edit(lambda d: d["model"].pop("head_dim")), "missing field 'model.head_dim'"),
    "missing header": (lambda n, d: None if n == "header.json" else d, "missing field 'header'"),
    "missing chunk": (lambda n, d: None if n == "sel_key_00001.npy" else d, "missing field 'sel_key_00001'"),
    "wrong dtype": (lambda n, d: npy_bytes(np.zeros((40, 2), np.float32)) if n == "context_len.npy" else d,
                    "dtype float32"),
    "wrong shape": (lambda n, d: npy_bytes(np.zeros((3, 3), np.int16)) if n == "sel_key_00000.npy" else d,
                    "has shape"),
    "context not +1": (lambda n, d: npy_bytes((np.repeat(np.arange(700, 740)[:, None], 2, 1) * 2).astype(np.int32))
                       if n == "context_len.npy" else d, "increase by exactly one"),
    "context as int64": (lambda n, d: npy_bytes(np.load(io.BytesIO(d)).astype(np.int64)) if n == "context_len.npy"
                         else d, "dtype int64, expected int32"),
    "duplicate in keyframe": (lambda n, d: npy_bytes(with_duplicate(d)) if n == "sel_key_00000.npy" else d,
                              "duplicate"),
}


def test_future_block_in_file_is_rejected(tmp_path):
    tr = small_trace(steps=16)
    write_trace(tmp_path / "good.nosatrace", tr)
    key = tr.rows()[0].copy()
    key[0, -1] = tr.n_blocks - 1  # the tail block of the *last* step: in the future at step 0
    key[0] = np.sort(np.where(key[0] < 0, 10**4, key[0]))
    key[0][key[0] == 10**4] = -1
    rewrite(tmp_path / "good.nosatrace", tmp_path / "bad.nosatrace",
            lambda n, d: npy_bytes(key) if n == "sel_key_00000.npy" else d)
    with pytest.raises(ValueError, match="beyond the last complete block"):
        read_trace(tmp_path / "bad.nosatrace")


def test_truncated_and_garbage_files(tmp_path):
    src = tmp_path / "good.nosatrace"
    write_trace(src, small_trace())
    data = src.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30):
        (tmp_path / "cut.nosatrace").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            read_trace(tmp_path / "cut.nosatrace")
    flipped = bytearray(data)
    mid = len(data) // 3
    flipped[mid : mid + 64] = bytes(64)
    (tmp_path / "flip.nosatrace").write_bytes(bytes(flipped))
    with pytest.raises(ValueError):
        read_trace(tmp_path / "flip.nosatrace")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import nosasim.trace.io as trace_io

    def boom(*args):
        raise ValueError("simulated failure in the middle of a write")

    monkeypatch.setattr(trace_io, "encode_chunk", boom)
    with pytest.raises(ValueError, match="simulated"):
        write_trace(tmp_path / "out.nosatrace", small_trace())
    assert os.listdir(tmp_path) == []


def test_import_cli_rejects_bad_input_without_output(tmp_path, capsys):
    sel = np.array([[[[0, 1, 1]]]])  # duplicate id, shape [steps, layers, heads, k]
    np.savez(tmp_path / "bad.npz", sel=sel, context_len=np.array([300]))
    out = tmp_path / "out.nosatrace"
    assert main(["trace", "import", str(tmp_path / "bad.npz"), "-o", str(out)]) == 2
    assert "duplicate block id 1" in capsys.readouterr().err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["bad.npz"]
    np.savez(tmp_path / "nosel.npz", context_len=np.array([300]))
    assert main(["trace", "import", str(tmp_path / "nosel.npz"), "-o", str(out)]) == 2
    assert "missing array 'sel'" in capsys.readouterr().err
    np.save(tmp_path / "plain.npy", sel)  # a lone array, not an archive (np.load once returned it bare)
    assert main(["trace", "import", str(tmp_path / "plain.npy"), "-o", str(out)]) == 2
    assert "is a single .npy array" in capsys.readouterr().err and not out.exists()


def test_import_cli_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    steps, k = 20, 6
    ctx = np.arange(500, 500 + steps)
    sel = np.stack([[[np.sort(rng.choice((c - 1) // 64, size=k, replace=False))] for _ in range(2)] for c in ctx])
    np.savez(tmp_path / "in.npz", sel=sel, context_len=ctx)
    out = tmp_path / "t.nosatrace"
    assert main(["trace", "import", str(tmp_path / "in.npz"), "-o", str(out), "--head-dim", "64"]) == 0
    tr = read_trace(out)
    assert tr.sel.shape == (steps, 2, 1, 1, k)
    assert np.array_equal(tr.sel[:, :, 0, 0, :], sel[:, :, 0, :])
    assert tr.header.model.head_dim == 64 and tr.header.provenance["source"] == "import"


def test_compression_beats_raw_int16_tenfold_on_realistic_traces(tmp_path):
    # Realistic: InfLLM-V2 churn at the published 0.889 overlap and NOSA, 8K context, k=64.
    for kind in ("infllmv2", "nosa"):
        tr = synthesize(kind, 30, 3, 1, 256, 64, 8192, seed=5)
        tr.qaware_score, tr.agnostic_score = None, None
        tr.header = tr.header.replace(arrays=())
        size = write_trace(tmp_path / f"{kind}.nosatrace", tr)
        assert tr.raw_nbytes() / size >= 10, (kind, tr.raw_nbytes() / size)


def test_header_validation_names_fields():
    with pytest.raises(ValueError, match="selection.k_q"):
        SelectionParams.from_dict({"method": "nosa", "k": 10, "k_q": 11, "sink_blocks": 1, "window_blocks": 2})
    with pytest.raises(ValueError, match="model.q_heads"):
        ModelShape(layers=2, kv_heads=3, head_dim=64, q_heads=8)


def test_documented_numpy_decoder_reads_our_files(tmp_path):
    """docs/trace-format.md promises a numpy-only decoder: run the one printed there."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parents[1] / "docs" / "trace-format.md").read_text()
    code = re.search(r"## Decoding with numpy alone\s+```python\n(.*?)```", doc, re.S).group(1)
    scope = {}
    exec(code, scope)
    tr = synthesize("infllmv2", 2, 2, 3, 50, 16, 900, seed=9, window=4, chunk_steps=16)
    write_trace(tmp_path / "t.nosatrace", tr)
    header, sel, ctx = scope["load_trace"](str(tmp_path / "t.nosatrace"))
    assert header["version"] == 1
    assert np.array_equal(sel, tr.sel) and np.array_equal(ctx, tr.context_len)


def _scores_edit(member_name, fn):
    def change(name, data):
        if name == member_name:
            arr = np.lib.format.read_array(io.BytesIO(data)).copy()
            fn(arr)
            return npy_bytes(arr)
        return data
    return change


def _deep_header(name, data):
    """The header with its provenance nested 100,000 objects deep (json.dumps itself cannot write that)."""
    if name != "header.json":
        return data
    d = json.loads(data)
    d["provenance"] = "@"
    return json.dumps(d).replace('"@"', '{"x": ' * 100_000 + "{}" + "}" * 100_000).encode()


# Each breaks one invariant docs/trace-format.md lists; before the reader enforced it, each was accepted (with
# changed results) or raised something other than ValueError.
INVARIANTS = {
    "version 1.0": (header_edit(lambda d: d.update(version=1.0)), "'version'"),
    "version True": (header_edit(lambda d: d.update(version=True)), "'version'"),
    "model name not a string": (header_edit(lambda d: d["model"].update(name=1.5)), "'model.name' must be a string"),
    "k against selection.k": (header_edit(lambda d: d.update(k=d["k"] + 3)), "must equal field 'selection.k'"),
    "huge block_size": (header_edit(lambda d: d.update(block_size=2 ** 63)), "'block_size' must be <="),
    "huge n_blocks": (header_edit(lambda d: d.update(n_blocks=10 ** 9)), "'n_blocks' must be <="),
    "huge head_dim": (header_edit(lambda d: d["model"].update(head_dim=2 ** 31)), "'model.head_dim' must be <="),
    "odd dtype_bytes": (header_edit(lambda d: d["model"].update(dtype_bytes=2 ** 31)), "'model.dtype_bytes'"),
    "header nested deep": (_deep_header, "not valid JSON"),
    "NaN in the header": (header_edit(lambda d: d["provenance"].update(x=float("nan"))), "NaN is not a JSON value"),
    "n_blocks against context": (header_edit(lambda d: d.update(n_blocks=d["n_blocks"] + 1)), "spans"),
    "uint64 member": (lambda n, d: npy_bytes(np.load(io.BytesIO(d)).astype(np.uint64)) if n == "sel_addlo_00000.npy"
                      else d, "dtype uint64, expected uint8"),
    "signed positions": (lambda n, d: npy_bytes(-np.load(io.BytesIO(d)).astype(np.int8) - 1)
                         if n == "sel_del_00000.npy" else d, "dtype int8"),
    "member inflated": (lambda n, d: npy_bytes(np.zeros(1 << 20, np.int32)) if n == "context_len.npy" else d,
                        "inflates to"),
    "infinite score": (_scores_edit("qaware_score_00000.npy", lambda a: a.__setitem__((0, 0, 0, 0, 0), np.inf)),
                       "found infinity"),
    "NaN score of an existing block": (_scores_edit("qaware_score_00000.npy",
                                                    lambda a: a.__setitem__((0, 0, 0, 0, 0), np.nan)), "NaN score"),
    "NaN agnostic score": (_scores_edit("agnostic_score.npy", lambda a: a.__setitem__((0, 0, 0, 0), np.nan)),
                           "NaN score"),
}

CORRUPTIONS.update(INVARIANTS)  # read by test_corrupt_files_raise_named_errors, defined after both tables


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_files_raise_named_errors(tmp_path, name):
    src = tmp_path / "good.nosatrace"
    write_trace(src, small_trace())
    read_trace(src)  # the unmutated trace reads
    bad = tmp_path / "bad.nosatrace"
    change, message = CORRUPTIONS[name]
    rewrite(src, bad, change)
    with pytest.raises(TraceError, match=message):  # the one error class of a bad trace
        read_trace(bad)


def test_damaged_zip_directory_is_a_value_error(tmp_path):
    """An unknown compression method in the central directory (zipfile's NotImplementedError) is reported as a
    corrupt trace."""
    path = tmp_path / "t.nosatrace"
    write_trace(path, small_trace())
    raw = bytearray(path.read_bytes())
    at = raw.index(b"PK\x01\x02")  # first central-directory entry; bytes 10-11 are its compression method
    raw[at + 10: at + 12] = (99).to_bytes(2, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt"):
        read_trace(path)


def test_a_member_stored_twice_is_refused(tmp_path):
    import warnings

    src, bad = tmp_path / "good.nosatrace", tmp_path / "bad.nosatrace"
    write_trace(src, small_trace())
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name: the point here
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        zout.writestr("context_len.npy", zin.read("context_len.npy"))
    with pytest.raises(TraceError, match="stored more than once"):
        read_trace(bad)


def test_folders_and_fifos_are_not_traces(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        read_trace(tmp_path)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):  # refused without opening it (no block)
        read_trace(fifo)


def test_writer_refuses_what_the_reader_would():
    """Ids are int16 in the keyframes: a context past 32,767 blocks is refused when the trace is built, not written
    and then refused on reading (a 2M-token context once wrapped to duplicate ids)."""
    with pytest.raises(ValueError, match="'n_blocks' must be <= 32767"):
        synthesize("random", 1, 1, 1, 2, 4, 2097100, seed=0)
    sel = np.zeros((2, 1, 1, 1, 1), np.int64)
    with pytest.raises(ValueError, match="must equal the selection's k"):
        Trace.from_arrays(sel, np.array([[200], [201]]), model=ModelShape(1, 1, 64),
                          selection=SelectionParams("import", __import__("nosasim").contract.Budget(1, None, 0, 0)),
                          k=2)


@pytest.mark.parametrize("field,value", [("sink_blocks", 3), ("window_blocks", 7)])
def test_header_budget_must_match_the_selections(tmp_path, field, value):
    """The budget forces blocks into every selection; a header whose budget the selections do not honour would be
    replayed as if they had been made with it."""
    src, bad = tmp_path / "good.nosatrace", tmp_path / "bad.nosatrace"
    write_trace(src, synthesize("infllmv2", 1, 2, 2, 20, 10, 3000, seed=3, window=4))
    read_trace(src)
    rewrite(src, bad, header_edit(lambda d: d["selection"].update({field: value})))
    with pytest.raises(ValueError, match=f"lacks a block its budget forces .*selection.{field}={value}"):
        read_trace(bad)


def test_forced_blocks_are_checked_where_they_exist():
    """Sink and window force only complete blocks: a selection with fewer complete blocks than the budget forces
    holds them all and reads; one that drops a forced block is refused by the writer as by the reader."""
    from nosasim.contract import Budget

    params = SelectionParams("infllmv2", Budget(6, None, 2, 3))  # forced: blocks 0, 1 and the last 2 complete
    ctx = np.array([[9, 10, 17, 33]])  # one step of four sequences, block 4: 2, 2, 4 and 8 complete blocks
    sel = np.full((1, 1, 1, 4, 6), -1)
    sel[0, 0, 0, 0, :2] = [0, 1]
    sel[0, 0, 0, 1, :2] = [0, 1]
    sel[0, 0, 0, 2, :4] = [0, 1, 2, 3]
    sel[0, 0, 0, 3, :5] = [0, 1, 4, 6, 7]
    t = Trace.from_arrays(sel, ctx, block_size=4, model=ModelShape(1, 1, 64), selection=params)
    assert t.sel[0, 0, 0, 3, :5].tolist() == [0, 1, 4, 6, 7]
    for seq, drop in ((0, 1), (2, 2), (3, 0), (3, 3)):  # sink block, window block, sink block, window block
        bad = sel.copy()
        row = [i for i in bad[0, 0, 0, seq] if i >= 0 and i != bad[0, 0, 0, seq, drop]]
        bad[0, 0, 0, seq] = row + [-1] * (6 - len(row))
        with pytest.raises(ValueError, match=f"step 0, layer 0, head 0, seq {seq} lacks a block"):
            Trace.from_arrays(bad, ctx, block_size=4, model=ModelShape(1, 1, 64), selection=params)


def test_writer_refuses_a_header_json_cannot_hold(tmp_path):
    """A NaN in the provenance would be written as Python's NaN extension, which the reader refuses."""
    t = small_trace()
    t.header = t.header.replace(provenance={"x": float("nan")})
    with pytest.raises(TraceError, match="'provenance' holds a NaN"):
        write_trace(tmp_path / "t.nosatrace", t)
    assert not list(tmp_path.iterdir())


def test_same_trace_gives_the_same_bytes(tmp_path, monkeypatch):
    """Zip entries carry a fixed timestamp, so writing one trace a day later gives an identical file."""
    import time

    trace = small_trace()
    write_trace(tmp_path / "a.nosatrace", trace)
    later = time.time() + 86400
    monkeypatch.setattr(time, "time", lambda: later)
    write_trace(tmp_path / "b.nosatrace", trace)
    assert (tmp_path / "a.nosatrace").read_bytes() == (tmp_path / "b.nosatrace").read_bytes()


def test_output_os_errors_are_one_line(tmp_path, capsys):
    """A path the machine cannot write (a file where a folder must be, a folder where the file must be) is one
    line and exit 1, not a traceback, and leaves nothing behind."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder").mkdir()
    synth = ["trace", "synth", "--kind", "random", "--layers", "1", "--heads", "1", "--steps", "2", "--k", "4",
             "--context", "2000", "-o"]
    for out, message in ((tmp_path / "afile" / "t.nosatrace", "afile: exists and is not a folder"),
                         (tmp_path / "folder", "folder: is a folder; the output needs a file name")):
        assert main(synth + [str(out)]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]
    assert not list((tmp_path / "folder").iterdir())


@pytest.mark.parametrize("part", ["addlo", "del"])
def test_deltas_out_of_order_are_refused(tmp_path, part):
    """Added ids and removed positions are stored ascending within a row and step; two swapped (as a damaged byte
    can leave them) decode to a selection but are refused as corrupt."""
    src, bad = tmp_path / "good.nosatrace", tmp_path / "bad.nosatrace"
    write_trace(src, synthesize("infllmv2", 1, 2, 2, 20, 10, 3000, seed=3, window=4))
    with zipfile.ZipFile(src) as z:
        counts = np.load(io.BytesIO(z.read(f"sel_n{part[:3]}_00000.npy"))).reshape(-1)
    at = int(np.cumsum(counts)[np.argmax(counts >= 2)] - counts[np.argmax(counts >= 2)])  # a group of two or more

    def swap(name, data):
        if name != f"sel_{part}_00000.npy":
            return data
        arr = np.load(io.BytesIO(data))
        arr[[at, at + 1]] = arr[[at + 1, at]]
        return npy_bytes(arr)

    rewrite(src, bad, swap)
    with pytest.raises(TraceError, match="not ascending within a row and step"):
        read_trace(bad)
