"""Benchmarks for tillsync; run them with ``python -m bench`` (see ``bench.run``)."""
