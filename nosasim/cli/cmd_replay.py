"""``nosasim replay``: predict one configuration's step time, throughput, breakdown and memory from a trace."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nosasim.models import ReplayConfig, config_fields

def _samples() -> Path:
    """The bundled sample traces: ``nosasim/traces/samples`` in an installed wheel, ``traces/samples`` in the
    repository (run from the tree, or installed in editable mode, where ``nosasim.traces`` maps to ``traces/``)."""
    here = Path(__file__).resolve().parents[1]
    installed = here / "traces" / "samples"
    return installed if installed.is_dir() else here.parent / "traces" / "samples"


SAMPLES = _samples()


def add_config_options(parser: argparse.ArgumentParser, as_lists: tuple[str, ...] = (), skip: tuple[str, ...] = ()):
    """One option per ReplayConfig field, its help taken from the field, so CLI and config never drift apart.
    Fields in ``as_lists`` take comma-separated lists (sweeps)."""
    for name, default, help_, meta in config_fields():
        if name in skip:
            continue
        dest = meta.get("dest", name)
        flag = "--" + dest.replace("_", "-")
        if isinstance(default, bool):  # a switch; a sweep lists it as no,yes
            if name in as_lists:
                parser.add_argument(flag, dest=name, type=_list_of_bools, default=None,
                                    help=f"{help_}; comma-separated list of no/yes (default no)")
            else:
                parser.add_argument(flag, dest=name, action="store_true", help=help_)
            continue
        kind = int if name in ("batch", "k", "k_q", "capacity", "microbatches", "sink", "window") else str
        if name in as_lists:
            parser.add_argument(flag, dest=name, type=_list_of(kind, meta.get("choices")), default=None,
                                help=f"{help_}; comma-separated list" + ("" if default is None else f" (default {default})"))
        else:
            parser.add_argument(flag, dest=name, type=kind, default=default, choices=meta.get("choices"),
                                help=help_ if default is None else f"{help_} (default {default})")


def _list_of_bools(text: str) -> list[bool]:
    words = {"0": False, "no": False, "false": False, "1": True, "yes": True, "true": True}
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    if not values or any(v not in words for v in values):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of no/yes, got {text!r}")
    return [words[v] for v in values]


def _list_of(kind, choices):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}")
        bad = [v for v in values if choices and v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected values from {choices}, got {text!r}")
        return values

    return parse


def config_from_args(args, **override) -> ReplayConfig:
    values = {name: getattr(args, name) for name, *_ in config_fields() if hasattr(args, name)}
    values.update(override)
    return ReplayConfig(**values)


def default_trace() -> Path:
    """The bundled sample score trace (the first one that carries scores, else the first trace)."""
    from nosasim.trace import TraceReader

    found = sorted(SAMPLES.glob("*.nosatrace"))
    if not found:
        raise ValueError(f"TRACE: none given and no sample trace in {SAMPLES}")
    for path in found:
        with TraceReader(path) as reader:
            if "qaware_score" in reader.header.arrays:
                return path
    return found[0]


def load_trace(path):
    from nosasim.trace import read_trace

    path = Path(path) if path else default_trace()
    if not path.exists():
        raise ValueError(f"TRACE: no such file {str(path)!r}")
    return read_trace(path)


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def format_prediction(pred) -> str:
    cfg = pred.config
    lines = [
        f"{cfg['variant']} on {cfg['profile']}, model {cfg['model']}, batch {cfg['batch']}, "
        f"micro-batches {cfg['microbatches']}" + ("" if cfg["variant"] == "dense" else
                                                 f", k={cfg['k']} k_q={cfg['k_q']} C={cfg['capacity']} "
                                                 f"policy={cfg['policy']}"),
        f"  step time (median of {pred.steps} steps)  {pred.step_time_s * 1e3:10.3f} ms",
        f"  floor (bytes and FLOPs at peak)  {pred.floor_s * 1e3:10.3f} ms   x floor {pred.x_floor:.2f}, "
        f"{_floor_terms(pred.floor)}",
        f"  throughput                       {pred.tokens_per_s:10.1f} tokens/s",
        f"  hit rate                         {'-' if pred.hit_rate is None else f'{pred.hit_rate:10.4f}':>10}",
        f"  H2D per step                     {pred.h2d_bytes_per_step / 2**20:10.2f} MiB",
        f"  GPU memory                       {gib(pred.gpu_memory_bytes):>14}   (max batch {pred.max_batch})",
    ]
    if cfg["variant"] != "dense":
        of = f" of {gib(pred.host_memory_bytes)}" if pred.host_memory_bytes else " (the profile gives no host size)"
        flag = "   DOES NOT FIT the host's memory" if pred.host_fits is False else ""
        lines.append(f"  host memory (pinned KV)          {gib(pred.host_kv_bytes):>14}{of}{flag}")
    lines += [f"  outside calibration: {note}" for note in pred.outside_calibration]
    lines += [
        "  breakdown of the median step:",
    ]
    for name, sec in pred.breakdown.items():
        lines.append(f"    {name:<12} {sec * 1e3:10.3f} ms  {100 * sec / pred.step_time_s:5.1f}%")
    return "\n".join(lines)


def _floor_terms(f: dict) -> str:
    """The floor's terms in words: which one sets it, and how device and link combine."""
    how = "max(device, link): transfers overlap compute" if f["overlapped"] else "device + link: transfers serialise"
    return (f"{f['bound']}-bound; HBM {f['hbm_bytes'] / 2**30:.2f} GiB {f['hbm_s'] * 1e3:.2f} ms, FLOPs "
            f"{f['flop_s'] * 1e3:.2f} ms, link {f['link_s'] * 1e3:.2f} ms; {how}")


def _run(args) -> int:
    from nosasim.sim import predict

    from nosasim.provenance import provenance

    trace = load_trace(args.trace)
    pred = predict(trace, config_from_args(args), method=args.method)
    if args.json:
        out = dict(pred.to_json(), provenance=provenance(args.trace or default_trace(), pred.config["profile"]))
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        print(format_prediction(pred))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("replay", help="predict step time, throughput and memory of one configuration",
                              description=__doc__)
    p.add_argument("trace", nargs="?", help="trace file (default: the bundled sample score trace)")
    add_config_options(p)
    p.add_argument("--method", choices=("analytic", "des"), default="analytic",
                   help="analytic fast path or the SimPy event model (same schedule; default analytic)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_run)
