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
from .codec import decode_chunk, encode_chunk
from .header import TraceHeader
from .model import Trace, check_context_len, check_selection

STEP_ARRAYS = ("qaware_score", "attn_mass")


def member(name: str, chunk: int | None = None) -> str:
    return f"{name}.npy" if chunk is None else f"{name}_{chunk:05d}.npy"


def _write_npy(zf: zipfile.ZipFile, name: str, arr: np.ndarray) -> None:
    with zf.open(name, "w", force_zip64=True) as f:
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
        raise ValueError("write_trace needs a whole trace, not a step range of one")
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            zf.writestr("header.json", json.dumps(header.to_dict(), indent=1))
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
                        _write_npy(zf, member(name, c), arr[lo:hi].astype(np.float16))
    return os.path.getsize(path)


class TraceReader:
    """Opens a trace file, checks its header, and decodes step ranges on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise ValueError(f"trace file {self.path!r} does not exist")
        try:
            self._zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ValueError(f"trace file {self.path!r} is truncated or corrupt (not a readable zip: {exc})") from None
        self._names = set(self._zf.namelist())
        if "header.json" not in self._names:
            raise ValueError(f"trace file {self.path!r}: missing field 'header' (header.json)")
        try:
            raw = json.loads(self._read_bytes("header.json"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"trace file {self.path!r}: header.json is not valid JSON ({exc})") from None
        self.header = TraceHeader.from_dict(raw)
        h = self.header
        self.context_len = self._array("context_len", None, np.integer, (h.steps, h.seqs))
        check_context_len(self.context_len)
        self.agnostic_score = None
        if "agnostic_score" in h.arrays:
            shape = (h.model.layers, h.model.kv_heads, h.seqs, h.n_blocks)
            self.agnostic_score = self._array("agnostic_score", None, np.floating, shape)

    def close(self) -> None:
        self._zf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read_bytes(self, name: str) -> bytes:
        try:
            return self._zf.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, zlib_error) as exc:
            raise ValueError(f"trace file {self.path!r}: member {name!r} is truncated or corrupt ({exc})") from None

    def _array(self, name: str, chunk: int | None, kind, shape: tuple | None) -> np.ndarray:
        mname = member(name, chunk)
        if mname not in self._names:
            raise ValueError(f"trace file {self.path!r}: missing field '{mname[:-4]}'")
        try:
            arr = np.lib.format.read_array(io.BytesIO(self._read_bytes(mname)), allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"trace file {self.path!r}: field '{mname[:-4]}' is corrupt ({exc})") from None
        if not np.issubdtype(arr.dtype, kind):
            raise ValueError(f"trace file {self.path!r}: field '{mname[:-4]}' has dtype {arr.dtype}, expected {kind.__name__}")
        if shape is not None and arr.shape != shape:
            raise ValueError(f"trace file {self.path!r}: field '{mname[:-4]}' has shape {arr.shape}, expected {shape}")
        return arr

    def read(self, start: int = 0, stop: int | None = None) -> Trace:
        """Decode steps ``[start, stop)`` into a validated :class:`Trace` with ``step0 = start``."""
        h = self.header
        stop = h.steps if stop is None else stop
        if not 0 <= start < stop <= h.steps:
            raise ValueError(f"step range [{start}, {stop}) is outside the trace's 0..{h.steps}")
        cs, rows = h.chunk_steps, h.model.layers * h.model.kv_heads * h.seqs
        parts, extra = [], {name: [] for name in STEP_ARRAYS if name in h.arrays}
        for c in range(start // cs, (stop - 1) // cs + 1):
            lo, hi = c * cs, min((c + 1) * cs, h.steps)
            chunk = {p: self._array(f"sel_{p}", c, np.integer, None) for p in ("key", "nadd", "ndel", "del", "addlo", "addhi")}
            dec = decode_chunk(chunk, hi - lo, rows, h.k, h.n_blocks, f"trace file {self.path!r}, chunk {c}")
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            parts.append(dec[a:b])
            for name in extra:
                shape = (hi - lo, h.model.layers, h.model.kv_heads, h.seqs, h.n_blocks)
                extra[name].append(self._array(name, c, np.floating, shape)[a:b])
        sel = np.concatenate(parts).reshape(stop - start, h.model.layers, h.model.kv_heads, h.seqs, h.k)
        ctx = self.context_len[start:stop]
        check_selection(sel, ctx, h.block_size, h.k, step0=start)
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
