"""Latency and memory benchmarks of LoRA linear layers, provider against provider.

``python bench/run.py`` (or ``python -m bench``) runs the suite; ``pytest bench``
runs the pytest-benchmark regression set. See docs/benchmarks.md.
"""
