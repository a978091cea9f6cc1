"""Measured speed: images/s, time per batch and peak memory, pruned vs unpruned in the same run."""
from .throughput import compare_throughput, measure_throughput

__all__ = ["measure_throughput", "compare_throughput"]
