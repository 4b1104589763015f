"""Provenance of an output: which nosasim, trace file and hardware profile produced it.

Every JSON output carries it, so a number found later in a file or a pipeline can be traced back to its inputs.
No date or host is included: the same inputs give the same output.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def provenance(trace_path: str | Path | None = None, profile: str | None = None) -> dict:
    """``{"nosasim": version, "trace": path, "trace_sha256": ..., "profile": name, "profile_device": ...}`` for
    the inputs given."""
    from nosasim import __version__

    out: dict = {"nosasim": __version__}
    if trace_path is not None:
        out["trace"] = str(trace_path)
        out["trace_sha256"] = file_sha256(trace_path)
    if profile is not None:
        from nosasim.hardware import load_profile

        p = load_profile(profile)
        out["profile"] = p.name
        out["profile_device"] = p.device
    return out
