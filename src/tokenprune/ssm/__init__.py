"""Selective scan (Mamba's S6 recurrence): reference loop, fast CPU kernel (numba), our fused Triton GPU kernels
and mamba-ssm's CUDA kernel, chosen at run time (see ``selective_scan``; the names: ``IMPLS``)."""
from .reference import selective_scan_reference
from .scan import (IMPLS, SelectiveScan, get_scan_impl, reset_scan_impl_report, scan_flops,
                   scan_impl, scan_impl_report, selective_scan, set_scan_impl)

__all__ = ["IMPLS", "SelectiveScan", "selective_scan", "selective_scan_reference",
           "set_scan_impl", "get_scan_impl", "scan_impl", "scan_impl_report",
           "reset_scan_impl_report", "scan_flops"]
