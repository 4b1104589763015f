"""Reading and writing trace files (format v1: a zip of ``.npy`` members, see docs/trace-format.md).

Selections are stored per chunk of ``chunk_steps`` steps, so a reader can decode any step range
without touching the rest of the file; a trace larger than memory is processed chunk by chunk.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Iterator
from zlib import error as zlib_error

import numpy as np

from ..atomic import atomic_path
from .codec import count_dtype, decode_chunk, encode_chunk
from .header import TraceError, TraceHeader
from .model import Trace, check_context_len, check_forced, check_selection, tails_of

STEP_ARRAYS = ("qaware_score", "attn_mass")
SEL_PARTS = ("key", "nadd", "ndel", "del", "addlo", "addhi")
MAX_HEADER_BYTES = 1 << 20  # a header is a few hundred bytes; provenance text included, far below this
NPY_HEADER_BYTES = 4096  # an .npy member's own header (magic, dtype, shape) is under this


def member(name: str, chunk: int | None = None) -> str:
    return f"{name}.npy" if chunk is None else f"{name}_{chunk:05d}.npy"


def _entry(name: str, stored: bool = False) -> zipfile.ZipInfo:
    """A member's zip entry with a fixed timestamp: the same trace gives the same bytes, whenever it is written.
    ``stored``: no compression (the float16 score arrays, which deflate shrinks by 7% at about 15 MB/s: writing a
    64K-context score trace spent most of its time there)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info


def _write_npy(zf: zipfile.ZipFile, name: str, arr: np.ndarray, stored: bool = False) -> None:
    with zf.open(_entry(name, stored), "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def write_trace(path: str | os.PathLike, trace: Trace, chunk_steps: int | None = None) -> int:
    """Write ``trace`` to ``path`` atomically; returns the file size in bytes.

    The file is written under a temporary name in the same folder and renamed into place only
    when complete, so an interrupted or failed write never leaves a partial trace behind.
    """
    header = trace.header
    if chunk_steps is not None:
        header = header.replace(chunk_steps=chunk_steps)
    if trace.step0 != 0 or header.steps != trace.steps:
        raise TraceError("write_trace needs a whole trace, not a step range of one")
    try:
        text = json.dumps(header.to_dict(), indent=1, allow_nan=False)
    except ValueError:  # NaN or infinity, which JSON cannot hold (the reader refuses Python's extension)
        raise TraceError("trace header: field 'provenance' holds a NaN or infinite number, which JSON cannot "
                         "hold") from None
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            zf.writestr(_entry("header.json"), text)
            _write_npy(zf, member("context_len"), trace.context_len.astype(np.int32))
            if trace.agnostic_score is not None:
                _write_npy(zf, member("agnostic_score"), trace.agnostic_score.astype(np.float32))
            rows = trace.rows()
            cs = header.chunk_steps
            for c in range(header.n_chunks):
                lo, hi = c * cs, min((c + 1) * cs, header.steps)
                for part, arr in encode_chunk(rows[lo:hi], header.n_blocks).items():
                    _write_npy(zf, member(f"sel_{part}", c), arr)
                for name in STEP_ARRAYS:
                    arr = getattr(trace, name)
                    if arr is not None:
                        _write_npy(zf, member(name, c), arr[lo:hi].astype(np.float16), stored=True)
    return os.path.getsize(path)


def _not_json(name: str):
    """Python's json reads NaN and Infinity, which are not JSON: a header holding them is refused."""
    raise json.JSONDecodeError(f"{name} is not a JSON value", name, 0)


class TraceReader:
    """Opens a trace file, checks its header, and decodes step ranges on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise TraceError(f"trace file {self.path!r} does not exist")
        if not os.path.isfile(self.path):  # a folder, a FIFO or a device: never opened (a FIFO would block)
            raise TraceError(f"trace file {self.path!r} is not a regular file")
        try:
            self._zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
                RuntimeError) as exc:
            raise TraceError(f"trace file {self.path!r} is truncated or corrupt (not a readable zip: {exc})") from None
        names = self._zf.namelist()
        self._names = set(names)
        if len(self._names) != len(names):  # which copy of a twice-stored member counts is anybody's guess
            twice = sorted({n for n in names if names.count(n) > 1})
            raise TraceError(f"trace file {self.path!r}: member(s) {twice[:3]} stored more than once (corrupt)")
        if "header.json" not in self._names:
            raise TraceError(f"trace file {self.path!r}: missing field 'header' (header.json)")
        if self._zf.getinfo("header.json").file_size > MAX_HEADER_BYTES:
            raise TraceError(f"trace file {self.path!r}: header.json is larger than {MAX_HEADER_BYTES} bytes (corrupt)")
        try:
            raw = json.loads(self._read_bytes("header.json"), parse_constant=_not_json)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise TraceError(f"trace file {self.path!r}: header.json is not valid JSON "
                             f"({type(exc).__name__}: {str(exc)[:100]})") from None
        self.header = TraceHeader.from_dict(raw)
        h = self.header
        # Every member must be one the header declares: an array left out of 'arrays' would be silently ignored.
        per_chunk = len(SEL_PARTS) + sum(name in h.arrays for name in STEP_ARRAYS)
        if h.n_chunks * per_chunk > len(self._names):  # before building any per-chunk list (steps may be huge)
            raise TraceError(f"trace file {self.path!r}: the header declares {h.n_chunks} chunks of "
                             f"{h.chunk_steps} steps ({h.n_chunks * per_chunk} chunk members); the file holds "
                             f"{len(self._names)} members (truncated or corrupt)")
        want = {"header.json", member("context_len")} | ({member("agnostic_score")} if "agnostic_score" in h.arrays
                                                          else set())
        for c in range(h.n_chunks):
            want |= {member(f"sel_{p}", c) for p in SEL_PARTS}
            want |= {member(name, c) for name in STEP_ARRAYS if name in h.arrays}
        extra = sorted(self._names - want)
        if extra:
            raise TraceError(f"trace file {self.path!r}: member(s) {extra[:3]} not declared by the header (its "
                             f"'arrays' field and {h.n_chunks} chunks of {h.chunk_steps} steps)")
        self.context_len = self._array("context_len", None, np.int32, (h.steps, h.seqs))
        check_context_len(self.context_len)
        want = int(tails_of(self.context_len.max(), h.block_size)) + 1
        if h.n_blocks != want:
            raise TraceError(f"trace file {self.path!r}: field 'n_blocks' is {h.n_blocks}, but the longest "
                             f"context ({int(self.context_len.max())} tokens of {h.block_size}) spans {want} blocks")
        self.agnostic_score = None
        if "agnostic_score" in h.arrays:
            shape = (h.model.layers, h.model.kv_heads, h.seqs, h.n_blocks)
            self.agnostic_score = self._array("agnostic_score", None, np.float32, shape)
            # Scores exist for the blocks that complete within the trace; the last step's tail has none (NaN).
            last = tails_of(self.context_len[-1], h.block_size)  # [seqs]: the first block never complete
            _check_scores(self.agnostic_score, lambda idx: last[idx[2]], f"trace file {self.path!r}: field "
                          f"'agnostic_score'")

    def close(self) -> None:
        self._zf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read_bytes(self, name: str) -> bytes:
        try:
            return self._zf.read(name)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib_error, ValueError,
                NotImplementedError, RuntimeError) as exc:
            raise TraceError(f"trace file {self.path!r}: member {name!r} is truncated or corrupt ({exc})") from None

    def _array(self, name: str, chunk: int | None, dtype, shape: tuple | None, max_items: int | None = None
               ) -> np.ndarray:
        """Member ``name`` (of chunk ``chunk``) as an array of exactly ``dtype`` and ``shape`` (or, flat, at most
        ``max_items`` long). Its inflated size is checked against what the header allows before it is read, so a
        damaged or hostile member cannot make the reader allocate more than the trace can hold."""
        mname = member(name, chunk)
        field_ = mname[:-4]
        if mname not in self._names:
            raise TraceError(f"trace file {self.path!r}: missing field '{field_}'")
        dtype = np.dtype(dtype)
        items = int(np.prod(shape, dtype=object)) if shape is not None else int(max_items)
        size = self._zf.getinfo(mname).file_size
        if size > items * dtype.itemsize + NPY_HEADER_BYTES:
            raise TraceError(f"trace file {self.path!r}: field '{field_}' inflates to {size} bytes, more than its "
                             f"{items} {dtype} items can take (corrupt)")
        data = self._read_bytes(mname)
        try:
            arr = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - numpy's parser of a damaged .npy header raises many types
            raise TraceError(f"trace file {self.path!r}: field '{field_}' is corrupt "
                             f"({type(exc).__name__}: {str(exc)[:100]})") from None
        if arr.dtype != dtype:
            raise TraceError(f"trace file {self.path!r}: field '{field_}' has dtype {arr.dtype}, expected {dtype}")
        if shape is not None and arr.shape != shape:
            raise TraceError(f"trace file {self.path!r}: field '{field_}' has shape {arr.shape}, expected {shape}")
        if shape is None and arr.ndim != 1:
            raise TraceError(f"trace file {self.path!r}: field '{field_}' must be flat, got shape {arr.shape}")
        return arr

    def read(self, start: int = 0, stop: int | None = None) -> Trace:
        """Decode steps ``[start, stop)`` into a validated :class:`Trace` with ``step0 = start``."""
        h = self.header
        stop = h.steps if stop is None else stop
        if not 0 <= start < stop <= h.steps:
            raise ValueError(f"step range [{start}, {stop}) is outside the trace's 0..{h.steps}")
        cs, rows = h.chunk_steps, h.model.layers * h.model.kv_heads * h.seqs
        parts, extra = [], {name: [] for name in STEP_ARRAYS if name in h.arrays}
        cdt = count_dtype(h.k)
        for c in range(start // cs, (stop - 1) // cs + 1):
            lo, hi = c * cs, min((c + 1) * cs, h.steps)
            n = hi - lo
            # A step adds and removes at most k ids per row.
            flat = (n - 1) * rows * h.k
            chunk = {"key": self._array("sel_key", c, np.int16, (rows, h.k)),
                     "nadd": self._array("sel_nadd", c, cdt, (n - 1, rows)),
                     "ndel": self._array("sel_ndel", c, cdt, (n - 1, rows)),
                     "del": self._array("sel_del", c, cdt, None, flat),
                     "addlo": self._array("sel_addlo", c, np.uint8, None, flat),
                     "addhi": self._array("sel_addhi", c, np.uint8, None, flat)}
            dec = decode_chunk(chunk, n, rows, h.k, h.n_blocks, f"trace file {self.path!r}, chunk {c}")
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            parts.append(dec[a:b])
            for name in extra:
                shape = (n, h.model.layers, h.model.kv_heads, h.seqs, h.n_blocks)
                arr = self._array(name, c, np.float16, shape)
                # A block's score exists from the step it exists (its tail included); later blocks are NaN.
                tails = tails_of(self.context_len[lo:hi], h.block_size)  # [n, seqs]
                _check_scores(arr, lambda idx, tails=tails: tails[idx[0], idx[3]] + 1,
                              f"trace file {self.path!r}: field '{member(name, c)[:-4]}'")
                extra[name].append(arr[a:b])
        sel = np.concatenate(parts).reshape(stop - start, h.model.layers, h.model.kv_heads, h.seqs, h.k)
        ctx = self.context_len[start:stop]
        check_selection(sel, ctx, h.block_size, h.k, step0=start)
        b = h.selection.budget
        check_forced(sel, ctx, h.block_size, b.sink, b.window, step0=start)
        return Trace(
            header=h, sel=sel, context_len=ctx, agnostic_score=self.agnostic_score,
            qaware_score=np.concatenate(extra["qaware_score"]) if "qaware_score" in extra else None,
            attn_mass=np.concatenate(extra["attn_mass"]) if "attn_mass" in extra else None,
            step0=start,
        )

    def iter_chunks(self, steps: int | None = None, start: int = 0, stop: int | None = None) -> Iterator[Trace]:
        """Yield consecutive step ranges of ``steps`` steps (default: the file's chunk size)."""
        steps = steps or self.header.chunk_steps
        stop = self.header.steps if stop is None else stop
        for lo in range(start, stop, steps):
            yield self.read(lo, min(lo + steps, stop))



def _check_scores(arr: np.ndarray, first_missing, where: str) -> None:
    """Scores are finite where their block exists; elsewhere NaN or finite, never infinite. ``first_missing(idx)``
    gives, for the index arrays of the non-finite entries, the first block that does not exist there (few entries
    are non-finite, so this costs one pass over the scores)."""
    flat = arr.reshape(-1)
    # Non-finite floats have every exponent bit set: a test on the bits, which numpy runs far faster than the
    # float16 ufuncs it emulates.
    bits, expo = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000)}.get(flat.dtype.itemsize, (None, None))
    nonfinite = (flat.view(bits) & expo) == expo if bits is not None else ~np.isfinite(flat)
    at = np.flatnonzero(nonfinite)
    if not at.size:
        return
    if np.isinf(flat[at]).any():
        raise TraceError(f"{where}: scores must be finite (NaN only where a block does not exist), found infinity")
    idx = np.unravel_index(at, arr.shape)
    bad = idx[-1] < first_missing(idx)
    if bad.any():
        at = tuple(int(i[np.argmax(bad)]) for i in idx)
        raise TraceError(f"{where}: NaN score at index {at}, a block that exists (scores must be finite there)")


def read_trace(path: str | os.PathLike, start: int = 0, stop: int | None = None) -> Trace:
    """Read a whole trace (or a step range) into memory."""
    with TraceReader(path) as reader:
        return reader.read(start, stop)


def load(source) -> Trace:
    """Accept a :class:`Trace`, a :class:`TraceReader` or a path and return a whole in-memory trace."""
    if isinstance(source, Trace):
        return source
    if isinstance(source, TraceReader):
        return source.read()
    return read_trace(source)
