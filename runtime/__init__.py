"""GPU reference runtime: offloaded block-sparse decoding (dense, InfLLM-V2, NOSA, trace-driven).

Every GPU line of nosasim lives here. The CPU paths (torch fallbacks of the gather and the attention kernel) compute
the same functions as the Triton kernels, so the logic is testable without a GPU.
"""

from .config import PRESETS, RuntimeConfig

__all__ = ["PRESETS", "RuntimeConfig"]
