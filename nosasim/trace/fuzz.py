"""Seeded mutation fuzzing of trace files: every damaged or hand-edited trace must read as a valid trace or be
refused with a :class:`~nosasim.trace.TraceError` (a ``ValueError``); nothing else (another exception, a hang, a huge
allocation) is acceptable.

Each case takes a valid trace file, applies one mutation of one category, reads the result with
:func:`nosasim.trace.read_trace` and judges it with :func:`nosasim.trace.oracle.violation` (an independent reading of
the format's rules); the two must agree:

- ``header``: one header field (found by walking the JSON) set to a value of another type or an extreme one;
- ``nudge``: one integer of the header moved to a plausible wrong value (one more, one less, doubled, halved, 0);
- ``context``: ``context_len`` shifted against the header and the selections (all, one sequence, one entry) or
  reversed;
- ``member``: one array member replaced by one of another dtype or shape, or with extreme values (negative, huge,
  NaN, infinite);
- ``bytes``: bytes of one inflated member flipped;
- ``container``: bytes of the zip file itself flipped, or the file truncated;
- ``drop``: one member removed.

``run`` returns the outcome counts per category; ``tests/test_trace_fuzz.py`` runs a quick seeded sample and
``benchmarks/fuzz_traces.py`` the full run whose summary is committed.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
import zipfile
from collections import Counter

import numpy as np

from .header import TraceError
from .io import read_trace, write_trace

CATEGORIES = ("header", "nudge", "context", "member", "bytes", "container", "drop")
ODD_VALUES = (None, True, False, 1.5, -1, 0, 2 ** 31, 2 ** 63, 10 ** 9, -(2 ** 40), "x", "", [], [1, 2], {},
              {"a": 1}, float("nan"), 1e308)


def _members(path: str) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _write(path: str, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _paths(obj, prefix=()):
    """Every (path) to a leaf or container in a JSON object."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _get(obj, path):
    """The place at ``path`` (keys and indices) in a JSON object."""
    for p in path:
        obj = obj[p]
    return obj


def _set_odd(rng, obj) -> tuple:
    """Set one place anywhere in the JSON object ``obj`` to one of :data:`ODD_VALUES`; returns its path."""
    paths = list(_paths(obj))
    path = paths[rng.integers(len(paths))]
    _get(obj, path[:-1])[path[-1]] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
    return path


def _mutate_header(rng, members):
    d = json.loads(members["header.json"])
    path = _set_odd(rng, d)
    members["header.json"] = json.dumps(d).encode()
    return f"header {'.'.join(map(str, path))}"


def _mutate_nudge(rng, members):
    """One integer of the header (outside the free-form provenance) moved to a plausible wrong value: these keep
    every type right, so only the fields' consistency with each other and with the arrays can catch them."""
    d = json.loads(members["header.json"])
    paths = [p for p in _paths(d) if p[0] != "provenance" and type(_get(d, p)) is int]
    path = paths[rng.integers(len(paths))]
    v = _get(d, path)
    new = (v + 1, v - 1, 2 * v, v // 2, 0, v + 64)[rng.integers(6)]
    new = v + 1 if new == v else new
    _get(d, path[:-1])[path[-1]] = new
    members["header.json"] = json.dumps(d).encode()
    return f"nudge {'.'.join(map(str, path))} {v} -> {new}"


def _mutate_context(rng, members):
    """``context_len`` shifted against the header and the selections (all of it, one sequence, or one entry)."""
    name = "context_len.npy"
    ctx = np.lib.format.read_array(io.BytesIO(members[name]), allow_pickle=False).copy()
    how = rng.integers(4)
    shift = int((1, -1, 7, 64, -64, 640)[rng.integers(6)])
    if how == 0:
        ctx += shift
    elif how == 1:
        ctx[:, rng.integers(ctx.shape[1])] += shift
    elif how == 2:
        ctx[rng.integers(ctx.shape[0]), rng.integers(ctx.shape[1])] += shift
    else:
        ctx = ctx[::-1].copy()
    members[name] = _npy(ctx)
    return f"context ({how}, {shift})"


def _mutate_member(rng, members):
    names = [n for n in members if n.endswith(".npy")]
    name = names[rng.integers(len(names))]
    arr = np.lib.format.read_array(io.BytesIO(members[name]), allow_pickle=False)
    how = rng.integers(6)
    if how == 0:
        arr = arr.astype((np.int8, np.uint64, np.float64, np.int64, np.bool_, np.float16)[rng.integers(6)])
    elif how == 1:
        arr = arr.reshape(-1)[: max(0, arr.size - 1 - rng.integers(3))]
    elif how == 2:
        arr = arr.T.copy() if arr.ndim > 1 else np.concatenate([arr, arr[:1]])
    elif arr.size:
        arr = arr.copy()
        flat = arr.reshape(-1)
        i = rng.integers(flat.size, size=max(1, flat.size // 50))
        if np.issubdtype(arr.dtype, np.floating):
            flat[i] = (np.nan, np.inf, -np.inf, 1e30)[rng.integers(4)]
        else:
            info = np.iinfo(arr.dtype)
            flat[i] = (info.max, info.min, -1 if info.min < 0 else info.max - 1, 0)[how - 3]
    members[name] = _npy(arr)
    return f"member {name} ({how})"


def _mutate_bytes(rng, members):
    names = [n for n in members if n.endswith(".npy") or n == "header.json"]
    name = names[rng.integers(len(names))]
    raw = bytearray(members[name])
    for _ in range(1 + rng.integers(4)):
        if raw:
            raw[rng.integers(len(raw))] ^= 1 << int(rng.integers(8))
    members[name] = bytes(raw)
    return f"bytes {name}"


def _mutate_container(rng, path):
    raw = bytearray(open(path, "rb").read())
    if rng.integers(3) == 0:
        raw = raw[: rng.integers(len(raw))]
    else:
        for _ in range(1 + rng.integers(8)):
            raw[rng.integers(len(raw))] ^= 1 << int(rng.integers(8))
    with open(path, "wb") as f:
        f.write(raw)
    return "container"


def _mutate_drop(rng, members):
    names = list(members)
    name = names[rng.integers(len(names))]
    del members[name]
    return f"drop {name}"


def mutate(rng: np.random.Generator, src: str, dst: str, category: str) -> str:
    """Write a mutated copy of trace ``src`` to ``dst``; returns what was changed."""
    with np.errstate(all="ignore"):  # casts to narrower types overflow on purpose
        return _mutate(rng, src, dst, category)


def _mutate(rng, src, dst, category):
    if category == "container":
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read())
        return _mutate_container(rng, dst)
    members = _members(src)
    what = {"header": _mutate_header, "nudge": _mutate_nudge, "context": _mutate_context, "member": _mutate_member,
            "bytes": _mutate_bytes, "drop": _mutate_drop}[category](rng, members)
    _write(dst, members)
    return what


def make_sources(folder: str, real: str | None = None) -> list[str]:
    """Valid traces to mutate, written into ``folder``: a small synthetic trace of each kind, and (given the path of
    a real trace) its first 24 steps and 2 layers with every score array, as a trace of its own."""
    from .model import ModelShape, Trace
    from .synth import synthesize

    out = []
    for i, kind in enumerate(("random", "infllmv2", "nosa")):
        kw = {"kq": 12, "window": 4} if kind == "nosa" else ({"window": 4} if kind == "infllmv2" else {})
        t = synthesize(kind, 2, 2, 2, 30, 24, 700, seed=i, chunk_steps=16, **kw)
        out.append(os.path.join(folder, f"{kind}.nosatrace"))
        write_trace(out[-1], t)
    if real is not None:
        r = read_trace(real, 0, 24)
        h, layers = r.header, 2
        nb = int((r.context_len.max() - 1) // h.block_size) + 1
        m = h.model
        t = Trace.from_arrays(
            r.sel[:, :layers], r.context_len, block_size=h.block_size,
            model=ModelShape(layers, m.kv_heads, m.head_dim, m.dtype_bytes, m.q_heads, m.name),
            selection=h.selection, provenance=h.provenance, chunk_steps=16,
            agnostic_score=None if r.agnostic_score is None else r.agnostic_score[:layers, ..., :nb],
            qaware_score=None if r.qaware_score is None else r.qaware_score[:, :layers, ..., :nb],
            attn_mass=None if r.attn_mass is None else r.attn_mass[:, :layers, ..., :nb])
        out.append(os.path.join(folder, "real.nosatrace"))
        write_trace(out[-1], t)
    return out


def _same(a, b) -> bool:
    """Whether two read traces are the same trace (header, selections, context, scores; NaN equal to NaN)."""
    if a.header.to_dict() != b.header.to_dict():
        return False
    for name in ("sel", "context_len", "agnostic_score", "qaware_score", "attn_mass"):
        x, y = getattr(a, name), getattr(b, name)
        if (x is None) != (y is None) or (x is not None and not np.array_equal(x, y, equal_nan=x.dtype.kind == "f")):
            return False
    return True


def run(sources: list[str], cases: int, seed: int = 0, slow_s: float = 10.0) -> dict:
    """``cases`` mutations spread over ``sources`` and the categories; outcome counts and the failures.

    Every mutated file is judged twice: by :func:`nosasim.trace.read_trace` and by
    :func:`nosasim.trace.oracle.violation`, a second reading of docs/trace-format.md written apart from the reader.
    Outcomes: ``refused`` (both find it invalid), ``unchanged`` (both accept it and it reads as its source: the
    mutation changed nothing that matters, e.g. the provenance), ``read`` (both accept it and it is another valid
    trace). Failures: ``accepted invalid`` (the reader accepts what the oracle refuses), ``refused valid`` (the
    reader refuses what the oracle accepts), ``other`` (any other exception, a plain ValueError included) and ``slow`` (a read
    past ``slow_s``)."""
    from .oracle import violation

    rng = np.random.default_rng(seed)
    counts: dict[str, Counter] = {c: Counter() for c in CATEGORIES}
    failures = []
    originals = {src: read_trace(src) for src in sources}
    with tempfile.TemporaryDirectory() as tmp:
        dst = os.path.join(tmp, "mutated.nosatrace")
        for i in range(cases):
            category = CATEGORIES[i % len(CATEGORIES)]
            src = sources[(i // len(CATEGORIES)) % len(sources)]
            what = mutate(rng, src, dst, category)
            case = {"case": i, "category": category, "mutation": what, "source": os.path.basename(src)}
            t0 = time.perf_counter()
            error = trace = None
            try:
                trace = read_trace(dst)
            except TraceError as exc:  # the one documented error; a plain ValueError is a failure like any other
                error = str(exc)
            except Exception as exc:  # noqa: BLE001 - counting them is the point
                failures.append(dict(case, outcome="other", error=f"{type(exc).__name__}: {str(exc)[:200]}"))
                counts[category]["other"] += 1
                continue
            if time.perf_counter() - t0 > slow_s:
                failures.append(dict(case, outcome="slow"))
                counts[category]["slow"] += 1
                continue
            verdict = violation(dst)
            if trace is not None and verdict is not None:
                outcome = "accepted invalid"
                failures.append(dict(case, outcome=outcome, oracle=verdict[:200]))
            elif trace is None and verdict is None:
                outcome = "refused valid"
                failures.append(dict(case, outcome=outcome, error=error[:200]))
            elif trace is None:
                outcome = "refused"
            else:
                outcome = "unchanged" if _same(trace, originals[src]) else "read"
            counts[category][outcome] += 1
    return {"cases": cases, "seed": seed, "counts": {c: dict(v) for c, v in counts.items()}, "failures": failures}


def run_profiles(cases: int, seed: int = 0) -> dict:
    """``cases`` mutations of the bundled hardware profiles: one field (anywhere in the JSON, tables included) set to
    a value of another type or an extreme one; ``nosasim.hardware.Profile.from_dict`` must build a profile or raise
    ValueError. Outcome counts (``built``, ``refused``, ``other``) and the failures."""
    import copy

    from ..hardware import PROFILE_DIR, Profile

    rng = np.random.default_rng(seed)
    bases = [json.loads(p.read_text()) for p in sorted(PROFILE_DIR.glob("*.json"))]
    counts: Counter = Counter()
    failures = []
    for i in range(cases):
        d = copy.deepcopy(bases[i % len(bases)])
        path = _set_odd(rng, d)
        try:
            Profile.from_dict(d)
            counts["built"] += 1
        except ValueError:
            counts["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - counting them is the point
            counts["other"] += 1
            failures.append({"case": i, "field": ".".join(map(str, path)),
                             "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return {"cases": cases, "seed": seed, "counts": dict(counts), "failures": failures}
