"""Trace recorders: a real pretrained model decoding real text on the CPU, scored by an attention tap.

Needs the ``record`` extra (torch, transformers, gguf, accelerate); ``nosasim`` itself never
imports this package. ``traces.record`` is the recorder and its CLI, ``traces.hook`` the attention
tap, ``traces.proxies`` the query-agnostic score proxies, ``traces/samples/`` the bundled traces.
"""
