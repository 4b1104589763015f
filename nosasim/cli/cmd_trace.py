"""``nosasim trace``: make, import and inspect selection traces."""

from __future__ import annotations

import json
import shlex
import sys


def register(sub) -> None:
    p = sub.add_parser("trace", help="make, import and inspect selection traces",
                       description="Make, import and inspect selection traces (format: docs/trace-format.md).")
    tsub = p.add_subparsers(dest="trace_command", metavar="ACTION")
    tsub.required = True

    s = tsub.add_parser("synth", help="generate a seeded synthetic trace",
                        description="Generate a seeded synthetic selection trace (it also stores the block "
                                    "scores, so `nosasim reselect` can re-select it under other budgets).")
    s.add_argument("--kind", required=True, choices=("random", "infllmv2", "nosa"),
                   help="random: no locality; infllmv2: query-aware churn with mean adjacent overlap --overlap; "
                        "nosa: --kq query-aware blocks plus k-kq blocks by a static query-agnostic score")
    s.add_argument("--layers", type=int, required=True, help="model layers")
    s.add_argument("--heads", type=int, required=True, help="KV heads per layer")
    s.add_argument("--seqs", type=int, default=1, help="sequences (default 1)")
    s.add_argument("--steps", type=int, required=True, help="decode steps")
    s.add_argument("--k", type=int, default=64, help="selected blocks per step, the tail included (default 64)")
    s.add_argument("--kq", type=int, default=None,
                   help="query-aware blocks incl. sink and window (nosa only; default 33 = 1 + 16 + 16)")
    s.add_argument("--overlap", type=float, default=None,
                   help="target mean adjacent overlap of the query-aware part (default 0.889, InfLLM-V2 on PG19)")
    s.add_argument("--context", type=int, required=True, help="prompt length in tokens")
    s.add_argument("--context-spread", type=int, default=0,
                   help="draw each sequence's prompt length from [context - spread, context] (default 0)")
    s.add_argument("--head-dim", type=int, default=64, help="head dimension recorded in the header (default 64)")
    s.add_argument("--block-size", type=int, default=64, help="tokens per block (default 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--generator", type=int, default=2, choices=(1, 2),
                   help="generator version: 2 (default) keeps each block's score across steps and redraws a share "
                        "of them, so re-selecting at another k keeps the locality; 1 swaps a share of the top set "
                        "with scores drawn anew each step (the traces of earlier releases, bit for bit)")
    s.add_argument("-o", "--output", required=True, help="output trace file")
    s.set_defaults(func=_synth)

    i = tsub.add_parser("import", help="import selections from a plain numpy .npz file",
                        description="Import a .npz with 'sel' [steps, layers, heads, k] or [steps, layers, heads, "
                                    "seqs, k] (-1 padded) and 'context_len' [steps] or [steps, seqs].")
    i.add_argument("file", help="input .npz")
    i.add_argument("-o", "--output", required=True, help="output trace file")
    i.add_argument("--block-size", type=int, default=64, help="tokens per block (default 64)")
    i.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    i.add_argument("--dtype-bytes", type=int, default=2, help="bytes per KV element (default 2, bf16)")
    i.add_argument("--q-heads", type=int, default=None, help="query heads (optional)")
    i.add_argument("--k", type=int, default=None, help="selection budget (default: the array's last dimension)")
    i.add_argument("--name", default="", help="model name for the header")
    i.set_defaults(func=_import)

    n = tsub.add_parser("info", help="shape, parameters, provenance, overlap per layer, size",
                        description="Print a trace's shape, selection parameters, provenance, mean adjacent "
                                    "overlap per layer and size on disk.")
    n.add_argument("file", help="trace file")
    n.add_argument("--json", action="store_true", help="print one JSON object")
    n.set_defaults(func=_info)


def _command_line() -> str:
    return "nosasim " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _synth(args) -> int:
    from ..trace import write_trace
    from ..trace.synth import synthesize

    tr = synthesize(args.kind, args.layers, args.heads, args.seqs, args.steps, args.k, args.context, kq=args.kq,
                    overlap=args.overlap, seed=args.seed, block_size=args.block_size, head_dim=args.head_dim,
                    context_spread=args.context_spread, command=_command_line(), progress=True,
                    generator=args.generator)
    size = write_trace(args.output, tr)
    print(f"wrote {args.output}: {tr.steps} steps x {tr.layers} layers x {tr.heads} heads x {tr.seqs} seqs, "
          f"k={tr.k}, {size / 1e6:.2f} MB")
    return 0


def _import(args) -> int:
    from ..trace import write_trace
    from ..trace.importer import import_npz

    tr = import_npz(args.file, block_size=args.block_size, head_dim=args.head_dim, dtype_bytes=args.dtype_bytes,
                    k=args.k, q_heads=args.q_heads, name=args.name, command=_command_line())
    size = write_trace(args.output, tr)
    print(f"wrote {args.output}: {tr.steps} steps x {tr.layers} layers x {tr.heads} heads x {tr.seqs} seqs, "
          f"k={tr.k}, {size / 1e6:.2f} MB")
    return 0


def _info(args) -> int:
    from ..trace.stats import summarize

    info = summarize(args.file, progress=True)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    sh, sel = info["shape"], info["selection"]
    print(f"trace      {info['path']} (format v{info['version']})")
    print(f"shape      {sh['steps']} steps x {sh['layers']} layers x {sh['kv_heads']} KV heads x {sh['seqs']} seqs, "
          f"k={sh['k']}, block {info['block_size']} tokens, {info['n_blocks']} blocks")
    m = info["model"]
    print(f"model      {m['name'] or '-'}: head_dim {m['head_dim']}, {m['dtype_bytes']} bytes/element")
    print(f"selection  {sel['method']}: k={sel['k']} k_q={sel['k_q']} sink={sel['sink_blocks']} "
          f"window={sel['window_blocks']}; mean {info['mean_selected_blocks']:.1f} complete blocks selected")
    print(f"context    first step {info['context_len']['first'][:4]}, last {info['context_len']['last'][:4]}")
    print(f"arrays     {', '.join(info['arrays']) or '(selections only)'}")
    prov = info["provenance"]
    print("provenance " + ", ".join(f"{k}={v}" for k, v in prov.items() if not isinstance(v, (dict, list)))[:400])
    ov = info["overlap_per_layer"]
    print(f"overlap    mean {info['overlap_mean']:.3f}; per layer: " + " ".join(f"{x:.3f}" for x in ov))
    print(f"size       {info['size_on_disk_bytes'] / 1e6:.2f} MB on disk, of which selections "
          f"{info['selection_bytes'] / 1e6:.3f} MB: {info['compression_ratio_vs_raw_int16']:.1f}x smaller than the raw "
          f"int16 selection array ({info['raw_int16_selection_bytes'] / 1e6:.2f} MB)")
    return 0
