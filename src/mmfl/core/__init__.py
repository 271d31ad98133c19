"""Pure-numpy math of mmfl: allocators, aggregation coefficients, metrics.

Nothing under ``mmfl.core`` imports torch or flwr, performs I/O or mutates its inputs.
"""
