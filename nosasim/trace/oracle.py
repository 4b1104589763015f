"""An independent validity oracle for selection traces (``*.nosatrace``).

The fuzzer needs a second opinion on whether a mutated trace file is valid. This module is that second opinion: it
was written only from ``docs/trace-format.md`` and deliberately imports nothing from ``nosasim.trace`` so that a
misreading of the format in the real reader is not copied here. When the oracle and the reader disagree about a
file, one of them has a bug (or the document is ambiguous), which is exactly what the fuzzer wants to learn.

``violation(path)`` returns ``None`` for a valid trace, otherwise one short sentence naming the first rule broken.
It never raises, and it bounds every allocation by sizes that it has already checked against the header: header
ranges first, then the member set, then each member's declared inflated size (``ZipInfo.file_size``), then each
member's ``.npy`` dtype and shape, and only then the array data.
"""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile

import numpy as np

__all__ = ["violation"]

# Limits quoted from "What the reader checks".
_MAX_HEADER_BYTES = 1 << 20
_METHODS = ("random", "infllmv2", "nosa", "import", "recorded", "reselect")
_OPTIONAL = ("agnostic_score", "qaware_score", "attn_mass")
_PER_CHUNK_OPTIONAL = ("qaware_score", "attn_mass")
_SEL = ("sel_key", "sel_nadd", "sel_ndel", "sel_del", "sel_addlo", "sel_addhi")
# A member may inflate to its data bytes plus room for the .npy header (the brief's slack).
_NPY_SLACK = 4096
# The decoder's membership mask is [rows, n_blocks + 1]; rows are processed in blocks so that the mask stays
# around this many booleans even for a header with many rows, since the file itself only holds [rows, k] ids.
_MASK_CELLS = 1 << 22


class _Invalid(Exception):
    """Raised internally with the sentence to return; never escapes ``violation``."""


def violation(path) -> str | None:
    """None when the file at `path` is a valid trace per docs/trace-format.md; otherwise a short English sentence
    naming the first rule broken (e.g. "header field 'k' is not an integer")."""
    try:
        _check(path)
    except _Invalid as e:
        return str(e)
    except MemoryError:
        return "the trace needs more memory than is available to check it"
    except RecursionError:
        return "header.json is nested too deeply to parse"
    except Exception as e:  # the oracle must never raise: any surprise is itself a verdict
        return f"the trace cannot be checked: {type(e).__name__}: {e}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# header


def _int(obj: dict, key: str, where: str, lo: int = 1, hi: int | None = None) -> int:
    """An exact JSON integer (bool and float are refused: `type(x) is int`) within [lo, hi]."""
    if key not in obj:
        raise _Invalid(f"header field '{where}{key}' is missing")
    x = obj[key]
    if type(x) is not int:
        raise _Invalid(f"header field '{where}{key}' is not an integer (found {x!r:.40})")
    if x < lo or (hi is not None and x > hi):
        rng = f"at least {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _Invalid(f"header field '{where}{key}' must be {rng}, found {x}")
    return x


def _object(obj: dict, key: str, where: str = "") -> dict:
    if key not in obj:
        raise _Invalid(f"header field '{where}{key}' is missing")
    if not isinstance(obj[key], dict):
        raise _Invalid(f"header field '{where}{key}' is not an object")
    return obj[key]


def _reject_constant(name):
    # Python's json accepts NaN/Infinity, which are not JSON; the doc asks for valid JSON.
    raise ValueError(f"{name} is not valid JSON")


def _parse_header(raw: bytes) -> dict:
    try:
        h = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise _Invalid(f"header.json is not valid JSON: {e}") from None
    if not isinstance(h, dict):
        raise _Invalid("header.json is not a JSON object")
    if "format" not in h:
        raise _Invalid("header field 'format' is missing")
    if h["format"] != "nosasim-trace":
        raise _Invalid(f"header field 'format' is not 'nosasim-trace' (found {h['format']!r:.40})")
    if "version" not in h:
        raise _Invalid("header field 'version' is missing")
    if type(h["version"]) is not int or h["version"] != 1:
        raise _Invalid(f"header field 'version' is not the integer 1 (found {h['version']!r:.40})")

    _int(h, "block_size", "", 1, 1 << 20)
    m = _object(h, "model")
    _int(m, "layers", "model.", 1, 4096)
    kv = _int(m, "kv_heads", "model.", 1, 4096)
    _int(m, "head_dim", "model.", 1, 65536)
    if "dtype_bytes" not in m:
        raise _Invalid("header field 'model.dtype_bytes' is missing")
    if type(m["dtype_bytes"]) is not int:
        raise _Invalid(f"header field 'model.dtype_bytes' is not an integer (found {m['dtype_bytes']!r:.40})")
    if m["dtype_bytes"] not in (1, 2, 4):
        raise _Invalid(f"header field 'model.dtype_bytes' must be 1, 2 or 4, found {m['dtype_bytes']}")
    if m.get("q_heads") is not None:
        q = _int(m, "q_heads", "model.", 1, 65536)
        if q % kv:
            raise _Invalid(f"header field 'model.q_heads' ({q}) is not a multiple of model.kv_heads ({kv})")
    if "name" in m and not isinstance(m["name"], str):
        raise _Invalid("header field 'model.name' is not a string")

    s = _object(h, "selection")
    if "method" not in s:
        raise _Invalid("header field 'selection.method' is missing")
    if not isinstance(s["method"], str) or s["method"] not in _METHODS:
        raise _Invalid(f"header field 'selection.method' is not one of {', '.join(_METHODS)} "
                       f"(found {s['method']!r:.40})")
    sk = _int(s, "k", "selection.", 1, 32767)
    sink = _int(s, "sink_blocks", "selection.", 0)
    window = _int(s, "window_blocks", "selection.", 0)

    _int(h, "steps", "", 1, 1 << 31)
    _int(h, "seqs", "", 1, 1 << 20)
    k = _int(h, "k", "", 1, 32767)
    _int(h, "n_blocks", "", 1, 32767)
    _int(h, "chunk_steps", "", 1, 1 << 20)
    if k != sk:
        raise _Invalid(f"header field 'k' ({k}) does not equal selection.k ({sk})")
    if sink + window > k:
        raise _Invalid(f"selection.sink_blocks + selection.window_blocks ({sink} + {window}) exceeds k ({k})")
    # k_q: absent or null means "all k are query-aware"; otherwise its own stated range applies (it may be 0
    # when sink and window are 0, since the doc gives k_q an explicit range rather than the generic ">= 1").
    if s.get("k_q") is not None:
        kq = s["k_q"]
        if type(kq) is not int:
            raise _Invalid(f"header field 'selection.k_q' is not an integer or null (found {kq!r:.40})")
        if not sink + window <= kq <= k:
            raise _Invalid(f"header field 'selection.k_q' must be in [sink_blocks + window_blocks, k] = "
                           f"[{sink + window}, {k}], found {kq}")

    if "arrays" not in h:
        raise _Invalid("header field 'arrays' is missing")
    arrays = h["arrays"]
    if not isinstance(arrays, list):
        raise _Invalid("header field 'arrays' is not a list")
    for a in arrays:
        if not isinstance(a, str) or a not in _OPTIONAL:
            raise _Invalid(f"header field 'arrays' names {a!r:.40}, which is not one of {', '.join(_OPTIONAL)}")
    _object(h, "provenance")
    return h


# ----------------------------------------------------------------------------------------------------------------
# members


def _read(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The member's bytes; any zip/zlib/CRC problem is a corrupt member. Reading the whole member is what makes
    zipfile verify its CRC."""
    try:
        return z.read(info)
    except Exception as e:
        raise _Invalid(f"member '{info.filename}' is corrupt: {type(e).__name__}: {e}") from None


def _npy(z, info, dtype, shape, flat_max=None) -> np.ndarray:
    """Load one .npy member after checking its header's dtype and shape, so a lying header cannot make
    read_array allocate an array the member cannot fill. `shape` None means flat (1-D, length <= flat_max)."""
    name = info.filename
    raw = _read(z, info)
    fp = io.BytesIO(raw)
    try:
        ver = np.lib.format.read_magic(fp)
        if ver == (1, 0):
            got_shape, _, got_dtype = np.lib.format.read_array_header_1_0(fp)
        elif ver == (2, 0):
            got_shape, _, got_dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            # Version 3.0 has no public header reader; numpy's read_array understands it, so use the helper
            # read_array itself uses when it is there.
            got_shape, _, got_dtype = np.lib.format._read_array_header(fp, ver)
    except Exception as e:
        raise _Invalid(f"member '{name}' cannot be decoded: bad .npy header: {e}") from None
    want = np.dtype(dtype)
    if got_dtype != want:
        raise _Invalid(f"member '{name}' has dtype {got_dtype}, expected {want}")
    got_shape = tuple(int(d) for d in got_shape)
    if shape is None:
        if len(got_shape) != 1:
            raise _Invalid(f"member '{name}' has shape {got_shape}, expected a flat (1-D) array")
        if got_shape[0] > flat_max:
            raise _Invalid(f"member '{name}' holds {got_shape[0]} entries, more than k per row and step allow "
                           f"({flat_max})")
    elif got_shape != tuple(shape):
        raise _Invalid(f"member '{name}' has shape {got_shape}, expected {tuple(shape)}")
    try:
        arr = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:
        raise _Invalid(f"member '{name}' cannot be decoded: {type(e).__name__}: {e}") from None
    if arr.dtype != want or arr.shape != got_shape:  # paranoia: what was read is what the header said
        raise _Invalid(f"member '{name}' decodes to {arr.dtype} {arr.shape}, not its header's")
    return arr


def _declared_names(h: dict, chunks: int):
    """Generate the declared member names in file order (lazy: `chunks` may be huge in a mutated header)."""
    arrays = set(h["arrays"])
    yield "header.json"
    yield "context_len.npy"
    if "agnostic_score" in arrays:
        yield "agnostic_score.npy"
    per = _SEL + tuple(a for a in _PER_CHUNK_OPTIONAL if a in arrays)
    for c in range(chunks):
        for p in per:
            yield f"{p}_{c:05d}.npy"


# ----------------------------------------------------------------------------------------------------------------
# the whole check


def _where(r: int, H: int, B: int) -> str:
    return f"layer {r // (H * B)}, head {(r // B) % H}, seq {r % B}"


def _check(path) -> None:
    # Rule 1: a regular file, checked before opening so a FIFO or device is never opened.
    try:
        st = os.stat(path)
    except Exception as e:
        raise _Invalid(f"the path cannot be accessed: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _Invalid("the path is not a regular file")
    try:
        z = zipfile.ZipFile(path)
    except Exception as e:
        raise _Invalid(f"the file is not a readable zip: {type(e).__name__}: {e}") from None
    with z:
        _check_zip(z)


def _check_zip(z: zipfile.ZipFile) -> None:
    infos = z.infolist()
    by_name: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        # Two entries with one name would let different readers see different data: not "exactly the members".
        if info.filename in by_name:
            raise _Invalid(f"member '{info.filename}' appears more than once")
        by_name[info.filename] = info

    # Rule 2: header.json, bounded before it is read.
    hi = by_name.get("header.json")
    if hi is None:
        raise _Invalid("member 'header.json' is missing")
    if hi.file_size > _MAX_HEADER_BYTES:
        raise _Invalid(f"header.json is {hi.file_size} bytes, more than 1 MiB")
    h = _parse_header(_read(z, hi))

    m, sel = h["model"], h["selection"]
    L, H, B = m["layers"], m["kv_heads"], h["seqs"]
    k, nb, bs, steps, cs = h["k"], h["n_blocks"], h["block_size"], h["steps"], h["chunk_steps"]
    sink, window = sel["sink_blocks"], sel["window_blocks"]
    arrays = set(h["arrays"])
    R = L * H * B
    chunks = -(-steps // cs)

    # Rule 3: exactly the declared members. Count first: with a mutated steps/chunk_steps the declared list could
    # be astronomically long, and if it is longer than the zip then one of its first len+1 names must be missing.
    per_chunk = len(_SEL) + sum(a in arrays for a in _PER_CHUNK_OPTIONAL)
    n_declared = 2 + ("agnostic_score" in arrays) + chunks * per_chunk
    if n_declared > len(by_name):
        for name in _declared_names(h, chunks):
            if name not in by_name:
                raise _Invalid(f"member '{name}' is missing")
        raise _Invalid("the header declares more members than the file holds")  # unreachable by pigeonhole
    declared = list(_declared_names(h, chunks))
    for name in declared:
        if name not in by_name:
            raise _Invalid(f"member '{name}' is missing")
    dset = set(declared)
    for info in infos:
        if info.filename not in dset:
            raise _Invalid(f"member '{info.filename}' is not declared by the header")

    # Rule 4 (sizes): every member's inflated size is bounded by its shape before anything is read.
    cdt = np.uint8 if k <= 255 else np.uint16
    cb = np.dtype(cdt).itemsize

    def n_of(c: int) -> int:
        return min((c + 1) * cs, steps) - c * cs

    def bound(name: str) -> int:
        if name == "context_len.npy":
            return steps * B * 4
        if name == "agnostic_score.npy":
            return L * H * B * nb * 4
        stem, cc = name[:-4].rsplit("_", 1)
        n = n_of(int(cc))
        return {"sel_key": R * k * 2, "sel_nadd": (n - 1) * R * cb, "sel_ndel": (n - 1) * R * cb,
                "sel_del": (n - 1) * R * k * cb, "sel_addlo": (n - 1) * R * k, "sel_addhi": (n - 1) * R * k,
                "qaware_score": n * R * nb * 2, "attn_mass": n * R * nb * 2}[stem]

    for name in declared[1:]:
        limit = bound(name) + _NPY_SLACK
        if by_name[name].file_size > limit:
            raise _Invalid(f"member '{name}' inflates to {by_name[name].file_size} bytes, more than its shape "
                           f"allows ({limit})")

    # Rule 5: context_len.
    cl = _npy(z, by_name["context_len.npy"], np.int32, (steps, B)).astype(np.int64)
    if (cl < 1).any():
        t, b = map(int, np.argwhere(cl < 1)[0])
        raise _Invalid(f"context_len[{t}, {b}] is {cl[t, b]}, less than 1")
    if steps > 1:
        bad = np.diff(cl, axis=0) != 1
        if bad.any():
            t, b = map(int, np.argwhere(bad)[0])
            raise _Invalid(f"context_len does not grow by exactly one from step {t} to {t + 1} (seq {b})")
    want_nb = (int(cl.max()) - 1) // bs + 1
    if nb != want_nb:
        raise _Invalid(f"header field 'n_blocks' is {nb}, but the longest context spans {want_nb} blocks")
    # tail[t, b]: index of the partial tail block, i.e. the number of complete blocks.
    tail = (cl - 1) // bs

    # Rule 8 (static score).
    if "agnostic_score" in arrays:
        a = _npy(z, by_name["agnostic_score.npy"], np.float32, (L, H, B, nb))
        if np.isinf(a).any():
            raise _Invalid("agnostic_score holds an infinite score")
        exists = np.arange(nb)[None, :] < tail[-1][:, None]             # [B, nb]: complete at the last step
        if (~np.isfinite(a) & exists[None, None]).any():
            raise _Invalid("agnostic_score is not finite for a block that is complete at the last step")
        del a

    for c in range(chunks):
        n = n_of(c)
        t0 = c * cs
        _check_chunk(z, by_name, c, n, t0, tail[t0:t0 + n], R, H, B, k, nb, sink, window, cdt)
        for arr in _PER_CHUNK_OPTIONAL:
            if arr not in arrays:
                continue
            name = f"{arr}_{c:05d}.npy"
            x = _npy(z, by_name[name], np.float16, (n, L, H, B, nb))
            if np.isinf(x).any():
                raise _Invalid(f"member '{name}' holds an infinite score")
            # Per step, blocks 0..tail inclusive exist (the partial tail block is scored too).
            exists = np.arange(nb)[None, None, :] <= tail[t0:t0 + n][:, :, None]   # [n, B, nb]
            if (~np.isfinite(x) & exists[:, None, None]).any():
                raise _Invalid(f"member '{name}' is not finite for a block that exists at its step")
            del x


def _check_chunk(z, by_name, c, n, t0, seq_tails, R, H, B, k, nb, sink, window, cdt) -> None:
    """Rules 4 (delta shapes), 6 and 7 for one chunk: decode the selections as the doc's decoder does, checking
    every step as it goes. `seq_tails` [n, seqs] is the tail block index per step and sequence."""
    nm = lambda p: f"{p}_{c:05d}.npy"
    key = _npy(z, by_name[nm("sel_key")], np.int16, (R, k)).astype(np.int64)
    nadd = _npy(z, by_name[nm("sel_nadd")], cdt, (n - 1, R)).astype(np.int64)
    ndel = _npy(z, by_name[nm("sel_ndel")], cdt, (n - 1, R)).astype(np.int64)
    cap = (n - 1) * R * k
    for name, cnt in (("sel_nadd", nadd), ("sel_ndel", ndel)):
        if cnt.size and cnt.max() > k:
            s, r = map(int, np.argwhere(cnt > k)[0])
            raise _Invalid(f"member '{nm(name)}' counts {cnt[s, r]} blocks at step {t0 + s + 1} ({_where(r, H, B)}), "
                           f"more than k = {k}")
    dele = _npy(z, by_name[nm("sel_del")], cdt, None, cap).astype(np.int64)
    lo = _npy(z, by_name[nm("sel_addlo")], np.uint8, None, cap).astype(np.int64)
    hi = _npy(z, by_name[nm("sel_addhi")], np.uint8, None, cap).astype(np.int64)
    if dele.size != int(ndel.sum()):
        raise _Invalid(f"member '{nm('sel_del')}' holds {dele.size} positions, but sel_ndel counts {int(ndel.sum())}")
    if lo.size != int(nadd.sum()):
        raise _Invalid(f"member '{nm('sel_addlo')}' holds {lo.size} ids, but sel_nadd counts {int(nadd.sum())}")
    if hi.size != lo.size:
        raise _Invalid(f"member '{nm('sel_addhi')}' holds {hi.size} bytes, but sel_addlo holds {lo.size}")
    add = lo | (hi << 8)
    # Per-row tails are only built now that sel_key [rows, k] and the [n - 1, rows] counts have been read at their
    # declared shapes: a header with a huge rows count and tiny members is refused before this allocation.
    tails = seq_tails[:, np.arange(R) % B]                                 # [n, rows]
    # Offsets into the flat members for (step s, row r) = index s * R + r: steps in order, rows in order.
    off_add = np.concatenate([[0], np.cumsum(nadd.ravel())])
    off_del = np.concatenate([[0], np.cumsum(ndel.ravel())])

    rb = max(1, _MASK_CELLS // (nb + 1))
    for r0 in range(0, R, rb):
        r1 = min(R, r0 + rb)
        _decode_rows(key[r0:r1], nadd[:, r0:r1], ndel[:, r0:r1], add, dele, off_add, off_del, r0, r1, R, c, n, t0,
                     tails[:, r0:r1], H, B, k, nb, sink, window)


def _decode_rows(cur, nadd, ndel, add, dele, off_add, off_del, r0, r1, R, c, n, t0, tails, H, B, k, nb, sink,
                 window) -> None:
    nr = r1 - r0
    ar = np.arange(nr)
    cols = np.arange(nb)
    for s in range(n):
        t = t0 + s
        tl = tails[s]                                                   # [nr] complete blocks at step t
        _check_selection(cur, tl, t, r0, H, B, nb, s == 0, c)

        # Rule 7, forced blocks, with an explicit membership mask: every complete sink block and every complete
        # block among the last window_blocks - 1 must be marked present.
        member = np.zeros((nr, nb + 1), bool)
        member[ar[:, None], np.where(cur < 0, nb, cur)] = True
        forced = cols[None, :] < np.minimum(sink, tl)[:, None]
        if window >= 1:
            forced |= (cols[None, :] >= (tl - (window - 1))[:, None]) & (cols[None, :] < tl[:, None])
        lack = forced & ~member[:, :nb]
        if lack.any():
            r, j = map(int, np.argwhere(lack)[0])
            kind = "sink" if j < sink else "window"
            raise _Invalid(f"the selection at step {t} ({_where(r0 + r, H, B)}) lacks block {j}, which its "
                           f"{kind} budget forces (sink_blocks {sink}, window_blocks {window})")
        if s == n - 1:
            break

        # Rule 6: apply the deltas of the next step, checking them against this step's sorted selection.
        nd, na = ndel[s], nadd[s]
        rd = np.repeat(ar, nd)
        ra = np.repeat(ar, na)
        p = dele[off_del[s * R + r0]:off_del[s * R + r1]]
        a = add[off_add[s * R + r0]:off_add[s * R + r1]]
        where_next = f"at step {t + 1}"
        if p.size:
            if p.max() >= k:
                i = int(np.argmax(p >= k))
                raise _Invalid(f"a removal {where_next} ({_where(r0 + rd[i], H, B)}) is at position {p[i]}, "
                               f"not below k = {k}")
            gone = cur[rd, p]
            if (gone < 0).any():
                i = int(np.argmax(gone < 0))
                raise _Invalid(f"a removal {where_next} ({_where(r0 + rd[i], H, B)}) points at position {p[i]}, "
                               f"which is padding in the previous selection")
            _ascending(p, rd, f"removal positions {where_next}", r0, H, B)
        if a.size:
            if a.max() >= nb:
                i = int(np.argmax(a >= nb))
                raise _Invalid(f"an added block {where_next} ({_where(r0 + ra[i], H, B)}) has id {a[i]}, not below "
                               f"n_blocks = {nb}")
            _ascending(a, ra, f"added block ids {where_next}", r0, H, B)
            # "Already present" is judged against the previous step's selection, before this step's removals.
            present = member[ra, a]
            if present.any():
                i = int(np.argmax(present))
                raise _Invalid(f"an added block {where_next} ({_where(r0 + ra[i], H, B)}) has id {a[i]}, which is "
                               f"already in the previous selection")
        member[rd, cur[rd, p]] = False
        member[ra, a] = True
        counts = member[:, :nb].sum(axis=1)
        if counts.max(initial=0) > k:
            r = int(np.argmax(counts > k))
            raise _Invalid(f"the selection {where_next} ({_where(r0 + r, H, B)}) holds {counts[r]} ids, more "
                           f"than k = {k}")
        rows, ids = np.nonzero(member[:, :nb])                          # row-major: ids ascending in each row
        cur = np.full((nr, k), -1, np.int64)
        start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        cur[rows, np.arange(rows.size) - start[rows]] = ids


def _ascending(vals, rows, what: str, r0: int, H: int, B: int) -> None:
    """``vals`` strictly ascending wherever neighbours share a row (``rows``: each value's row in the group)."""
    bad = (rows[1:] == rows[:-1]) & (vals[1:] <= vals[:-1])
    if bad.any():
        i = int(np.argmax(bad)) + 1
        raise _Invalid(f"{what} ({_where(r0 + rows[i], H, B)}) are not strictly ascending")


def _check_selection(cur, tl, t, r0, H, B, nb, keyframe, c) -> None:
    """Rules 6/7 for one step's decoded selection [rows, k]: ids -1 or in [0, n_blocks), sorted ascending, unique,
    -1 padding only at the end, and only complete blocks (id < tail)."""
    src = f"member 'sel_key_{c:05d}.npy'" if keyframe else "the decoded selection"

    def fail(mask, what):
        r, i = map(int, np.argwhere(mask)[0])
        raise _Invalid(f"{src} at step {t} ({_where(r0 + r, H, B)}) {what(r, i)}")

    bad = (cur < -1) | (cur >= nb)
    if bad.any():
        fail(bad, lambda r, i: f"holds id {cur[r, i]}, which is neither -1 nor in [0, n_blocks = {nb})")
    valid = cur >= 0
    gap = ~valid[:, :-1] & valid[:, 1:]
    if gap.any():
        fail(gap, lambda r, i: "has -1 padding before an id")
    both = valid[:, :-1] & valid[:, 1:]
    dup = both & (cur[:, 1:] == cur[:, :-1])
    if dup.any():
        fail(dup, lambda r, i: f"holds id {cur[r, i]} twice")
    down = both & (cur[:, 1:] < cur[:, :-1])
    if down.any():
        fail(down, lambda r, i: "is not sorted ascending")
    future = valid & (cur >= tl[:, None])
    if future.any():
        fail(future, lambda r, i: f"holds block {cur[r, i]}, which is not complete (only {tl[r]} blocks are)")
