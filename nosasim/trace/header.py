"""The JSON header of a selection trace: model shape, selection parameters, provenance.

Every field is checked when a header is built or parsed, so a trace that loads is one the
rest of nosasim can trust; a bad field raises ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nosasim.contract import Budget, BlockShape

FORMAT_NAME = "nosasim-trace"
FORMAT_VERSION = 1
METHODS = ("random", "infllmv2", "nosa", "import", "recorded", "reselect")
OPTIONAL_ARRAYS = ("agnostic_score", "qaware_score", "attn_mass")


class TraceError(ValueError):
    """A trace that breaks the format (docs/trace-format.md): the message names the member or field, what was
    expected and what was found. A ``ValueError``, so callers that catch bad input in general catch it too."""


def _req(d: dict, key: str, where: str) -> Any:
    if not isinstance(d, dict):
        raise TraceError(f"trace header: field '{where}' must be a JSON object, got {type(d).__name__}")
    if key not in d:
        raise TraceError(f"trace header: missing field '{where}.{key}'" if where else f"trace header: missing field '{key}'")
    return d[key]


# The format's limits. Block ids are int16 in the keyframes (``sel_key``), so a row holds at most 32,767 blocks
# (2M tokens at 64 per block); the other bounds keep every size the header implies far from what an int64 or the
# machine can hold, so an absurd header is refused before anything is allocated.
MAX_BLOCKS = 32767
LIMITS = {"block_size": 1 << 20, "steps": 1 << 31, "seqs": 1 << 20, "k": MAX_BLOCKS, "n_blocks": MAX_BLOCKS,
          "chunk_steps": 1 << 20, "model.layers": 4096, "model.kv_heads": 4096, "model.q_heads": 1 << 16,
          "model.head_dim": 1 << 16}
DTYPE_BYTES = (1, 2, 4)


def _int(value: Any, name: str, minimum: int = 0) -> int:
    if type(value) is not int:  # bool and float (1.0) are not integers here
        raise TraceError(f"trace header: field '{name}' must be an integer, got {value!r}")
    if value < minimum:
        raise TraceError(f"trace header: field '{name}' must be >= {minimum}, got {value}")
    top = LIMITS.get(name)
    if top is not None and value > top:
        raise TraceError(f"trace header: field '{name}' must be <= {top} (the format's limit), got {value}")
    return value


@dataclass(frozen=True)
class ModelShape:
    """The attention shape of the model a trace was recorded on (what sizes a KV block: see :meth:`block`)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    q_heads: int | None = None
    name: str = ""

    def __post_init__(self):
        _int(self.layers, "model.layers", 1)
        _int(self.kv_heads, "model.kv_heads", 1)
        _int(self.head_dim, "model.head_dim", 1)
        _int(self.dtype_bytes, "model.dtype_bytes", 1)
        if self.dtype_bytes not in DTYPE_BYTES:
            raise TraceError(f"trace header: field 'model.dtype_bytes' must be one of {DTYPE_BYTES}, got "
                             f"{self.dtype_bytes}")
        if not isinstance(self.name, str):
            raise TraceError(f"trace header: field 'model.name' must be a string, got {self.name!r}")
        if self.q_heads is not None:
            _int(self.q_heads, "model.q_heads", 1)
            if self.q_heads % self.kv_heads:
                raise TraceError(
                    f"trace header: field 'model.q_heads' ({self.q_heads}) must be a multiple of "
                    f"model.kv_heads ({self.kv_heads})"
                )

    def block(self, block_size: int) -> BlockShape:
        """One KV block of the recorded model, as the contract sizes it."""
        return BlockShape(self.head_dim, self.dtype_bytes, block_size)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelShape":
        return cls(
            layers=_req(d, "layers", "model"),
            kv_heads=_req(d, "kv_heads", "model"),
            head_dim=_req(d, "head_dim", "model"),
            dtype_bytes=_req(d, "dtype_bytes", "model"),
            q_heads=d.get("q_heads"),
            name=d.get("name", ""),
        )


# The header's names of the budget fields (the file format predates nosasim.contract.Budget's names).
_FILE_FIELDS = {"k": "k", "k_q": "k_q", "sink": "sink_blocks", "window": "window_blocks"}


@dataclass(frozen=True)
class SelectionParams:
    """How the selections were made: the method and the :class:`~nosasim.contract.Budget` it selected with.

    In the file the budget is the fields ``k``, ``k_q`` (``null`` when all ``k`` blocks are query-aware),
    ``sink_blocks`` and ``window_blocks``; imported selections force nothing (sink and window 0).
    """

    method: str
    budget: Budget

    def __post_init__(self):
        if self.method not in METHODS:
            raise TraceError(f"trace header: field 'selection.method' must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.budget, Budget):
            raise TraceError(f"trace header: field 'selection': expected a Budget, got {type(self.budget).__name__}")

    @property
    def k(self) -> int:
        return self.budget.k

    @property
    def k_q(self) -> int | None:
        """Query-aware blocks, ``None`` when all ``k`` are (as the file stores it)."""
        return None if self.budget.k_q == self.budget.k else self.budget.k_q

    @property
    def k_e(self) -> int:
        """Blocks filled by the query-agnostic score."""
        return self.budget.k_e

    def to_dict(self) -> dict:
        b = self.budget
        return {"method": self.method, "k": b.k, "k_q": self.k_q, "sink_blocks": b.sink, "window_blocks": b.window}

    @classmethod
    def from_dict(cls, d: dict) -> "SelectionParams":
        fields_ = {name: (d.get(key) if name == "k_q" else _req(d, key, "selection"))
                   for name, key in _FILE_FIELDS.items()}
        try:
            budget = Budget(**fields_)
        except ValueError as exc:
            name = str(exc).split(" ", 1)[0].rstrip(":")  # Budget's messages start with the field's name
            raise TraceError(f"trace header: field 'selection.{_FILE_FIELDS.get(name, name)}': {exc}") from None
        return cls(method=_req(d, "method", "selection"), budget=budget)


@dataclass(frozen=True)
class TraceHeader:
    """Everything about a trace except its arrays. ``steps``/``seqs``/``k``/``n_blocks`` describe the file."""

    block_size: int
    model: ModelShape
    selection: SelectionParams
    steps: int
    seqs: int
    k: int
    n_blocks: int
    chunk_steps: int = 128
    arrays: tuple[str, ...] = ()
    provenance: dict = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def __post_init__(self):
        _int(self.block_size, "block_size", 1)
        _int(self.steps, "steps", 1)
        _int(self.seqs, "seqs", 1)
        _int(self.k, "k", 1)
        _int(self.n_blocks, "n_blocks", 1)
        _int(self.chunk_steps, "chunk_steps", 1)
        if self.k != self.selection.k:
            raise TraceError(f"trace header: field 'k' ({self.k}) must equal field 'selection.k' "
                             f"({self.selection.k}): a selection holds at most k blocks")
        if self.version != FORMAT_VERSION or type(self.version) is not int:
            raise TraceError(f"trace header: field 'version' must be {FORMAT_VERSION}, got {self.version!r}")
        for name in self.arrays:
            if name not in OPTIONAL_ARRAYS:
                raise TraceError(f"trace header: field 'arrays' has unknown array {name!r}; known: {OPTIONAL_ARRAYS}")
        if not isinstance(self.provenance, dict):
            raise TraceError("trace header: field 'provenance' must be a JSON object")

    @property
    def n_chunks(self) -> int:
        return -(-self.steps // self.chunk_steps)

    def block_bytes(self) -> int:
        return self.model.block(self.block_size).block_bytes

    def replace(self, **changes) -> "TraceHeader":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "block_size": self.block_size,
            "model": dataclasses.asdict(self.model),
            "selection": self.selection.to_dict(),
            "steps": self.steps,
            "seqs": self.seqs,
            "k": self.k,
            "n_blocks": self.n_blocks,
            "chunk_steps": self.chunk_steps,
            "arrays": list(self.arrays),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TraceHeader":
        if not isinstance(d, dict):
            raise TraceError("trace header: must be a JSON object")
        if d.get("format") != FORMAT_NAME:
            raise TraceError(f"trace header: field 'format' must be {FORMAT_NAME!r}, got {d.get('format')!r}")
        if "version" not in d:
            raise TraceError("trace header: missing field 'version'")
        if type(d["version"]) is not int or d["version"] != FORMAT_VERSION:
            raise TraceError(
                f"trace header: field 'version' is {d['version']!r}; this nosasim reads version {FORMAT_VERSION}"
            )
        arrays = _req(d, "arrays", "")
        if not isinstance(arrays, list):
            raise TraceError("trace header: field 'arrays' must be a list")
        return cls(
            block_size=_req(d, "block_size", ""),
            model=ModelShape.from_dict(_req(d, "model", "")),
            selection=SelectionParams.from_dict(_req(d, "selection", "")),
            steps=_req(d, "steps", ""),
            seqs=_req(d, "seqs", ""),
            k=_req(d, "k", ""),
            n_blocks=_req(d, "n_blocks", ""),
            chunk_steps=_req(d, "chunk_steps", ""),
            arrays=tuple(arrays),
            provenance=_req(d, "provenance", ""),
        )
