"""nosasim: predict and measure decode speed of KV-offloaded block-sparse attention.

The package imports no torch or CuPy: everything here runs on any CPython with
numpy, numba, scipy and simpy. GPU code lives in the separate ``runtime`` package.
"""

__version__ = "0.1.0"
