"""Model shapes (presets and custom) and the one validated configuration of a replay.

A :class:`ModelSpec` is everything the cost and memory models, and the GPU runtime, need about a decoder: its GEMM
shapes, attention shape and vocabulary. :class:`ReplayConfig` is the whole configuration of one prediction
(variant, budgets, cache, batch); it is validated once when built and passed whole, and the help text of its fields
is the CLI's help. Its budget fields are the user's request, filled from the trace by ``nosasim.sim.resolve``; the
resolved, validated value is :attr:`ReplayConfig.budget`, a :class:`nosasim.contract.Budget`.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from nosasim.contract import KV_DTYPES, POLICIES, VARIANTS, BlockShape, Budget, choice, count

PRESET_DIR = Path(__file__).with_name("presets")
_SHAPE_INTS = ("layers", "q_heads", "kv_heads", "head_dim", "hidden", "intermediate", "vocab", "dtype_bytes")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A Llama-style decoder: GQA attention, SwiGLU MLP, RMSNorm, optional tied LM head."""

    name: str
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2
    tie_embeddings: bool = False
    source: str = ""

    def __post_init__(self):
        for f in _SHAPE_INTS:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"model {self.name!r} field {f}: expected a positive integer, got {v!r}")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"model {self.name!r}: q_heads ({self.q_heads}) must be a multiple of kv_heads "
                             f"({self.kv_heads}) for grouped-query attention")

    @property
    def layer_params(self) -> int:
        attn = self.hidden * (self.q_heads + 2 * self.kv_heads) * self.head_dim + self.q_heads * self.head_dim * self.hidden
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.layer_params + self.hidden + embed * (1 if self.tie_embeddings else 2)

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.q_heads // self.kv_heads

    def weight_bytes(self, dtype_bytes: int | None = None) -> int:
        return self.params * (self.dtype_bytes if dtype_bytes is None else dtype_bytes)

    def block(self, block_size: int = 64, kv_dtype: str | None = None, layout: str = "joint") -> BlockShape:
        """One KV block of one KV head (the unit the cache holds and moves), stored in ``kv_dtype`` (default: the
        model's own element type)."""
        dt = self.dtype_bytes if kv_dtype is None else KV_DTYPES[choice("kv_dtype", kv_dtype, KV_DTYPES)]
        return BlockShape(self.head_dim, dt, block_size, layout)

    def block_bytes(self, block_size: int = 64) -> int:
        """Bytes of one block of K plus V for one KV head in the model's element type."""
        return self.block(block_size).block_bytes


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _from_dict(d: dict, where: str) -> ModelSpec:
    known = {f.name for f in fields(ModelSpec)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"model {where}: unknown field(s) {unknown}; expected some of {sorted(known)}")
    missing = [f.name for f in fields(ModelSpec) if f.default is MISSING and f.name not in d and f.name != "name"]
    if missing:
        raise ValueError(f"model {where}: missing field(s) {', '.join(missing)}")
    return ModelSpec(**{"name": where, **d})


def load_model(spec: str) -> ModelSpec:
    """A preset name (``llama3-8b``), a JSON file, or ``key=value,...`` with every shape field (a custom shape)."""
    if "=" in spec:
        items = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
        parsed = {}
        for k, v in items.items():
            k = k.strip()
            if k in _SHAPE_INTS:
                try:
                    parsed[k] = int(v)
                except ValueError:
                    raise ValueError(f"--model {k}: expected an integer, got {v!r}") from None
            elif k == "tie_embeddings":
                parsed[k] = v.strip().lower() in ("1", "true", "yes")
            else:
                parsed[k] = v
        return _from_dict(parsed, parsed.get("name", "custom"))
    path = Path(spec)
    if path.suffix == ".json":
        if not path.exists():
            raise ValueError(f"--model: no such file {spec!r}")
        d = json.loads(path.read_text())
        return _from_dict(d, d.get("name", path.stem))
    preset = PRESET_DIR / f"{spec}.json"
    if not preset.exists():
        raise ValueError(f"--model: unknown preset {spec!r}; expected one of {presets()}, a JSON file, or "
                         f"layers=..,q_heads=..,kv_heads=..,head_dim=..,hidden=..,intermediate=..,vocab=..")
    return _from_dict(json.loads(preset.read_text()), spec)


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """One prediction's configuration. ``None`` budgets are filled from the trace by ``nosasim.sim.resolve``."""

    profile: str = _opt("h100-pcie5", "hardware profile: a bundled name or a profile JSON path")
    model: str | None = _opt(None, "model shape: preset name, JSON file, or key=value list "
                                   "(default: the trace's model if it is a preset)")
    variant: str = _opt("nosa", "attention variant", choices=VARIANTS)
    batch: int = _opt(1, "sequences decoded together (assembled from the trace's sequences; see docs/simulator.md)")
    k: int | None = _opt(None, "selected blocks per row, tail included (default: the trace's k)")
    k_q: int | None = _opt(None, "query-aware blocks incl. sink and window (default: infllmv2 k, nosa the trace's "
                                 "or sink + window + 16)", dest="kq")
    capacity: int | None = _opt(None, "GPU cache slots for complete blocks per row, >= k - 1 (default: k - 1, "
                                      "the most complete blocks a selection holds; k for an imported trace)")
    policy: str = _opt("prev", "cache keep policy", choices=POLICIES)
    microbatches: int = _opt(1, "split the batch so one micro-batch's transfers overlap another's compute (1: none)")
    split_attention: bool = _opt(False, "attend the resident blocks while the misses copy, then the copied ones, and "
                                        "merge the two by log-sum-exp (transfers overlap even one micro-batch)")
    sink: int = _opt(1, "always-selected leading blocks, used when re-selecting from scores")
    window: int = _opt(16, "always-selected trailing blocks, tail included, used when re-selecting")
    kv_layout: str = _opt("joint", "host KV layout: joint = K and V of a block are one transfer chunk (as "
                                   "runtime/kvstore.py stores them), split = separate K and V chunks",
                          choices=("joint", "split"))
    kv_dtype: str = _opt("bf16", "element type of the offloaded KV (host store and GPU block cache): fp8 halves "
                                 "the bytes of every block moved and attended", choices=tuple(KV_DTYPES))
    ckey_dtype: str = _opt("bf16", "element type of the compressed keys that selection scores (InfLLM-V2, NOSA): fp8 "
                                   "(e4m3) halves the bytes scoring reads and their GPU memory, at some cost to the "
                                   "scores (analysis/results/ckey_precision-smollm2.json)", choices=tuple(KV_DTYPES))

    def __post_init__(self):
        choice("variant", self.variant, VARIANTS)
        choice("policy", self.policy, POLICIES)
        choice("kv_layout", self.kv_layout, ("joint", "split"))
        choice("kv_dtype", self.kv_dtype, tuple(KV_DTYPES))
        if self.kv_dtype != "bf16" and self.variant == "dense":
            raise ValueError(f"kv_dtype: {self.kv_dtype!r} is for the offloaded store; dense keeps its KV in bf16")
        choice("ckey_dtype", self.ckey_dtype, tuple(KV_DTYPES))
        if self.ckey_dtype != "bf16" and self.variant not in ("infllmv2", "nosa"):
            raise ValueError(f"ckey_dtype: {self.ckey_dtype!r} is for the compressed keys InfLLM-V2 and NOSA score; "
                             f"{self.variant!r} keeps none")
        count("batch", self.batch, 1)
        count("microbatches", self.microbatches, 1)
        if not isinstance(self.split_attention, bool) or (self.split_attention and self.variant == "dense"):
            raise ValueError(f"split_attention: expected a bool, and True only for an offloaded variant, got "
                             f"{self.split_attention!r} with {self.variant!r}")
        if self.microbatches > self.batch:
            raise ValueError(f"microbatches: expected at most batch ({self.batch}), got {self.microbatches}")
        if self.variant == "dense":
            return  # dense needs no budgets
        if self.k is None:
            # Resolved against the trace by nosasim.sim.resolve; check what is given, Budget checks the whole.
            for name in ("k_q", "capacity"):
                if getattr(self, name) is not None:
                    count(name, getattr(self, name), 0)
            count("sink", self.sink, 0)
            count("window", self.window, 0)
            return
        b = Budget.for_variant(self.variant, self.k, self.k_q, self.sink, self.window, self.capacity)
        object.__setattr__(self, "k_q", b.k_q)
        object.__setattr__(self, "capacity", b.capacity)

    @property
    def offloaded(self) -> bool:
        return self.variant != "dense"

    @property
    def budget(self) -> Budget | None:
        """The validated budget (None for dense)."""
        if not self.offloaded:
            return None
        if self.k is None:
            raise RuntimeError("ReplayConfig.budget read before nosasim.sim.resolve filled k from the trace: a bug")
        return Budget(self.k, self.k_q, self.sink, self.window, self.capacity)

    def block(self, model: ModelSpec, block_size: int = 64) -> BlockShape:
        """The KV block this configuration's cache holds and its link moves."""
        return model.block(block_size, kv_dtype=None if self.kv_dtype == "bf16" else self.kv_dtype,
                           layout=self.kv_layout)

    def ckey_bytes(self, model: ModelSpec) -> int:
        """Bytes of one element of the compressed keys (the model's element type unless ``ckey_dtype`` is fp8)."""
        return model.dtype_bytes if self.ckey_dtype == "bf16" else KV_DTYPES[self.ckey_dtype]


def config_fields():
    """(name, default, help, extra metadata) of every ReplayConfig field, for building CLI options."""
    return [(f.name, f.default, f.metadata["help"], f.metadata) for f in fields(ReplayConfig)]
