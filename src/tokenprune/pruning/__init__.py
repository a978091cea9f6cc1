"""Token reduction: evaluators -> smoothing -> reducers -> alignment, placed by a schedule."""
from .methods import METHODS, MethodSpec, create_model, list_methods, resolve_schedule
from .stage import BEFORE_ENCODER, PrunedModel, ReductionStage, count_tokens
from ..tokens import TokenState

__all__ = ["METHODS", "MethodSpec", "create_model", "list_methods", "resolve_schedule", "BEFORE_ENCODER",
           "PrunedModel", "ReductionStage", "count_tokens", "TokenState"]
