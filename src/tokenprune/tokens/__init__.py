"""The bottom layer: the token state carried through a backbone and the pure sequence ops on it.

Both `tokenprune.models` (backbones build and carry a `TokenState`, SSM blocks align their scans over
pruned positions) and `tokenprune.pruning` (stages reduce it) use this package; it imports neither.
"""
from .checks import check_values, value_checks
from .sequence import (gap_scale, gap_scaled_delta_B, gather_from_sequence, restricted_order, scan_gaps,
                       scan_gaps_unordered, scatter_to_sequence)
from .state import PER_TOKEN_FIELDS, TokenState, initial_state, seq_to_grid_lookup, static_index

__all__ = ["TokenState", "initial_state", "static_index", "seq_to_grid_lookup", "PER_TOKEN_FIELDS",
           "check_values", "value_checks",
           "scan_gaps", "scan_gaps_unordered", "gap_scale", "gap_scaled_delta_B", "scatter_to_sequence",
           "gather_from_sequence", "restricted_order"]
