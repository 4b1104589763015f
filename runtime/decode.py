"""The decode loop: build a variant, check it fits before allocating, step it, time it.

Timing follows the validation protocol (docs/validation.md): CUDA events around each step, the median of at least 64 steps after warm-up.
On a GPU the step is captured once as a CUDA graph (all state it reads is on the device) and replayed, so launch
gaps of the ~30 small kernels per layer don't count against the runtime; ``graph=False`` times eager steps.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from nosasim import memory

from .backends import DenseBackend, OffloadBackend
from .config import RuntimeConfig
from .kvstore import HostStore
from .model import Decoder, Weights

USABLE_SHARE = 0.96  # of the device's free memory: the allocator's rounding and CUDA graph pools need the rest


def check_fits(cfg: RuntimeConfig, device, weights_given: bool) -> dict[str, int]:
    """ValueError, before anything is allocated, if the plan (``nosasim.memory.plan``, the simulator's) does not fit
    the device's free memory; the message gives the largest batch that would (``nosasim.memory.largest_batch``)."""
    need = cfg.gpu_bytes()
    if weights_given:
        need["weights"] = need["eviction_head"] = 0
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        usable = USABLE_SHARE * free
        largest = memory.largest_batch(usable, cfg.model_for_memory, cfg.variant, cfg.budget, cfg.policy,
                                       cfg.max_tokens, cfg.block, weights_resident=weights_given,
                                       ckey_bytes=cfg.ckey_bytes)
        memory.refuse_unless_fits(usable, need, f"{cfg.variant} at batch {cfg.batch}, context {cfg.context}",
                                  largest)
    return need


@dataclass
class StepTimes:
    ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)


class Runner:
    """One decoder with one backend. ``trace_sel`` (int [T, L, H, B, K] on the device) drives the 'trace' variant
    or, with infllmv2/nosa, replaces the computed selection after it is computed (timing with real locality)."""

    def __init__(self, cfg: RuntimeConfig, device="cuda", weights: Weights | None = None, trace_sel=None,
                 ctx0=None, seed: int = 0, exact_prefill: bool = False, host: HostStore | None = None,
                 copies: bool = True):
        check_fits(cfg, device, weights is not None)
        if cfg.variant == "trace" and trace_sel is None:
            raise ValueError("variant 'trace' needs trace_sel")
        self.cfg, self.device = cfg, device
        dt = getattr(torch, cfg.dtype)
        self.weights = weights or Weights.random(cfg.shape, dt, device, seed)
        if cfg.offloaded:
            if host is None:
                host = HostStore.allocate(cfg, pin=torch.device(device).type == "cuda")
                host.fill_random(seed + 1, device)
            self.host = host
            self.backend = OffloadBackend(cfg, device, host, trace_sel, ctx0, copies)
            self.backend.prefill(self.weights, exact_prefill, seed + 2)
        else:
            self.host = None
            self.backend = DenseBackend(cfg, device, seed + 1)
        tokens = torch.randint(0, cfg.shape.vocab, (cfg.batch,), device=device,
                               generator=torch.Generator(device=device).manual_seed(seed + 3))
        self.decoder = Decoder(cfg.shape, self.weights, self.backend, tokens, microbatches=cfg.microbatches)
        self.graph = None
        self.steps_done = 0

    def step(self) -> None:
        if self.steps_done >= self.cfg.steps:
            raise ValueError(f"Runner: all {self.cfg.steps} planned steps are done (raise RuntimeConfig.steps)")
        if self.graph is not None:
            self.graph.replay()
        else:
            self.decoder.step()
        self.steps_done += 1

    def capture(self) -> None:
        """Capture one step as a CUDA graph (after at least one eager step compiled every kernel)."""
        if self.steps_done == 0:
            raise ValueError("Runner.capture: run an eager step first (Triton compiles on first launch)")
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.decoder.step()
        self.graph = g

    def measure(self, steps: int = 64, warmup: int = 8, graph: bool = True) -> StepTimes:
        """Per-step times (ms) of ``steps`` steps after ``warmup`` eager (then replayed) ones."""
        cuda = torch.device(self.device).type == "cuda"
        for _ in range(max(1, warmup)):
            self.step()
        if cuda and graph and self.graph is None:
            self.capture()
            for _ in range(2):
                self.step()
        ms = []
        for _ in range(steps):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                self.step()
                b.record()
                b.synchronize()
                ms.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                self.step()
                ms.append((time.perf_counter() - t0) * 1e3)
        return StepTimes(ms)
