"""Selection traces: format v1 (docs/trace-format.md), reading, writing, validation.

Generators live in :mod:`nosasim.trace.synth`, the npz importer in :mod:`nosasim.trace.importer`,
statistics in :mod:`nosasim.trace.stats`.
"""

from .header import FORMAT_VERSION, ModelShape, SelectionParams, TraceError, TraceHeader
from .io import TraceReader, load, read_trace, write_trace
from .model import Trace, tails_of

__all__ = [
    "FORMAT_VERSION", "ModelShape", "SelectionParams", "TraceError", "TraceHeader", "Trace", "TraceReader",
    "load", "read_trace", "write_trace", "tails_of",
]
