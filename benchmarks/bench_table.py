"""Block-table update per layer: the torch ops against the one-launch Triton kernel, side by side.

Run: ``PYTHONPATH=. python benchmarks/bench_table.py [out.json]``. Shapes are llama3-8b's (8 KV heads, so rows =
8 x batch) with the runtime's defaults: ``K = 64`` selected (one of them the tail, so at most 63 complete blocks),
``C = 63`` slots; 8K context (130 blocks) at batch 16, 64, 96 and 32K (514 blocks) at batch 32, plus batch 64 with
``C = 127`` (a 128-candidate program); policies prev and lru. The kernel runs at its default warps and at each of
``WARPS``. Each path updates ``LAYERS`` layers inside one CUDA graph (as a decode step replays them), timed per layer.
Before each replay the selections move on (85% of the previous step's blocks stay selected, the rest are new) and
the step advances, so the table really evolves. Both paths are first driven through the same steps from the same
state, with states and plans compared at every step: ``identical`` records the outcome.
"""

from __future__ import annotations

import sys

import torch

from runtime.blockcache import BlockTable, update_table
from runtime.table_kernel import launch_update
from runtime.timing import environment, time_cuda, write_json

POINTS = ((16, 130, 63), (64, 130, 63), (96, 130, 63), (32, 514, 63), (64, 130, 127))  # (batch, blocks, C)
TIMED_POLICIES = ("prev", "lru")
KV_HEADS, K, LAYERS, SETS = 8, 64, 8, 16
WARPS = (1, 2, 4, 8)


def selections(rows: int, nb: int, n: int, dev, seed: int = 0) -> list[torch.Tensor]:
    """``n`` successive steps of selections ``int64 [LAYERS, rows, K]``: K - 1 distinct complete blocks (the tail,
    block nb - 1, is never among them) and one -1 where the runtime drops the tail, at a random position."""
    g = torch.Generator(device=dev).manual_seed(seed)
    prev = torch.zeros((LAYERS, rows, nb - 1), dtype=torch.bool, device=dev)
    out = []
    for _ in range(n):
        stay = prev & (torch.rand(prev.shape, generator=g, device=dev) < 0.85)
        score = torch.rand(prev.shape, generator=g, device=dev) + stay.float()
        ids = score.topk(K - 1, dim=-1).indices
        sel = torch.cat([ids, torch.full((LAYERS, rows, 1), -1, device=dev)], -1)
        perm = torch.rand(sel.shape, generator=g, device=dev).argsort(-1)
        out.append(sel.gather(-1, perm))
        prev = torch.zeros_like(prev).scatter_(-1, ids, True)
    return out


def identical(policy: str, rows: int, nb: int, C: int, sets: list[torch.Tensor], dev) -> bool:
    a, b = (BlockTable.allocate(LAYERS, rows, C, nb, policy, dev) for _ in range(2))
    done = torch.zeros(rows, dtype=torch.bool, device=dev)
    old = torch.full((rows,), nb - 2, dtype=torch.int64, device=dev)
    same = True
    for t, sel in enumerate(sets):
        step = torch.tensor(t, device=dev)
        for layer in range(LAYERS):
            pa = update_table(a, layer, sel[layer], step, done, old, use_triton=False)
            pb = update_table(b, layer, sel[layer], step, done, old, use_triton=True)
            same &= all(torch.equal(getattr(pa, f), getattr(pb, f)) for f in ("sel_slot", "miss", "tail_dst",
                                                                              "n_miss"))
    same &= all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("slot_block", "last", "count"))
    return bool(same)


def time_path(policy: str, rows: int, nb: int, C: int, sets: list[torch.Tensor], dev, path: str,
              num_warps: int | None = None) -> float:
    """Seconds per layer: LAYERS updates captured in one graph, replayed with the next step's selections.
    ``path`` 'torch' or 'triton' (through update_table, default warps), or 'kernel' with ``num_warps``."""
    table = BlockTable.allocate(LAYERS, rows, C, nb, policy, dev)
    sel = sets[0].clone()
    step = torch.zeros((), dtype=torch.int64, device=dev)
    done = torch.zeros(rows, dtype=torch.bool, device=dev)
    old = torch.full((rows,), nb - 2, dtype=torch.int64, device=dev)

    def one_step():
        for layer in range(LAYERS):
            if path in ("torch", "triton"):
                update_table(table, layer, sel[layer], step, done, old, use_triton=path == "triton")
            else:
                launch_update(table.slot_block[layer], table.last[layer], table.count[layer], None, policy,
                              sel[layer], step, done, old, num_warps=num_warps)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (Triton compiles here) off the capture
        one_step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step()

    def setup(i):
        sel.copy_(sets[i % len(sets)])
        step.fill_(i + 1)

    return time_cuda(graph.replay, reps=30, warmup=3, setup=setup) / LAYERS


def run(out_path: str | None = None, dev: str = "cuda") -> dict:
    rows_out = []
    for batch, nb, C in POINTS:
        rows = KV_HEADS * batch
        sets = selections(rows, nb, SETS, dev)
        for policy in TIMED_POLICIES:
            entry = {"batch": batch, "rows": rows, "n_blocks": nb, "context": (nb - 2) * 64, "policy": policy,
                     "k": K, "capacity": C, "layers_per_graph": LAYERS,
                     "identical": identical(policy, rows, nb, C, sets, dev),
                     "torch_s": time_path(policy, rows, nb, C, sets, dev, "torch"),
                     "triton_s": time_path(policy, rows, nb, C, sets, dev, "triton")}
            entry["triton_by_warps_s"] = {w: time_path(policy, rows, nb, C, sets, dev, "kernel", w) for w in WARPS}
            best = min(entry["triton_by_warps_s"], key=entry["triton_by_warps_s"].get)
            entry.update(triton_best_warps=best, triton_best_s=entry["triton_by_warps_s"][best])
            entry["speedup"] = entry["torch_s"] / entry["triton_s"]
            rows_out.append(entry)
    res = {"env": environment(), "timing": "cuda graph replay, per layer", "results": rows_out}
    if out_path:
        write_json(out_path, res)
    return res


def table(res: dict) -> str:
    lines = ["batch rows  nb    C  policy  torch_us  triton_us  best_us(warps)  speedup  identical"]
    for r in res["results"]:
        lines.append(f"{r['batch']:5d} {r['rows']:4d} {r['n_blocks']:4d} {r['capacity']:4d}  {r['policy']:6s} "
                     f"{r['torch_s'] * 1e6:8.1f}  {r['triton_s'] * 1e6:9.1f}  {r['triton_best_s'] * 1e6:8.1f} "
                     f"({r['triton_best_warps']})  {r['speedup']:7.1f}  {r['identical']}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(run(sys.argv[1] if len(sys.argv) > 1 else None)))
