"""Sweeps on a Ray cluster: the same cache groups as the local pool, one Ray task each.

The trace travels once, as bytes in Ray's object store (nodes need not share a file system); each worker
process writes it to a temporary file the first time it sees it and reads it once. Tasks return their rows as
they finish (in any order); ``nosasim.sweep.run_sweep`` sorts them into grid order, so the CSV is byte for byte
the local one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

_LOADED: dict = {}  # per worker process: trace digest -> Trace


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--ray: the 'ray' package is not installed; install the extra: pip install 'nosasim[ray]'") \
            from None
    return ray


def _trace(digest: str, data: bytes):
    """The sweep's trace in this worker process, read from its bytes once."""
    if digest not in _LOADED:
        from nosasim.trace import read_trace

        _LOADED.clear()  # one sweep's trace at a time
        fd, path = tempfile.mkstemp(suffix=".nosatrace")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            _LOADED[digest] = read_trace(path)
        finally:
            os.unlink(path)
    return _LOADED[digest]


def _run(digest: str, data: bytes, cfgs: list) -> list[dict]:
    from nosasim.sweep import run_group

    return run_group(cfgs, trace=_trace(digest, data))


def _probe(address: str | None, timeout_s: float = 5.0) -> None:
    """Refuse a HOST:PORT (or ray://HOST:PORT) nothing listens on in one line: Ray itself retries such an address
    for minutes. ``auto`` and None are Ray's to resolve (it fails fast when no cluster runs)."""
    if not address or address == "auto":
        return
    import socket

    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--ray: expected 'auto', HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ValueError(f"--ray: nothing answers at {hostport!r} ({exc.strerror or exc}); give the address of a "
                         f"running Ray cluster, or no address to start a local one") from None


def ray_groups(trace_path: str, work: list[list], address: str | None):
    """Yield each group's rows as its Ray task finishes. ``address``: an existing cluster ("auto", "HOST:PORT",
    "ray://HOST:PORT"); None starts a local one for this sweep and stops it at the end."""
    ray = _ray()
    data = Path(trace_path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    started = not ray.is_initialized()
    if started:
        _probe(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        except ConnectionError as exc:
            raise ValueError(f"--ray: cannot reach a Ray cluster at {address!r}: {exc}") from None
    try:
        task = ray.remote(_run)
        ref = ray.put(data)
        pending = [task.remote(digest, ref, g) for g in work]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        if started:
            ray.shutdown()
