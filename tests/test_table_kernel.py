"""The one-launch Triton table update against the torch ops it replaces: identical state (slots, ``last``, ``count``,
scratch column included) and identical plans at every step of random selection sequences, on row-sliced views, and
against nosasim's engine. Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py), so sizes are
kept small: the interpreter spends 50-100 ms per program (mostly in tl.sort)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from runtime.blockcache import BlockTable, replay_misses, update_table

# CPU tensors run the kernel in Triton's interpreter (marker 'triton': tests/conftest.py runs those only when it is
# on); on CUDA the compiled kernel runs (marker 'gpu').
DEVICES = [pytest.param("cpu", marks=pytest.mark.triton), pytest.param("cuda", marks=pytest.mark.gpu)]
POLICIES = ["prev", "lru", "lfu", "static"]
# Few distinct values, so that static keys tie often (ties must fall to the lower id) and NaN, +-inf, +-0 occur.
STATIC_VALUES = [float("nan"), float("-inf"), -1.5, -0.0, 0.0, 0.5, 2.0, float("inf")]


def _tables(policy, layers, rows, capacity, nb, device, seed):
    """Two equal tables, one per path; 'static' gets scores with ties, NaN, infinities and signed zeros."""
    a = BlockTable.allocate(layers, rows, capacity, nb, policy, device)
    b = BlockTable.allocate(layers, rows, capacity, nb, policy, device)
    if policy == "static":
        g = torch.Generator().manual_seed(seed)
        pick = torch.randint(0, len(STATIC_VALUES) + 1, a.static.shape, generator=g)
        vals = torch.tensor(STATIC_VALUES + [0.0])[pick]
        vals = torch.where(pick == len(STATIC_VALUES), torch.randn(a.static.shape, generator=g), vals)
        a.static.copy_(vals)
        b.static.copy_(vals)
    return a, b


class _Rows:
    """Random per-row decode: contexts grow by one token per step, selections reuse the previous step's blocks
    often (so hits, evictions and re-admissions all happen), name the tail sometimes (dropped, as the runtime
    does), are -1 padded at random positions, and never hold more than ``capacity`` complete blocks."""

    def __init__(self, rows, k, capacity, bs, steps, seed, start_blocks=1):
        self.g = torch.Generator().manual_seed(seed)
        self.k, self.capacity, self.bs = k, capacity, bs
        self.ctx = torch.randint(start_blocks * bs + 1, (start_blocks + 3) * bs, (rows,), generator=self.g)
        self.nb = int((self.ctx.max() + steps - 2) // bs) + 1
        self.prev = [set() for _ in range(rows)]

    def step(self, t):
        ctx = self.ctx + t
        tail = (ctx - 1) // self.bs
        tail_done = ((ctx - 1) % self.bs == 0) & (t > 0)
        sel = torch.full((len(ctx), self.k), -1, dtype=torch.int64)
        for r, tr in enumerate(tail.tolist()):
            weights = torch.tensor([3.0 if b in self.prev[r] else 1.0 for b in range(tr + 1)])
            n = int(torch.randint(0, min(self.k, tr + 1) + 1, (1,), generator=self.g))
            ids = torch.multinomial(weights, n, generator=self.g) if n else torch.zeros(0, dtype=torch.int64)
            ids = ids[ids != tr][: self.capacity]  # the tail is always resident: never a selection
            if torch.rand(1, generator=self.g) < 0.3 and n < self.k:
                ids = torch.cat([ids, torch.tensor([tr])])  # named, then dropped below like the runtime does
            row = torch.full((self.k,), -1, dtype=torch.int64)
            row[: len(ids)] = ids
            sel[r] = row[torch.randperm(self.k, generator=self.g)]
            self.prev[r] = set(ids.tolist())
        sel = torch.where(sel == tail[:, None], -1, sel)
        return sel, tail_done, tail - 1


def _assert_same(pa, pb, a, b, where):
    for f in ("sel_slot", "miss", "tail_dst", "n_miss"):
        x, y = getattr(pa, f), getattr(pb, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f"{where}: plan.{f}\n{x}\n{y}"
    for f in ("slot_block", "last", "count"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f"{where}: table.{f}"


def _sizes(device):
    # (rows, k, steps, prompt blocks): the interpreter affords a few dozen programs per test; on the GPU, runtime
    # sizes, with prompts long enough for full selections.
    return (3, 6, 8, 8) if device == "cpu" else (96, 64, 60, 120)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("extra", [0, 3])
def test_triton_equals_torch_every_step(device, policy, extra):
    R, K, steps, start = _sizes(device)
    C = K - 1 + extra if device == "cpu" else K - 1 + 8 * extra  # on CUDA 63 and 87: 64 and 128 candidates
    drive = _Rows(R, K, C, bs=2 if device == "cpu" else 4, steps=steps, seed=7 * extra + len(policy),
                  start_blocks=start)
    a, b = _tables(policy, 1, R, C, drive.nb, device, seed=extra)
    n_miss = n_evicted = 0
    for t in range(steps):
        sel, done, old = (x.to(device) for x in drive.step(t))
        step = torch.tensor(t, device=device)
        resident = b.slot_block[0].clone()
        pa = update_table(a, 0, sel, step, done, old, check=True, use_triton=False)
        pb = update_table(b, 0, sel, step, done, old, check=True, use_triton=True)
        _assert_same(pa, pb, a, b, f"{policy} C={C} step {t}")
        n_miss += int(pb.n_miss.sum())
        gone = (resident[:, :, None] != b.slot_block[0][:, None, :]).all(2) & (resident >= 0)
        n_evicted += int(gone.sum())
        # Every selected block sits where the plan says.
        ok = sel >= 0
        assert torch.equal(b.slot_block[0].gather(1, pb.sel_slot.clamp(min=0))[ok], sel[ok])
    assert n_miss > 0 and n_evicted > 0  # the ranking decided something


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["lru", "static"])
def test_row_sliced_views_and_strided_inputs(device, policy):
    # The micro-batched backend updates a BlockTable whose tensors are ``t[:, r0:r1]``; inputs come as strided views.
    L, R, K, C, steps = 2, 5, 6, 7, 6
    drive = _Rows(3, K, C, bs=2, steps=steps, seed=3)
    a, b = _tables(policy, L, R, C, drive.nb, device, seed=1)
    before = [x.clone() for x in (a.slot_block, a.last, a.count)]
    parts = [replace(t, **{f: getattr(t, f)[:, 1:4] for f in ("slot_block", "last", "count", "static")
                           if getattr(t, f) is not None}) for t in (a, b)]
    for t in range(steps):
        sel, done, old = (x.to(device) for x in drive.step(t))
        wide = torch.full((3, 2 * K), -7, dtype=torch.int64, device=device)
        wide[:, ::2] = sel
        sel_view = wide[:, ::2]
        flags = torch.stack([done, done], 1)[:, 0]
        olds = torch.stack([old, old], 1)[:, 1]
        assert not sel_view.is_contiguous() and not flags.is_contiguous()
        step = torch.tensor(t, device=device)
        pa = update_table(parts[0], 1, sel, step, done, old, check=True, use_triton=False)
        pb = update_table(parts[1], 1, sel_view, step, flags, olds, check=True, use_triton=True)
        _assert_same(pa, pb, a, b, f"sliced {policy} step {t}")
    for x, x0 in zip((b.slot_block, b.last, b.count), before):
        assert torch.equal(x[0], x0[0]), "another layer changed"
        assert torch.equal(x[1, [0, 4]], x0[1, [0, 4]]), "rows outside the slice changed"
    assert not torch.equal(b.slot_block[1, 1:4], before[0][1, 1:4])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", POLICIES)
def test_triton_misses_equal_nosasim_engine(device, policy):
    cache = pytest.importorskip("nosasim.cache")
    synth = pytest.importorskip("nosasim.trace.synth")
    steps, seqs = (8, 2) if device == "cpu" else (80, 8)
    tr = synth.synthesize("nosa", layers=1, heads=1, seqs=seqs, steps=steps, k=8, context=60, kq=4, overlap=0.7,
                          seed=2, context_spread=20, window=2, block_size=4)
    static = tr.agnostic_score.reshape(-1, tr.n_blocks) if policy == "static" else None
    ref = cache.simulate_arrays(tr.rows(), tr.context_len, policy, 8, static_score=static, block_size=4).misses
    got = replay_misses(torch.from_numpy(tr.sel.astype(np.int64)).to(device), torch.from_numpy(tr.context_len),
                        policy, 8, 4, torch.from_numpy(tr.agnostic_score).to(device), check=True, use_triton=True)
    assert ref.sum() > 0
    np.testing.assert_array_equal(got.reshape(tr.steps, -1).cpu().numpy(), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_check_reports_overfull_rows(device):
    table = BlockTable.allocate(1, 1, 2, 8, "lru", device)
    sel = torch.tensor([[0, 1, 2]], device=device)
    z = torch.zeros(1, dtype=torch.bool, device=device)
    with pytest.raises(RuntimeError, match="free slots"):
        update_table(table, 0, sel, torch.tensor(0, device=device), z, z.long(), check=True, use_triton=True)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["prev", "lfu"])
def test_cuda_graph_replay_equals_torch(policy):
    # The decode step is a CUDA graph: the kernel must read the step from device memory and never sync.
    R, K, C, steps = 64, 64, 63, 30
    drive = _Rows(R, K, C, bs=4, steps=steps, seed=5, start_blocks=80)
    a, b = _tables(policy, 1, R, C, drive.nb, "cuda", seed=0)
    sel, done, old = (x.cuda() for x in drive.step(0))
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    update_table(BlockTable.allocate(1, R, C, drive.nb, policy, "cuda"), 0, sel, step, done, old)  # compile first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pb = update_table(b, 0, sel, step, done, old)  # use_triton=None: the kernel on CUDA
    for t in range(steps):
        s, d, o = (x.cuda() for x in drive.step(t)) if t else (sel.clone(), done.clone(), old.clone())
        sel.copy_(s)
        done.copy_(d)
        old.copy_(o)
        step.fill_(t)
        pa = update_table(a, 0, sel, step, done, old, use_triton=False)
        graph.replay()
        _assert_same(pa, pb, a, b, f"graph {policy} step {t}")


@pytest.mark.parametrize("device", DEVICES)
def test_static_ties_follow_numpy_comparison(device):
    # Row r holds blocks 0 and 1 with scores pairs[r]; selecting block 2 into 2 slots evicts one of them: the
    # smaller score, or block 0 when numpy calls the two equal (-0.0 == 0.0; NaN reads as -inf).
    nan, inf = float("nan"), float("inf")
    pairs = [(0.0, -0.0), (-0.0, 0.0), (nan, -inf), (-inf, nan), (nan, nan), (-1.0, 1.0), (1.0, -1.0),
             (1e-30, 0.0), (-1e-30, -0.0), (-2.0, -3.0)]
    R = len(pairs)
    tables = _tables("static", 1, R, 2, 4, device, seed=0)
    for tb in tables:
        tb.static.fill_(0.0)
        tb.static[0, :, :2] = torch.tensor(pairs)
    z = torch.zeros(R, dtype=torch.bool, device=device)
    old = torch.zeros(R, dtype=torch.int64, device=device)
    steps = (torch.tensor([[0, 1]] * R), torch.tensor([[2, -1]] * R))
    for t, sel in enumerate(steps):
        plans = [update_table(tb, 0, sel.to(device), torch.tensor(t, device=device), z, old, use_triton=u)
                 for tb, u in zip(tables, (False, True))]
        _assert_same(*plans, *tables, f"static ties step {t}")
    score = np.array(pairs)
    score = np.where(np.isnan(score), -np.inf, score)
    kept = np.where(score[:, 1] >= score[:, 0], 1, 0)
    got = tables[1].slot_block[0].cpu().numpy()
    np.testing.assert_array_equal(np.sort(got, 1), np.sort(np.stack([kept, np.full(R, 2)], 1), 1))
