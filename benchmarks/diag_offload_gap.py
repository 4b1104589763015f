"""Where do the offloaded 32K configurations lose the ~8 ms per step that the simulator does not predict?

Run on a GPU: ``PYTHONPATH=. python benchmarks/diag_offload_gap.py OUT.json``. For a few of ``runtime.e2e``'s
configurations it times (a) the step as validated, (b) the same step with every host<->device copy skipped, and
(c) the 8K configuration with a host store sized for 8K instead of 32K (a smaller pinned footprint). If (b) closes
the gap, the missing time is in the transfers; if (c) differs from (a), the host store's size matters.
"""

from __future__ import annotations

import sys

import torch

from runtime import e2e
from runtime.config import PRESETS, RuntimeConfig
from runtime.kvstore import HostStore
from runtime.model import Weights
from runtime.timing import environment, write_json

PICK = ("nosa-8k-b32", "nosa-32k-b32", "infllmv2-32k-b32")


def host_for(context: int, steps: int) -> HostStore:
    cfg = RuntimeConfig(PRESETS["llama3-8b"], "nosa", batch=4, context=context, steps=steps)
    host = HostStore.allocate(cfg, pin=True)
    host.fill_random(1, "cuda")
    return host


def main(out: str) -> None:
    weights = Weights.random(PRESETS["llama3-8b"], torch.bfloat16, "cuda", 0)
    configs = {c.name: c for c in e2e.CONFIGS}
    res = {"env": environment(), "runs": []}
    big = host_for(e2e.SYNTH_32K["context"], e2e.SYNTH_32K["steps"] + 8)
    traces: dict = {}
    for name in PICK:
        for copies in (True, False):
            r = e2e.run_config(configs[name], weights, {(None, True): big}, traces, copies=copies)
            res["runs"].append({"name": name, "host": "32K store", "copies": copies,
                                "median_step_s": r["measured"]["median_step_s"]})
            print(f"{name:18s} 32K store copies={copies!s:5s} {1e3 * r['measured']['median_step_s']:8.2f} ms", flush=True)
            write_json(out, res)
    del big
    torch.cuda.empty_cache()
    small = host_for(8192, 300)
    r = e2e.run_config(configs["nosa-8k-b32"], weights, {(None, True): small}, traces)
    res["runs"].append({"name": "nosa-8k-b32", "host": "8K store", "copies": True,
                        "median_step_s": r["measured"]["median_step_s"]})
    print(f"{'nosa-8k-b32':18s} 8K store  copies=True  {1e3 * r['measured']['median_step_s']:8.2f} ms", flush=True)
    write_json(out, res)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "diag_offload_gap.json")
