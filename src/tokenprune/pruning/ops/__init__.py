"""Pure tensor algorithms for token reduction; they know nothing of backbones.

The sequence ops that backbones use too (gaps, alignment, value checks) live in `tokenprune.tokens` and
are re-exported here.

All functions are batched with the same token count in every row. Index tensors are long; where order
must be preserved, indices are ascending. Invalid arguments raise ValueError naming the value.
"""
from ...tokens.sequence import (gap_scale, gap_scaled_delta_B, gather_from_sequence, restricted_order, scan_gaps,
                        scan_gaps_unordered, scatter_to_sequence)
from ...tokens.checks import check_values, value_checks
from .evit import evit_fuse, evit_reduce, evit_select
from .grid import gather_from_grid, scatter_to_grid
from .pumer import pumer_reduce
from .select import (batched_gather, complement_indices, keep_count, keep_count_ceil, keep_count_even,
                     protected_count, topk_indices)
from .smoothing import smooth_scores, smoothing_kernel
from .tome import bipartite_soft_matching, keep_order_permutation, merge_wavg, proportional_attention_bias
from .utr import merge_into, utr_reduce
from .visionzip import visionzip_reduce

__all__ = [
    "check_values", "value_checks",
    "scatter_to_grid", "gather_from_grid",
    "smooth_scores", "smoothing_kernel",
    "topk_indices", "complement_indices", "keep_count", "keep_count_ceil", "keep_count_even", "protected_count",
    "batched_gather",
    "evit_select", "evit_fuse", "evit_reduce",
    "bipartite_soft_matching", "merge_wavg", "keep_order_permutation", "proportional_attention_bias",
    "visionzip_reduce",
    "utr_reduce", "merge_into",
    "pumer_reduce",
    "scan_gaps", "scan_gaps_unordered", "gap_scale", "gap_scaled_delta_B", "scatter_to_sequence", "gather_from_sequence",
    "restricted_order",
]
