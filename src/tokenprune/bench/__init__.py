"""Measured speed: images/s, time per batch and peak memory, pruned vs unpruned in the same run."""
from .throughput import as_dtype, compare_throughput, machine_info, measure_throughput

__all__ = ["measure_throughput", "compare_throughput", "machine_info", "as_dtype"]
