"""The one script each device call runs: GPU tests, gather benchmark, decode benchmark, calibration, peer baseline.

``PYTHONPATH=. python -m runtime.device_suite --out $OUT --stages tests,gather,decode,calib,peer --budget 540``;
a stage ``bench:NAME`` runs ``benchmarks/bench_NAME.py``, and ``--e2e`` picks end-to-end configurations by name.
Every stage writes its JSON under ``--out`` as soon as it ends (a stage that fails or runs out of time loses only
itself), and a short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

from .timing import environment, write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--stages", default="tests,gather,decode,calib,peer")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; later stages are skipped past it")
    ap.add_argument("--contexts", default="16384,32768")
    ap.add_argument("--batches", default="16,0,64,32,8", help="0: each variant's largest batch")
    ap.add_argument("--peer", default="8,16384")
    ap.add_argument("--e2e", default="", help="comma-separated names or glob patterns (nosa-8k-*): run only the "
                                              "matching e2e configurations, in the order the patterns name them")
    ap.add_argument("--gather-json", default=None, help="an earlier gather result for the profile's link tables")
    ap.add_argument("--model", default="llama3-8b", help="model shape to calibrate (preset, JSON file or key=value)")
    ap.add_argument("--test-workers", type=int, default=1, help="pytest-xdist workers for the tests stage")
    ap.add_argument("--test-timeout", type=float, default=240.0, help="seconds for the tests stage")
    ap.add_argument("--profile-name", default=None,
                    help="name of the calibrated profile (default: from the device, e.g. h200-pcie5)")
    a = ap.parse_args(argv)
    t0 = time.time()
    os.makedirs(a.out, exist_ok=True)
    summary = {"env": environment(), "stages": {}}
    lines = []
    left = lambda: a.budget - (time.time() - t0)  # noqa: E731
    stages = a.stages.split(",")
    gather = None
    for stage in stages:
        if left() < 20:
            summary["stages"][stage] = "skipped: budget"
            continue
        ts = time.time()
        try:
            if stage == "tests":
                files = sorted(f"tests/{f}" for f in os.listdir("tests")
                               if f.startswith("test_runtime_") or (f.startswith("test_") and "kernel" in f))
                par = ["-n", str(a.test_workers)] if a.test_workers > 1 else []  # pytest-xdist: compile in parallel
                p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                    *par, *files], capture_output=True, text=True,
                                   timeout=max(30, min(a.test_timeout, left() - 10)))
                with open(os.path.join(a.out, "gpu_tests.log"), "w") as f:
                    f.write(p.stdout + p.stderr)
                tail = [ln for ln in p.stdout.splitlines() if ln.strip()][-12:]
                summary["stages"][stage] = {"rc": p.returncode, "tail": tail}
                lines += ["GPU tests rc=%d" % p.returncode] + tail[-6:]
            elif stage.startswith("bench:"):  # any benchmarks/bench_<name>.py with run(out) and table(res)
                import importlib
                sys.path.insert(0, os.getcwd())
                name = stage.split(":", 1)[1]
                mod = importlib.import_module(f"benchmarks.bench_{name}")
                lines.append(mod.table(mod.run(os.path.join(a.out, f"{name}.json"))))
            elif stage == "gather":
                sys.path.insert(0, os.getcwd())
                from benchmarks import bench_gather
                gather = bench_gather.run(os.path.join(a.out, "gather.json"), experiments=False)
                lines.append(bench_gather.table(gather))
            elif stage == "decode":
                from benchmarks import bench_decode
                res = bench_decode.run(os.path.join(a.out, "decode.json"),
                                       contexts=tuple(int(x) for x in a.contexts.split(",")),
                                       batches=tuple(int(x) for x in a.batches.split(",")),
                                       budget_s=max(30, left() - 170))
                lines.append(bench_decode.table(res))
            elif stage == "calib":
                from . import calibrate
                cal = calibrate.run_all(a.model)
                write_json(os.path.join(a.out, "calibration.json"), {"env": environment(), **cal})
                for path in (os.path.join(a.out, "gather.json"), a.gather_json):
                    if gather is None and path and os.path.exists(path):
                        gather = json.load(open(path))
                if gather is not None:
                    from benchmarks import bench_overlap  # isolated: a gather beside a GEMM chain
                    overlap = bench_overlap.run(os.path.join(a.out, "overlap.json"))
                    name = a.profile_name or calibrate.profile_name(summary["env"].get("device", ""))
                    prof = calibrate.build_profile(name, cal, gather, overlap)
                    from nosasim.hardware import Profile
                    Profile.from_dict(prof)  # the profile must load in nosasim, or this stage fails
                    write_json(os.path.join(a.out, f"{name}.json"), prof)
                    lines.append(f"profile: hbm {prof['hbm_Bps'] / 1e12:.2f} TB/s, mm {prof['matmul_flops'] / 1e12:.0f} "
                                 f"TFLOP/s, launch {prof['launch_s'] * 1e6:.1f} us, h2d peak "
                                 f"{prof['h2d']['peak_Bps'] / 1e9:.1f} GB/s lat {prof['h2d']['latency_s'] * 1e6:.1f} us")
                for e in cal.get("offload_phases", []):
                    lines.append(f"offload phases {e['variant']} B={e['batch']} ctx={e['context']}: selection "
                                 f"{e['selection_s'] * 1e6:.0f} us, block table {e['block_table_s'] * 1e6:.0f} us, "
                                 f"attend (all hits) {e['attend_all_hits_s'] * 1e6:.0f} us per layer")
            elif stage == "e2e":
                from . import e2e
                from fnmatch import fnmatchcase
                pats = [p for p in a.e2e.split(",") if p]
                # In the order the patterns name them: a run cut short by the budget loses the last ones named.
                rank = lambda c: min((i for i, p in enumerate(pats) if fnmatchcase(c.name, p)), default=-1)  # noqa: E731
                pick = sorted((c for c in e2e.CONFIGS if not pats or rank(c) >= 0), key=rank)
                res = e2e.run(os.path.join(a.out, "e2e.json"), budget_s=max(30, left() - 30), configs=pick)
                lines.append(e2e.table(res))
            elif stage.startswith("profile:"):  # kernel-by-kernel GPU time of e2e configurations' steps
                from . import e2e
                from .model import Weights
                import torch
                names = stage.split(":", 1)[1].split("+")
                w = Weights.random(e2e.PRESETS["llama3-8b"], torch.bfloat16, "cuda", 0)
                stores, traces, profs = {}, {}, []
                for c in e2e.CONFIGS:
                    if c.name in names:
                        profs.append(e2e.profile_config(c, w, stores, traces))
                        p = profs[-1]
                        lines.append(f"profile {p['name']}: {p['total_us_per_step'] / 1e3:.2f} ms of kernels, "
                                     f"{p['launches_per_step']:.0f} launches per step; top:")
                        lines += [f"  {k['us_per_step'] / 1e3:7.3f} ms {k['calls_per_step']:6.0f}x {k['kernel'][:90]}"
                                  for k in p["kernels"][:14]]
                write_json(os.path.join(a.out, "profile.json"), {"env": environment(), "profiles": profs})
                del w, stores
            elif stage == "calib-phases":  # the offloaded phases alone (selection, block table, attend glue)
                from . import calibrate
                from nosasim.models import load_model
                shape = load_model(a.model)
                ph = calibrate.offload_phases(shape, variant="infllmv2") + calibrate.offload_phases(shape, variant="nosa")
                write_json(os.path.join(a.out, "phases.json"), {"env": environment(), "offload_phases": ph})
                lines += [f"phases {e['variant']} B={e['batch']} ctx={e['context']}: selection {e['selection_s'] * 1e6:.0f}"
                          f" us, attend {e['attend_all_hits_s'] * 1e6:.0f} us" for e in ph if e["batch"] in (32, 128)]
            elif stage == "calib-ckey8":  # the phases with fp8 compressed keys (their selection tables)
                from . import calibrate
                from nosasim.models import load_model
                ph = calibrate.ckey_fp8_phases(load_model(a.model))
                write_json(os.path.join(a.out, "phases-ckey8.json"), {"env": environment(), "offload_phases": ph})
                lines += [f"phases fp8 keys {e['variant']} B={e['batch']} ctx={e['context']}: selection "
                          f"{e['selection_s'] * 1e6:.0f} us" for e in ph if e["batch"] in (32, 128, 192)]
            elif stage == "calib-fill":  # attention in the runtime's layout, every 16 batches; phases between rows
                from . import calibrate
                from nosasim.models import load_model
                shape = load_model(a.model)
                fill = {"sparse_attention": calibrate.sparse_attention(shape, calibrate.LAYOUT_BATCHES, layout="runtime"),
                        "sparse_attention_fp8": calibrate.sparse_attention(shape, calibrate.LAYOUT_BATCHES, fp8=True,
                                                                           layout="runtime")}
                write_json(os.path.join(a.out, "calib-fill.json"), {"env": environment(), **fill})
                fill["offload_phases"] = calibrate.fill_phases(shape)
                write_json(os.path.join(a.out, "calib-fill.json"), {"env": environment(), **fill})
                lines.append("attention (runtime layout), k=64: " + ", ".join(
                    f"B{e['batch']} {e['seconds'] * 1e6:.0f}/{f['seconds'] * 1e6:.0f}us"
                    for e, f in zip(fill["sparse_attention"], fill["sparse_attention_fp8"]) if e["k_blocks"] == 64))
                lines += [f"phases {e['variant']} {e['ckey_dtype']} B={e['batch']} ctx={e['context']}: selection "
                          f"{e['selection_s'] * 1e6:.0f} us" for e in fill["offload_phases"]]
            elif stage == "calib-select":  # every selection phase again (after a change to the selection kernels)
                from . import calibrate
                from nosasim.models import load_model
                shape = load_model(a.model)
                ph = calibrate.select_phases(shape)
                write_json(os.path.join(a.out, "phases-select.json"), {"env": environment(), "offload_phases": ph})
                lines += [f"phases {e['variant']} {e['ckey_dtype']} B={e['batch']} ctx={e['context']}: selection "
                          f"{e['selection_s'] * 1e6:.0f} us" for e in ph if e["batch"] in (32, 128)]
            elif stage == "calib-walk":  # one calibration table alone (the split attention pass's walk)
                from . import calibrate
                from nosasim.models import load_model
                walk = calibrate.sparse_attention_walk(load_model(a.model))
                write_json(os.path.join(a.out, "walk.json"), {"env": environment(), "sparse_attention_walk": walk})
                lines.append("walk: " + ", ".join(f"B{e['batch']}/k{e['k_blocks']} {e['seconds'] * 1e6:.0f}us"
                                                  for e in walk[::3]))
            elif stage == "peer":
                from .peer import transformers_generate
                b, c = (int(x) for x in a.peer.split(","))
                peer = transformers_generate(b, c)
                write_json(os.path.join(a.out, "peer.json"), {"env": environment(), **peer})
                lines.append(f"transformers generate static B={b} ctx={c}: {peer['per_token_step_ms']:.2f} ms/step "
                             f"{peer['tokens_per_s']:.1f} tok/s")
            summary["stages"].setdefault(stage, "ok")
        except Exception as exc:  # noqa: BLE001 - one stage's failure must not lose the others' results
            summary["stages"][stage] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            lines.append(f"stage {stage} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            print(traceback.format_exc()[-2000:], flush=True)
        import gc

        import torch
        gc.collect()
        torch.cuda.empty_cache()
        summary["stages_seconds"] = dict(summary.get("stages_seconds", {}), **{stage: time.time() - ts})
        write_json(os.path.join(a.out, "summary.json"), summary)
        print(f"[{stage}] {time.time() - ts:.0f}s", flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
