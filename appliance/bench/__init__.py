"""Benchmarks (throughput, TCP_REPAIR moves, resume moves, loop stalls) and the README's image maker.
Each is a ``python -m`` entry; figures go to docs/BENCHMARKS.md."""
