"""Training-free evaluation: budget solver and the grid runner behind ``eval.py``."""
from .budget import measured_token_reduction, solve_keep, solve_keep_for_flops, tokens_per_block_from_trace
from .grid import (BackboneEntry, DataConfig, EvalConfig, MethodEntry, ThroughputConfig, VisualizeConfig,
                   build_parser, main, method_label, parse_config, run_grid)

__all__ = ["solve_keep", "solve_keep_for_flops", "measured_token_reduction", "tokens_per_block_from_trace",
           "BackboneEntry", "MethodEntry", "DataConfig", "ThroughputConfig", "VisualizeConfig", "EvalConfig",
           "build_parser", "parse_config", "run_grid", "main", "method_label"]
